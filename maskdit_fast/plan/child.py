"""The planner as a child process of the trainer (``train.micro_batch=auto``, :mod:`.auto`): reads a
request as JSON on stdin, writes the answer as JSON on stdout.

Request: ``config`` (a config as a dict), ``world_size``, ``capacity`` and ``reserve`` (bytes),
``device`` (``cuda`` | ``cpu``: the code path to plan), ``keep`` (a micro-batch to keep if it fits,
or null), ``first_mask_ratio`` (the mask ratio of the run's first steps). Answer: ``micro_batch``
(0: none fits), ``plan`` (its :class:`~.memory.MemoryPlan` as a dict: the run's most demanding
phase), ``first_peak`` (the planned peak of the first steps, which the trainer checks), ``tried``
(micro-batch -> planned peak), ``capacity``, ``reserve``, ``kept``.
"""
from __future__ import annotations

import json
import sys

from ..config import config_from_dict
from .memory import plan_memory
from .search import largest_micro_batch


def main() -> int:
    request = json.loads(sys.stdin.read())
    cfg = config_from_dict(request["config"])
    world_size, capacity, reserve, device = (request[k] for k in ("world_size", "capacity", "reserve", "device"))
    keep = request.get("keep")
    share = cfg.train.global_batch // world_size
    plan, tried, kept = None, {}, False
    if keep and share % keep == 0:
        plan = plan_memory(cfg, world_size, keep, device=device)
        tried[keep] = plan.peak
        kept = plan.peak + reserve <= capacity
    if not kept:
        fit = largest_micro_batch(cfg, world_size, capacity, reserve, device=device)
        plan, tried = fit.plan, {**tried, **fit.tried}
    first_peak = None
    if plan is not None:
        first = request.get("first_mask_ratio", plan.mask_ratio)
        first_peak = plan.peak if first == plan.mask_ratio else \
            plan_memory(cfg, world_size, plan.micro_batch, device=device, mask_ratio=first).peak
    print(json.dumps({"micro_batch": plan.micro_batch if plan else 0, "plan": plan.to_dict() if plan else None,
                      "first_peak": first_peak, "tried": tried, "capacity": capacity, "reserve": reserve,
                      "kept": kept}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
