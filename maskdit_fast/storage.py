"""Training state on disk for exact resume: sharded through ``torch.distributed.checkpoint`` (DCP),
committed atomically.

Layout of a run directory: ``checkpoints/step-XXXXXXX/`` is one DCP checkpoint (model, optimizer,
EMA and each rank's RNG states, one file per writing rank) plus ``meta.json`` (step, world size,
grad scaler, config). It is written as ``checkpoints/.tmp-step-XXXXXXX/`` by every rank and renamed
by rank 0 once all have finished, so every ``step-*`` directory is complete: a crash mid-write
leaves the previous checkpoint intact, and the newest ``step-*`` is the one to resume. DCP stores
global shapes, so a checkpoint loads into any number of processes (resharding). Multi-node runs
need the run directory on a filesystem all nodes share.

Earlier versions wrote single files ``step-XXXXXXX.pt``; :func:`load_training_state` still reads them.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from .dist import barrier
from .files import atomic_write

STEP_NAME = re.compile(r"^step-(\d+)(\.pt)?$")


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's RNG states: CPU, and its own GPU's when it has one."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def process_state(device: torch.device, loader_state: bytes | None) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of this process: its RNG states, plus a stateful loader's bytes
    (DALI's reader position) when there are any."""
    state = rng_state(device)
    if loader_state is not None:
        state["loader"] = torch.frombuffer(bytearray(loader_state), dtype=torch.uint8).clone()
    return state


def process_state_to_load(path: Path, rank_key: str, device: torch.device) -> dict[str, torch.Tensor]:
    """Tensors for :func:`load_into` to fill with the :func:`process_state` that ``rank_key`` saved in
    the checkpoint ``path`` (the loader's bytes at the length they were saved with)."""
    state = rng_state(device)
    saved = FileSystemReader(str(path)).read_metadata().state_dict_metadata.get(f"rng.{rank_key}.loader")
    if saved is not None:
        state["loader"] = torch.empty(saved.size, dtype=torch.uint8)
    return state


def restore_process_state(loaded: dict[str, Any], rank_key: str, device: torch.device) -> bytes | None:
    """Set this process's RNG from the ``rng`` entry of a state filled by :func:`load_into`; returns
    the saved loader bytes (None without them). A checkpoint written by fewer processes may have no
    entry for this rank: then nothing is set."""
    entry = loaded.get("rng", {}).get(rank_key)
    if entry is None:
        return None
    set_rng_state(entry, device)
    return entry["loader"].numpy().tobytes() if "loader" in entry else None


def _no_dist() -> bool:
    return not dist.is_initialized()


@contextmanager
def _single_process_quiet():
    """DCP warns on every call without a process group; one process is what we mean there."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_training_state(run_dir: Path, step: int, state: dict[str, Any], meta: dict[str, Any], keep_last: int,
                        is_main: bool) -> Path:
    """Collective: every rank writes its part of ``state`` (tensors, DTensor shards), rank 0 adds
    ``meta`` (JSON) and commits ``checkpoints/step-XXXXXXX`` by a rename, then keeps the newest
    ``keep_last`` checkpoints (0 = all)."""
    ckpt_dir = run_dir / "checkpoints"
    final, tmp = ckpt_dir / f"step-{step:07d}", ckpt_dir / f".tmp-step-{step:07d}"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash while writing this step
        tmp.mkdir(parents=True)
    barrier()
    with _single_process_quiet():  # returns once every rank's files and the metadata are written
        dcp.save(state, checkpoint_id=tmp, no_dist=_no_dist())
    if is_main:
        atomic_write(tmp / "meta.json", lambda p: p.write_text(json.dumps(meta, indent=1)))
        _commit(tmp, final)
        _retain(ckpt_dir, keep_last)
    barrier()
    return final


def _commit(tmp: Path, final: Path) -> None:
    if final.exists():  # the same step saved again (a run resumed from an earlier checkpoint)
        old = final.with_name(f".old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)


def _retain(ckpt_dir: Path, keep_last: int) -> None:
    """Delete checkpoints older than the newest ``keep_last`` and temporaries left by crashes."""
    for stale in ckpt_dir.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep_last > 0:
        for old in _checkpoints(ckpt_dir)[:-keep_last]:
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()


def _checkpoints(ckpt_dir: Path) -> list[Path]:
    """Committed checkpoints (DCP directories and legacy ``.pt`` files), oldest first."""
    found = [(int(m.group(1)), p) for p in ckpt_dir.glob("step-*") if (m := STEP_NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_training_state(run_dir: Path) -> Path | None:
    """The newest complete training state of a run, or None."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    found = _checkpoints(ckpt_dir) if ckpt_dir.is_dir() else []
    return found[-1] if found else None


def read_meta(path: Path) -> dict[str, Any]:
    """``meta.json`` of a DCP training state: step, world_size, scaler, config."""
    return json.loads((Path(path) / "meta.json").read_text())


def load_into(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    """Collective: fill ``state`` in place from the DCP checkpoint ``path``. ``state`` holds the
    tensors to fill, with this process's shapes and shardings (``get_state_dict`` of the wrapped
    model), so the checkpoint may come from another number of processes. RNG entries the checkpoint
    lacks (another device type, another world size) are dropped from ``state["rng"]``. Returns the meta."""
    saved = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    rng = {rank: {name: t for name, t in entries.items() if f"rng.{rank}.{name}" in saved}
           for rank, entries in state.pop("rng", {}).items()}
    rng = {rank: entries for rank, entries in rng.items() if entries}
    if rng:
        state["rng"] = rng
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=path, no_dist=_no_dist())
    return read_meta(path)


def load_training_state(path: Path, parts: tuple[str, ...] = ("model", "ema", "optimizer", "rng")) -> dict[str, Any]:
    """A training state as plain CPU tensors in one process, e.g. to inspect or export it: the meta
    (step, world_size, scaler, config) plus the ``parts`` asked for, nested as saved
    (``model``/``ema``: name -> tensor; ``optimizer``: ``{"state": {name: {"exp_avg", ...}}}``;
    ``rng``: ``{"rank0": {"cpu", ["cuda"]}, ...}``). Reads legacy ``.pt`` files whole."""
    path = Path(path)
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    saved = FileSystemReader(str(path)).read_metadata()
    flat = {key: torch.empty(m.size, dtype=m.properties.dtype) for key, m in saved.state_dict_metadata.items()
            if isinstance(m, TensorStorageMetadata) and saved.planner_data[key][0] in parts}
    if flat:
        with _single_process_quiet():
            dcp.load(flat, checkpoint_id=path, no_dist=True)
    state = read_meta(path)
    for key, tensor in flat.items():
        *outer, leaf = saved.planner_data[key]
        node = state
        for name in outer:
            node = node.setdefault(name, {})
        node[leaf] = tensor
    return state
