"""``train.micro_batch=auto``: the trainer picks the largest micro-batch the planner says fits the
device it runs on, logs the choice and the plan's figures, and checks the real peak of the first two
steps against the plan.

The planner runs in a child process (``python -m maskdit_fast.plan.child``): it enters fake tensor
modes, forces the kernel backend and, for FSDP, makes a fake process group of its own, none of which
may touch the training process. Rank 0 plans; the other ranks receive its choice.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..config import Config, config_to_dict
from ..dist import Dist
from ..errors import UserError
from .gpus import DEFAULT_RESERVE_GB, GIB
from .tracker import MemoryTracker

log = logging.getLogger(__name__)
MISMATCH = 0.10  # the real peak may differ from the plan by this much before a warning


def device_capacity(device: torch.device) -> int:
    """Bytes the run may use: the GPU's free memory now (this process's CUDA context already taken),
    or the machine's available memory for a CPU run."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def plan_in_child(request: dict[str, Any]) -> dict[str, Any]:
    """Run :func:`maskdit_fast.plan.child.main` on ``request`` in a fresh interpreter; its JSON answer."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "PET_"))
           and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                         "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE")}
    root = str(Path(__file__).resolve().parents[2])  # a source checkout runs without an install too
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    done = subprocess.run([sys.executable, "-m", "maskdit_fast.plan.child"], input=json.dumps(request),
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"the memory planner failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout)


def choose_micro_batch(cfg: Config, env: Dist, saved: int | None, first_mask_ratio: float) -> dict[str, Any]:
    """Collective: rank 0's answer of the planner (:mod:`.child`; every rank gets it) for
    ``train.micro_batch=auto`` on ``env``'s device: ``micro_batch``, its ``plan``, ``first_peak`` (the
    planned peak of the first steps, run at ``first_mask_ratio``). ``saved``: the size a resumed state
    was trained with; kept when it still fits, so the resumed run draws the same numbers."""
    answer: list[Any] = [None]
    if env.is_main:
        capacity = device_capacity(env.device)
        request = {"config": config_to_dict(cfg), "world_size": env.world_size, "capacity": capacity,
                   "reserve": int(DEFAULT_RESERVE_GB * GIB), "device": env.device.type, "keep": saved,
                   "first_mask_ratio": first_mask_ratio}
        answer[0] = plan_in_child(request)
    if env.world_size > 1:
        dist.broadcast_object_list(answer, src=0)
    result = answer[0]
    if result["micro_batch"] == 0:
        raise UserError(f"train.micro_batch=auto: not even a micro-batch of 1 fits {env.device} "
                        f"({result['capacity'] / GIB:.2f} GiB free, 1 sample plans "
                        f"{result['tried'].get('1', 0) / GIB:.2f} GiB + {result['reserve'] / GIB:.2f} GiB reserve); "
                        "use train.parallel=fsdp, train.activation_checkpointing=true or more GPUs")
    if env.is_main:
        plan = result["plan"]
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in plan["at_peak"].items() if v)
        tried = ", ".join(f"{m}: {p / GIB:.2f}" for m, p in sorted(result["tried"].items(), key=lambda kv: int(kv[0])))
        log.info("train.micro_batch=auto: %d samples per forward pass, %d per step and process; planned peak "
                 "%.2f GiB (%s) of %.2f GiB available on %s, %.2f GiB kept back%s; planned peaks tried (GiB): %s",
                 result["micro_batch"], plan["accumulation"], plan["peak"] / GIB, parts, result["capacity"] / GIB,
                 env.device, result["reserve"] / GIB, " (the resumed state's size, which still fits)"
                 if result.get("kept") else "", tried)
    return result


class MemoryCheck:
    """The real peak of the first two steps against the plan's: a warning when they differ by more
    than :data:`MISMATCH`. CUDA: ``torch.cuda.max_memory_allocated``; CPU: the tensors' storages as
    the planner counts them (:class:`MemoryTracker` on real tensors; the process's RSS would count
    the interpreter and the libraries too)."""

    def __init__(self, planned: int, device: torch.device, steps: int = 2):
        self.planned, self.device, self.steps = planned, device, steps
        self._tracker: MemoryTracker | None = None
        self._left = steps

    def start(self, tensors: list[torch.Tensor]) -> None:
        """Before the first step; ``tensors``: what the step finds allocated (parameters, EMA, states)."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        self._tracker = MemoryTracker(rounding=1).__enter__()
        self._tracker.assign(tensors, "parameters")

    def after_step(self) -> None:
        """After each step; the check runs after the last of the first ``steps``."""
        if self._left <= 0:
            return
        self._left -= 1
        if self._left:
            return
        if self._tracker is not None:
            self._tracker.__exit__(None, None, None)
            real = self._tracker.peak.bytes
        else:
            real = torch.cuda.max_memory_allocated(self.device)
        self.report(real)

    def close(self) -> None:
        """The run ended (or failed) before the check: stop counting."""
        if self._tracker is not None and self._left > 0:
            self._tracker.__exit__(None, None, None)
            self._left = 0

    def report(self, real: int) -> None:
        change = real / self.planned - 1
        message = (f"train.micro_batch=auto: the first {self.steps} steps peaked at {real / GIB:.3f} GiB, the plan said "
                   f"{self.planned / GIB:.3f} GiB ({change:+.1%})")
        if abs(change) > MISMATCH:
            log.warning("%s: more than %.0f%% apart; the choice may not fit (or waste memory): please report it",
                        message, MISMATCH * 100)
        else:
            log.info("%s", message)
