"""Which rows of a report may be divided by which: the policy of a row and the one-change rule.

Every row states how it ran, in five *aspects*:

    arch        dit | maskdit | maskNN (the architecture and how much of it is masked)
    precision   the autocast dtype (bf16 | fp16 | off) and the residual stream's dtype, MEASURED
                by forward hooks on the blocks (``benchmarks.measure.residual_stream_dtype``)
    attention   the attention backend (sdpa, flash2, ...)
    kernels     this package's Triton kernels on or off
    compile     torch.compile on or off

A ratio (speed-up, memory) is only taken between two rows of the same model and batch that differ
in exactly one aspect, the one being compared. Each row names the row it is compared with: a
MaskDiT row the ``dit`` row with the same settings (added to the run when missing: the same-policy
baseline), a DiT row the DiT row with its last setting undone (``dit+kernels+compile`` ->
``dit+kernels`` -> ``dit``). If the two measured rows differ in more than that one aspect, most
often because the residual stream of one runs in another dtype than the other's under the same
autocast, the comparison is refused: no ratio, and the reason in the table and the summary.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .configs import BASELINE, Variant

ASPECTS = ("arch", "precision", "attention", "kernels", "compile")
AUTOCAST = {"bf16": "bf16", "fp16": "fp16", "fp32": "off"}  # a variant's precision -> its autocast dtype


@dataclass(frozen=True)
class Policy:
    """How one row ran (see the module docstring); ``residual_dtype`` None: not measured (it failed)."""

    arch: str  # the variant's head: dit | maskdit | maskNN
    autocast: str
    residual_dtype: str | None
    attention: str
    kernels: bool
    compile: bool

    def value(self, aspect: str) -> str:
        """The aspect in words, e.g. ``autocast bf16, residual bfloat16`` for precision."""
        if aspect == "precision":
            return f"autocast {self.autocast}, residual {self.residual_dtype or 'unmeasured'}"
        if aspect in ("kernels", "compile"):
            return "on" if getattr(self, aspect) else "off"
        return str(getattr(self, aspect))

    def differences(self, other: Policy) -> list[str]:
        """The aspects (in ``ASPECTS`` order) in which ``other`` differs from this policy."""
        return [aspect for aspect in ASPECTS if self.value(aspect) != other.value(aspect)]


@dataclass(frozen=True)
class Comparison:
    """The verdict on dividing a row by its baseline: ``ok`` with the one ``aspect`` compared, or not."""

    ok: bool
    aspect: str | None  # the aspect compared (None: the row is its own baseline, or refused)
    note: str  # "" when ok; else why there is no ratio, in words


def compare(row: Policy, baseline: Policy | None, expected: str | None) -> Comparison:
    """Judge dividing ``row`` by ``baseline``, which was chosen to differ in ``expected`` only
    (None: the row is its own baseline). ``expected`` outside ``ASPECTS`` (e.g. ``guidance``, a
    setting of the workload, not of the policy): the policies must be equal. ``baseline`` None:
    that row is missing or failed."""
    if expected is None:
        return Comparison(True, None, "")
    if baseline is None:
        return Comparison(False, None, "its baseline did not run")
    diffs = baseline.differences(row)
    wanted = [expected] if expected in ASPECTS else []
    if diffs == wanted:
        return Comparison(True, expected, "")
    if not diffs:
        return Comparison(False, None, f"same policy as its baseline, although the {expected} should differ")
    detail = "; ".join(f"{a}: {baseline.value(a)} vs {row.value(a)}" for a in diffs if a != expected)
    return Comparison(False, None, f"differs from its baseline in {' and '.join(diffs)}, not only in {expected} "
                                   f"({detail})")


def _head(variant: Variant) -> str:
    if variant.arch == "dit":
        return "dit"
    return f"mask{round(variant.mask_ratio * 100):02d}" if variant.mask_ratio > 0 else "maskdit"


def rebuilt(variant: Variant, device_type: str, **changes) -> Variant:
    """``variant`` with some settings changed (``arch_head``, ``kernels``, ``attention``, ``compile``,
    ``precision``), under its canonical name."""
    fields = {"arch_head": _head(variant), "kernels": variant.kernels, "attention": variant.attention,
              "compile": variant.compile, "precision": variant.precision, **changes}
    text = "+".join([fields["arch_head"]] + ["kernels"] * fields["kernels"] + [fields["attention"]]
                    + ["compile"] * fields["compile"] + [fields["precision"]])
    return Variant.parse(text, device_type)


def intended_baseline(variant: Variant, device_type: str) -> tuple[Variant, str] | None:
    """The variant ``variant`` is compared with and the one aspect in which they differ; None for
    the baseline ``dit`` itself (or any DiT with every setting at its default)."""
    if variant.arch != "dit":
        return rebuilt(variant, device_type, arch_head="dit"), "arch"
    default = Variant.parse(BASELINE, device_type)
    for aspect, undo in (("compile", {"compile": False}), ("attention", {"attention": default.attention}),
                         ("kernels", {"kernels": False}), ("precision", {"precision": default.precision})):
        base = rebuilt(variant, device_type, **undo)
        if base.name != variant.name:
            return base, aspect
    return None


def with_same_policy_baselines(variants: Sequence[Variant], device_type: str) -> list[Variant]:
    """``variants`` with the DiT variant of each MaskDiT variant's settings placed before it (moved
    up if it comes later, added if missing), so that every MaskDiT row has a same-policy baseline
    measured first."""
    placed: dict[str, Variant] = {}
    for variant in variants:
        found = intended_baseline(variant, device_type)
        if variant.arch != "dit" and found is not None:
            placed.setdefault(found[0].name, found[0])
        placed.setdefault(variant.name, variant)
    return list(placed.values())
