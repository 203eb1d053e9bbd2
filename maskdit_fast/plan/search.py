"""The largest micro-batch that fits a GPU, found by bisection on fake training steps."""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass

from ..config import Config, config_to_dict
from .memory import MemoryPlan, plan_memory


def divisors(n: int) -> list[int]:
    """The divisors of ``n``, ascending: the micro-batch sizes a share of ``n`` samples can be cut into."""
    return [d for d in range(1, n + 1) if n % d == 0]


class PlanCache:
    """:func:`plan_memory` that runs each (config, ranks, micro-batch, code path) once: pass it as
    :func:`largest_micro_batch`'s ``plan`` when several searches share probes."""

    def __init__(self) -> None:
        self._plans: dict[tuple, MemoryPlan] = {}

    def __call__(self, cfg: Config, world_size: int, micro_batch: int, device: str = "cuda") -> MemoryPlan:
        key = (json.dumps(config_to_dict(cfg), sort_keys=True), world_size, micro_batch, device)
        if key not in self._plans:
            self._plans[key] = plan_memory(cfg, world_size, micro_batch, device=device)
        return self._plans[key]


@dataclass
class Fit:
    """The largest micro-batch of ``candidates`` whose planned peak plus ``reserve`` stays within
    ``capacity`` (0: none fits), its plan (None if none fits), and every plan the bisection ran."""

    micro_batch: int
    plan: MemoryPlan | None
    capacity: int
    reserve: int
    tried: dict[int, int]  # micro-batch -> planned peak (bytes)


def largest_micro_batch(cfg: Config, world_size: int, capacity: int, reserve: int, device: str = "cuda",
                        activation_checkpointing: bool | None = None,
                        plan: Callable[..., MemoryPlan] = plan_memory) -> Fit:
    """Bisect over the divisors of this rank's share of ``train.global_batch`` for the largest
    micro-batch that fits: ``peak + reserve <= capacity`` (bytes). Among the sizes that accumulate
    (two or more micro-batches per step) the peak grows with the micro-batch (activations scale with it);
    the whole share, one micro-batch per step, frees the gradients before its forward pass and can peak
    lower than half of it. So it is tried first, alone, and the others by bisection: about
    log2(number of divisors) fake runs.
    ``activation_checkpointing``: plan with it on or off (None: as configured)."""
    if activation_checkpointing is not None:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train,
                                                                 activation_checkpointing=activation_checkpointing))
    share = cfg.train.global_batch // world_size
    candidates = divisors(share)
    tried: dict[int, int] = {}
    plans: dict[int, MemoryPlan] = {}

    def fits(m: int) -> bool:
        plans[m] = plan(cfg, world_size, m, device=device)
        tried[m] = plans[m].peak
        return plans[m].peak + reserve <= capacity

    lo, hi = -1, len(candidates)  # candidates[lo] fits (-1: none known), candidates[hi] does not
    if fits(candidates[-1]):  # the whole share fits: the common case, one run
        lo = len(candidates) - 1
    else:
        hi = len(candidates) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(candidates[mid]):
            lo = mid
        else:
            hi = mid
    best = candidates[lo] if lo >= 0 else 0
    return Fit(best, plans.get(best), capacity, reserve, tried)
