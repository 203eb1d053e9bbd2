"""Processes and devices: torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)
-> a process group (NCCL for CUDA tensors, gloo for CPU ones) and this process's device."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .config import ConfigError

BACKSTOP_S = 60.0  # the process group's timeout exceeds train.collective_timeout_s by this: the loop's watchdog reports first


@dataclass(frozen=True)
class Dist:
    """Where this process stands: rank among ``world_size`` processes, its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_ranks() -> tuple[int, int, int]:
    """(rank, world size, local rank) set by torchrun; (0, 1, 0) for a plain ``python`` launch."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def select_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` -> a device; CUDA picks GPU ``local_rank`` (one GPU per process)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        return device
    return torch.device(name)


def init_distributed(device_name: str, timeout_s: float | None = None) -> tuple[Dist, bool]:
    """Join (or create) the default process group. Returns (this process, whether we created the
    group, so the caller destroys it). Under torchrun the group spans its processes; in a plain
    ``python`` launch it is a group of one (in-memory store), so ddp/fsdp also run in one process.
    ``timeout_s`` (``train.collective_timeout_s``): a collective that waits longer fails (gloo raises,
    NCCL's watchdog aborts), :data:`BACKSTOP_S` later than the training loop's own watchdog reports."""
    rank, world_size, local_rank = env_ranks()
    device = select_device(device_name, local_rank)
    if dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), device), False
    # CUDA tensors go through NCCL; CPU tensors (checkpoint metadata, CPU offload) through gloo.
    backend = "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"
    device_id = device if device.type == "cuda" else None
    timeout = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s + BACKSTOP_S)}
    if "RANK" in os.environ and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's agent keeps one store across restarts, and init_process_group's keys carry no restart
        # count: a restarted rank could read a dead peer's gloo address and give up. One prefix per restart.
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                              is_master=False, timeout=timedelta(seconds=timeout_s + BACKSTOP_S if timeout_s else 1800))
        store = dist.PrefixStore(f"maskdit_fast/restart_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, device_id=device_id,
                                **timeout)
    elif "RANK" in os.environ:
        dist.init_process_group(backend, device_id=device_id, **timeout)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, device_id=device_id, **timeout)
    return Dist(dist.get_rank(), dist.get_world_size(), device), True


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the processes (``x`` itself without a process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= dist.get_world_size()
    return x


def any_rank(flag: bool, device: torch.device) -> bool:
    """Collective: whether ``flag`` is set on any process (``flag`` itself without a process group)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    x = torch.full((1,), float(flag), device=device)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return bool(x.item() > 0)


@contextmanager
def processes(parallel: str, device_name: str, choices: str = "", timeout_s: float | None = None) -> Iterator[Dist]:
    """This process of a run with ``train.parallel=parallel``. ``none``: one plain process (a
    torchrun launch of several is refused, naming ``choices``, the parallel modes the run takes);
    ``auto`` (sampling): the process group when torchrun launched several processes or one exists,
    else one plain process; otherwise the default process group, joined or created, and destroyed
    on exit if created here (``timeout_s``: its collectives' timeout, see :func:`init_distributed`)."""
    if parallel == "auto":
        parallel = "join" if env_ranks()[1] > 1 or dist.is_initialized() else "none"
    if parallel == "none":
        world_size = env_ranks()[1]
        if world_size > 1:
            raise ConfigError(f"train.parallel: none, but {world_size} processes were launched (torchrun); "
                              f"set {choices}")
        yield Dist(0, 1, select_device(device_name))
        return
    env, created = init_distributed(device_name, timeout_s)
    try:
        yield env
    finally:
        if created:
            dist.destroy_process_group()
