"""The largest-micro-batch bisection, on synthetic planners whose peak is a + b * micro_batch (plus the
held gradients of the sizes that accumulate): the answer against a brute-force scan, the edge cases
(nothing fits, everything fits) and its cost."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from maskdit_fast.plan.search import divisors, largest_micro_batch
from tests.helpers import tiny_config

FIXED, PER_SAMPLE, RESERVE = 1000, 100, 50  # bytes: a made-up peak = FIXED + PER_SAMPLE * micro_batch


class LinearPlanner:
    """A stand-in for ``plan_memory`` that records every call."""

    def __init__(self):
        self.calls: list[tuple[int, int, str, bool]] = []

    def peak(self, cfg, world_size, micro_batch) -> int:
        return FIXED + PER_SAMPLE * micro_batch

    def __call__(self, cfg, world_size, micro_batch, device="cuda"):
        self.calls.append((world_size, micro_batch, device, cfg.train.activation_checkpointing))
        return SimpleNamespace(peak=self.peak(cfg, world_size, micro_batch), micro_batch=micro_batch)


class HeldGradientsPlanner(LinearPlanner):
    """As the real plans go: a size that accumulates holds the first micro-batches' gradients through the
    next forward passes, so the whole share (one micro-batch, gradients freed first) can peak lower
    than half of it."""

    GRADIENTS = 40 * PER_SAMPLE

    def peak(self, cfg, world_size, micro_batch) -> int:
        share = cfg.train.global_batch // world_size
        return super().peak(cfg, world_size, micro_batch) + (self.GRADIENTS if micro_batch < share else 0)


def capacity_for(micro_batch: int) -> int:
    """The capacity in which ``micro_batch`` just fits."""
    return FIXED + PER_SAMPLE * micro_batch + RESERVE


def test_divisors():
    assert divisors(12) == [1, 2, 3, 4, 6, 12]
    assert divisors(1) == [1]
    assert divisors(7) == [1, 7]


@pytest.mark.parametrize("planner_type", [LinearPlanner, HeldGradientsPlanner])
@pytest.mark.parametrize("global_batch,world_size", [(48, 1), (64, 1), (96, 4), (30, 2)])
def test_bisection_finds_what_a_scan_finds_for_every_capacity(global_batch, world_size, planner_type):
    cfg = tiny_config(f"train.global_batch={global_batch}")
    candidates = divisors(global_batch // world_size)
    peaks = {m: planner_type().peak(cfg, world_size, m) for m in candidates}
    for capacity in range(FIXED + RESERVE, max(peaks.values()) + RESERVE + PER_SAMPLE, PER_SAMPLE // 4):
        planner = planner_type()
        fit = largest_micro_batch(cfg, world_size, capacity, RESERVE, plan=planner)
        fitting = [m for m in candidates if peaks[m] + RESERVE <= capacity]
        assert fit.micro_batch == max(fitting, default=0), capacity
        # every probe is a divisor of this rank's share, planned once, at this world size
        probed = [m for _, m, _, _ in planner.calls]
        assert len(probed) == len(set(probed)) and set(probed) <= set(candidates)
        assert {w for w, *_ in planner.calls} == {world_size}
        assert fit.tried == {m: peaks[m] for m in probed}
        assert len(probed) <= 1 + math.ceil(math.log2(len(candidates)))


def test_the_largest_fitting_divisor_and_its_plan():
    cfg = tiny_config("train.global_batch=48")  # divisors 1 2 3 4 6 8 12 16 24 48
    planner = LinearPlanner()
    fit = largest_micro_batch(cfg, 1, capacity_for(13), RESERVE, device="cpu", plan=planner)
    assert fit.micro_batch == 12 and fit.plan.micro_batch == 12
    assert (fit.capacity, fit.reserve) == (capacity_for(13), RESERVE)
    assert {device for _, _, device, _ in planner.calls} == {"cpu"}
    assert len(planner.calls) <= 1 + math.ceil(math.log2(10))


def test_nothing_fits():
    planner = LinearPlanner()
    fit = largest_micro_batch(tiny_config("train.global_batch=64"), 1, capacity_for(1) - 1, RESERVE, plan=planner)
    assert fit.micro_batch == 0 and fit.plan is None
    assert 1 in fit.tried  # the answer rests on the smallest size's plan


def test_everything_fits_in_one_probe():
    planner = LinearPlanner()
    fit = largest_micro_batch(tiny_config("train.global_batch=64"), 2, capacity_for(32), RESERVE, plan=planner)
    assert fit.micro_batch == 32 and [m for _, m, _, _ in planner.calls] == [32]


@pytest.mark.parametrize("configured", ["false", "true"])
def test_activation_checkpointing_is_planned_as_asked(configured):
    cfg = tiny_config(f"train.activation_checkpointing={configured}", "train.global_batch=16")
    for asked in (True, False, None):
        planner = LinearPlanner()
        largest_micro_batch(cfg, 1, capacity_for(5), RESERVE, activation_checkpointing=asked, plan=planner)
        expected = (configured == "true") if asked is None else asked
        assert {ac for *_, ac in planner.calls} == {expected}
