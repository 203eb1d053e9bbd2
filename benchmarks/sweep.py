"""The batch sweep's arithmetic: where MaskDiT's speed advantage over the same-policy DiT appears
or vanishes as the per-device batch grows, and the largest batch that fits a memory budget.

Both are plain functions of measured rows or of a step function, so that they are tested without
a GPU (``tests/benchmarks/test_sweep.py``); ``benchmarks/run.py`` feeds them real training steps.
"""
from __future__ import annotations

from collections.abc import Callable

import torch


def fits_by_trying(step: Callable[[int], float], budget_gib: float) -> Callable[[int], bool]:
    """``fits(batch)``: runs ``step(batch)`` (a few training steps at that batch, returning their peak
    memory in GiB) and says whether it ran within ``budget_gib``; running out of device memory
    (``torch.cuda.OutOfMemoryError``) is "does not fit", any other error propagates."""
    def fits(batch: int) -> bool:
        try:
            return step(batch) <= budget_gib
        except torch.cuda.OutOfMemoryError:
            return False

    return fits


def largest_batch(fits: Callable[[int], bool], start: int = 8, limit: int = 4096) -> tuple[int, list[tuple[int, bool]]]:
    """The largest batch in [1, ``limit``] for which ``fits(batch)`` holds, found by trying.

    Assumes that memory grows with the batch (a batch that does not fit makes every larger one
    fail): doubles from ``start`` until a batch fails or ``limit`` fits, then bisects between the
    last batch that fitted and the first that failed, to within 1/16 of the answer (each try builds
    a model and runs steps: exact to the image is not worth the minutes). Returns (batch, tries):
    batch 0 when not even batch 1 fits; tries: every (batch, fitted) in the order tried.
    """
    if not 1 <= start <= limit:
        raise ValueError(f"need 1 <= start <= limit, got start={start}, limit={limit}")
    tries: list[tuple[int, bool]] = []

    def attempt(batch: int) -> bool:
        tries.append((batch, fits(batch)))
        return tries[-1][1]

    good, bad, batch = 0, None, start
    while bad is None:
        if attempt(batch):
            good = batch
            if batch == limit:
                return good, tries
            batch = min(2 * batch, limit)
        else:
            bad = batch
    while bad - good > max(1, good // 16):
        middle = (good + bad) // 2
        if attempt(middle):
            good = middle
        else:
            bad = middle
    return good, tries


def crossover(points: list[tuple[int, float]], name: str, baseline: str) -> str:
    """One sentence on where ``name`` is faster than ``baseline``, from (batch, speed ratio) points
    (ratio = name's images/s over baseline's, same policy) in any order."""
    points = sorted(points)
    if not points:
        return f"`{name}` vs `{baseline}`: no batch where both ran and may be compared"
    ratios = ", ".join(f"{ratio:.2f}× at {batch}" for batch, ratio in points)
    faster = [ratio > 1 for _, ratio in points]
    if all(faster):
        return f"`{name}` is faster than `{baseline}` at every batch swept ({ratios})"
    if not any(faster):
        return f"`{name}` is never faster than `{baseline}` at the batches swept ({ratios})"
    changes = []
    for (b0, r0), (b1, r1), now in zip(points, points[1:], faster[1:]):
        if (r0 > 1) != now:
            what = "appears" if now else "vanishes"
            changes.append(f"its advantage {what} between batch {b0} ({r0:.2f}×) and {b1} ({r1:.2f}×)")
    return f"`{name}` vs `{baseline}`: " + "; ".join(changes) + f" ({ratios})"
