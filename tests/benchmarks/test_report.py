"""The report CLI in its tiny CPU mode: structure of the JSON, the markdown and the charts, every
ratio taken from rows of the same run that differ in one aspect, and the batch sweep."""
from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROW_FIELDS = {"id", "model", "batch", "variant", "arch", "mask_ratio", "kernels", "attention", "compile",
              "precision", "status", "images_per_s", "peak_allocated_gib", "peak_reserved_gib", "baseline",
              "speedup_vs_baseline", "autocast", "residual_dtype", "baseline_variant", "compared", "comparison"}
TRAIN_FIELDS = ROW_FIELDS | {"step_ms", "step_ms_all", "fwd_flops_per_image", "fwd_macs_per_image",
                             "dit_paper_gflops_per_image", "train_flops_per_image", "achieved_tflops", "mfu",
                             "memory_vs_baseline", "planned_peak_gib", "planned_largest_micro_batch"}
SAMPLE_FIELDS = ROW_FIELDS | {"cfg_scale", "num_steps", "nfe", "run_s", "run_s_all"}
# The tiny mode's training variants: every code path (kernels, attention, compile, bf16, masks).
TINY_VARIANTS = ["dit", "dit+kernels", "dit+reference", "dit+kernels+compile", "dit+bf16", "mask50",
                 "mask50+kernels", "mask25", "mask75+kernels", "mask50+kernels+compile", "mask50+bf16"]
