"""The same-policy rule: a ratio only between rows that differ in the one aspect compared, refused
(with the reason, in the table and the summary) when the measured policies differ in more."""
from __future__ import annotations

from dataclasses import asdict

import pytest

from benchmarks.configs import ModelSpec, Variant, parse_variants
from benchmarks.policy import Policy, compare, intended_baseline, with_same_policy_baselines
from benchmarks.report import _summary, _train_table
from benchmarks.run import TrainRow, add_ratios

SPEC = ModelSpec.parse("tiny/2")


def row(name: str, residual: str, images_per_s: float, device_type: str = "cpu", memory: float = 1.0) -> TrainRow:
    """A measured training row of ``name`` at batch 4 whose blocks saw a ``residual`` stream."""
    variant = Variant.parse(name, device_type)
    r = TrainRow.of(f"train/{SPEC.name}/b4/{variant.name}", SPEC, 4, variant, residual_dtype=residual,
                    images_per_s=images_per_s, peak_allocated_gib=memory, peak_reserved_gib=memory, step_ms=1.0,
                    fwd_flops_per_image=2.0, dit_paper_gflops_per_image=1e-9, train_flops_per_image=6.0,
                    achieved_tflops=1.0, mfu=0.5)
    return r


@pytest.mark.parametrize("name, device_type, expected", [
    ("mask50+kernels+compile", "cpu", ("dit+kernels+compile", "arch")),
    ("maskdit+bf16", "cpu", ("dit+bf16", "arch")),
    ("dit+kernels+compile", "cpu", ("dit+kernels", "compile")),
    ("dit+kernels+reference", "cpu", ("dit+kernels", "attention")),
    ("dit+kernels", "cpu", ("dit", "kernels")),
    ("dit+bf16", "cpu", ("dit", "precision")),
    ("dit+fp32", "cuda", ("dit", "precision")),
])
def test_each_variant_is_compared_with_the_one_that_differs_in_one_setting(name, device_type, expected):
    variant = Variant.parse(name, device_type)
    base, aspect = intended_baseline(variant, device_type)
    assert (base.name, aspect) == expected
    assert intended_baseline(Variant.parse("dit", device_type), device_type) is None


def test_same_policy_dit_rows_are_added_before_the_maskdit_rows_that_need_them():
    names = ["mask50+kernels", "mask25+bf16", "dit+kernels"]
    variants = with_same_policy_baselines(parse_variants(names, "cpu"), "cpu")
    assert [v.name for v in variants] == ["dit", "dit+kernels", "mask50+kernels", "dit+bf16", "mask25+bf16"]


def test_two_differences_refuse_the_comparison_and_say_which():
    dit = Policy("dit", "bf16", "float32", "sdpa", False, False)
    masked = Policy("mask50", "bf16", "bfloat16", "sdpa", False, False)
    verdict = compare(masked, dit, "arch")
    assert not verdict.ok and verdict.aspect is None
    assert "arch and precision" in verdict.note and "residual float32 vs autocast bf16, residual bfloat16" in verdict.note
    same = Policy("mask50", "bf16", "float32", "sdpa", False, False)
    assert compare(same, dit, "arch") == (compare(same, dit, "arch").__class__(True, "arch", ""))
    assert not compare(dit, dit, "kernels").ok  # nothing differs although the kernels should


def test_rows_whose_residual_streams_differ_get_no_ratio_and_a_loud_flag():
    rows = [row("dit", "float32", 100.0), row("dit+bf16", "float32", 50.0),
            row("mask50+bf16", "bfloat16", 150.0, memory=0.5), row("mask50", "float32", 160.0, memory=0.4)]
    add_ratios(rows, "cpu")
    dit, dit_bf16, masked_bf16, masked = rows
    assert (dit.baseline, dit.compared, dit.speedup_vs_baseline) == (dit.id, None, 1.0)
    assert (dit_bf16.compared, dit_bf16.speedup_vs_baseline) == ("precision", 0.5)
    assert masked_bf16.baseline == dit_bf16.id and masked_bf16.speedup_vs_baseline is None
    assert masked_bf16.memory_vs_baseline is None and "precision" in masked_bf16.comparison
    assert (masked.compared, masked.speedup_vs_baseline, masked.memory_vs_baseline) == ("arch", 1.6, 0.4)

    dicts = [asdict(r) for r in rows]
    table = "\n".join(_train_table(dicts))
    flagged = next(line for line in table.splitlines() if line.startswith("| `mask50+bf16` |"))
    assert "⚠ **no ratio**" in flagged and "×" not in flagged.split("no ratio")[1].split("|")[1]
    summary = "\n".join(_summary(dicts, "cpu"))
    assert "no ratio for `mask50+bf16`" in summary
    assert "fastest MaskDiT (50% masked): `mask50`, 1.60× the images/s of `dit`" in summary


def test_a_failed_baseline_leaves_no_ratio():
    rows = [row("dit", "float32", 100.0), row("mask50", "float32", 160.0)]
    rows[0].status = "oom"
    add_ratios(rows, "cpu")
    assert rows[1].speedup_vs_baseline is None and rows[1].comparison == "its baseline did not run"