POLICY = {"arch": lambda r: r["variant"].split("+")[0], "precision": lambda r: (r["autocast"], r["residual_dtype"]),
          "attention": lambda r: r["attention"], "kernels": lambda r: r["kernels"], "compile": lambda r: r["compile"]}


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9)


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One run of ``python -m benchmarks.report --tiny --device cpu`` (about half a minute on 2 busy cores)."""
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.report", "--tiny", "--device", "cpu", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


@pytest.fixture(scope="module")
def report(tiny_report) -> dict:
    return json.loads((tiny_report[0] / "report.json").read_text())


def test_header_names_the_machine_software_commit_and_command(report):
    assert report["schema"] == "maskdit_fast-benchmarks/2"
    assert re.fullmatch(r"[0-9a-f]{32}", report["run_id"])
    assert report["command"].startswith("python -m benchmarks.report --tiny")
    assert report["device"]["type"] == "cpu" and report["device"]["name"]
    assert report["versions"]["torch"] and report["versions"]["triton"]
    assert set(report["git"]) == {"commit", "dirty"}
    if (ROOT / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}", report["git"]["commit"])
    assert report["settings"]["tiny"] is True and report["baseline"] == "dit"
    assert set(report["matmul_peak_tflops"]) == {"bf16", "fp32"}
    assert all(peak > 0 for peak in report["matmul_peak_tflops"].values())


def test_every_training_variant_is_measured(report):
    rows = report["train"]
    assert [row["variant"] for row in rows] == TINY_VARIANTS
    for row in rows:
        assert set(row) == TRAIN_FIELDS, row["id"]
        assert row["status"] == "ok", row["status"]
        assert len(row["step_ms_all"]) == report["settings"]["steps"]
        assert close(row["step_ms"], statistics.median(row["step_ms_all"]))
        assert close(row["images_per_s"], row["batch"] / row["step_ms"] * 1e3)
        assert close(row["achieved_tflops"], row["train_flops_per_image"] * row["images_per_s"] / 1e12)
        assert close(row["mfu"], row["achieved_tflops"] / report["matmul_peak_tflops"][row["precision"]])
        assert row["peak_allocated_gib"] >= 0 and row["peak_reserved_gib"] > 0
    by_variant = {row["variant"]: row for row in rows}
    assert (by_variant["dit+kernels"]["kernels"], by_variant["dit"]["kernels"]) == (True, False)
    assert by_variant["dit+reference"]["attention"] == "reference"
    assert by_variant["dit+bf16"]["precision"] == "bf16" and by_variant["dit"]["precision"] == "fp32"
    assert by_variant["mask50+kernels+compile"]["compile"] is True


def test_flops_are_consistent(report):
    rows = {row["variant"]: row for row in report["train"]}
    for row in rows.values():
        assert close(row["fwd_macs_per_image"], row["fwd_flops_per_image"] / 2)
        assert 2.9 < row["train_flops_per_image"] / row["fwd_flops_per_image"] < 3.1  # backward = 2x forward
    dit, m25, m50, m75 = (rows[v]["fwd_flops_per_image"] for v in ("dit", "mask25", "mask50", "mask75+kernels"))
    assert dit > m25 > m50 > m75 > 0
    assert rows["dit+kernels"]["fwd_flops_per_image"] == dit  # kernels change no model FLOP


def test_every_ratio_divides_by_a_row_of_the_same_run_that_differs_in_one_aspect(report):
    for kind in ("train", "sample", "sweep"):
        by_id = {row["id"]: row for row in report[kind]}
        assert len(by_id) == len(report[kind])
        for row in report[kind]:
            assert row["autocast"] == {"fp32": "off", "bf16": "bf16"}[row["precision"]]
            assert row["residual_dtype"] in ("float32", "bfloat16", "bfloat16/float32")
            base = by_id[row["baseline"]]  # the baseline is a row of this report, hence of this run
            assert (base["model"], base["batch"], base["variant"]) == (row["model"], row["batch"],
                                                                      row["baseline_variant"])
            differ = [aspect for aspect, value in POLICY.items() if value(row) != value(base)]
            if row["comparison"]:  # refused: the measured policies differ in more than the compared aspect
                assert row["speedup_vs_baseline"] is None and len(differ) > 1
                continue
            assert differ == ([] if row["compared"] in (None, "guidance") else [row["compared"]])
            assert close(row["speedup_vs_baseline"], row["images_per_s"] / base["images_per_s"])
            if kind != "sample":
                assert close(row["memory_vs_baseline"], row["peak_allocated_gib"] / base["peak_allocated_gib"])
            if row["arch"] == "maskdit":
                assert base["arch"] == "dit" and row["compared"] == "arch"
            if row["id"] == base["id"]:
                assert row["speedup_vs_baseline"] == 1.0 and row["variant"] == "dit"


def test_the_residual_stream_dtype_is_measured(report):
    rows = {row["variant"]: row for row in report["train"]}
    assert rows["dit"]["residual_dtype"] == "float32"  # fp32 policy: nothing else possible
    assert rows["mask50+bf16"]["residual_dtype"] in ("float32", "bfloat16")
    if rows["mask50+bf16"]["residual_dtype"] != rows["dit+bf16"]["residual_dtype"]:
        assert rows["mask50+bf16"]["speedup_vs_baseline"] is None


def test_sampling_rows_cover_guidance(report):
    rows = report["sample"]
    assert {(row["variant"], row["cfg_scale"]) for row in rows} == {
        (v, c) for v in ("dit", "dit+kernels", "maskdit+kernels") for c in (1.0, 1.5)}  # dit+kernels: same policy
    for row in rows:
        assert set(row) == SAMPLE_FIELDS and row["status"] == "ok"
        assert row["nfe"] == 2 * row["num_steps"] - 1
        assert close(row["images_per_s"], row["batch"] / row["run_s"])


def test_markdown_shows_every_row_with_its_ratios(tiny_report, report):
    out, proc = tiny_report
    text = (out / "report.md").read_text()
    assert proc.stdout.strip() == text.strip()
    assert report["command"] in text and report["git"]["commit"][:12] in text
    lines = text.splitlines()
    for row in report["train"]:
        line = next(line for line in lines if line.startswith(f"| `{row['variant']}` |"))
        assert f"| {row['autocast']} | {row['residual_dtype']} | {row['attention']} |" in line
        if row["comparison"]:
            assert "⚠ **no ratio**" in line and f"no ratio for `{row['variant']}`" in text
        else:
            assert f"{row['speedup_vs_baseline']:.2f}×" in line and f"{row['memory_vs_baseline']:.2f}×" in line
        assert f"{row['mfu']:.1%}" in line
    for row in report["sample"]:
        assert any(f"`{row['variant']}`" in line and f"{row['speedup_vs_baseline']:.2f}×" in line for line in lines)


def test_the_batch_sweep_measures_dit_and_maskdit_at_every_batch(tiny_report, report):
    rows = report["sweep"]
    assert [(r["variant"], r["batch"]) for r in rows] == [(v, b) for b in (1, 4) for v in ("dit", "mask50")]
    assert all(r["status"] == "ok" and r["images_per_s"] > 0 and r["model"] == "tiny/2" for r in rows)
    assert report["max_batch"] == []  # no largest-batch search on a CPU
    text = (tiny_report[0] / "report.md").read_text()
    masked = {r["batch"]: r["speedup_vs_baseline"] for r in rows if r["variant"] == "mask50"}
    sentence = next(line for line in text.splitlines() if line.startswith("- `mask50`"))
    assert all(f"{ratio:.2f}× at {batch}" in sentence for batch, ratio in masked.items())


def test_charts_are_written(tiny_report):
    out, _ = tiny_report
    for name in ("throughput.png", "memory.png", "sampling.png", "sweep.png"):
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000, name


def test_a_cpu_report_carries_the_plan_of_each_row_on_a_gpu(tiny_report, report):
    from benchmarks.configs import ModelSpec, Variant
    from benchmarks.planned import row_config
    from maskdit_fast.plan.memory import plan_memory

    rows = report["train"]
    assert report["settings"]["plan"] is True  # auto: on off CUDA
    for r in rows:
        assert r["planned_peak_gib"] > 0 and set(r["planned_largest_micro_batch"]) == {"a100-80gb", "h100-80gb"}
    first = rows[0]
    again = plan_memory(row_config(ModelSpec.parse(first["model"]), Variant.parse(first["variant"], "cpu"),
                                   first["batch"]), 1, first["batch"])
    assert again.peak / 2**30 == first["planned_peak_gib"] and again.device == "cuda" and again.precision == "bf16"
    text = (tiny_report[0] / "report.md").read_text()
    assert "Planned on a GPU by the memory planner" in text
    assert f"| `{first['variant']}` | {first['planned_peak_gib']:.3g} | " in text


def test_plan_row_finds_the_largest_power_of_two_that_fits(monkeypatch):
    import benchmarks.planned as planned
    from benchmarks.configs import ModelSpec, Variant
    from maskdit_fast.plan.memory import plan_memory

    # a GPU of 40 MiB: the tiny model's planned peak grows past it somewhere below 1024
    monkeypatch.setattr(planned, "DEFAULT_RESERVE_GB", 0.0)
    small = planned.gpu_named("a100-80gb", memory_gb=40 / 1024)
    monkeypatch.setattr(planned, "gpu_named", lambda name: small)
    spec, variant = ModelSpec.parse("tiny/2"), Variant.parse("mask50", "cpu")
    largest = planned.plan_row(spec, variant, 2)["planned_largest_micro_batch"]["h100-80gb"]
    peak = lambda m: plan_memory(planned.row_config(spec, variant, 1024), 1, m).peak  # noqa: E731
    assert 0 < largest < 1024 and peak(largest) <= small.memory_bytes < peak(2 * largest)
