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
import logging
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem, FileSystemWriter
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

from .dist import barrier
from .errors import UserError
from .files import PARTIAL, atomic_write, disk_error, disk_full, free_bytes, size_text
from .integrity import DigestingStream, folder_damage, write_manifest
from .safe_pickle import SafeFileSystemReader

log = logging.getLogger(__name__)
STEP_NAME = re.compile(r"^step-(\d+)(\.pt)?$")
LEGACY_TEMP = re.compile(r"^\.(ema\.safetensors|metrics\.jsonl|meta\.json)\.[a-z0-9_]{8}$")  # earlier versions'
UNFINISHED = re.compile(r"^\.(tmp|old)-step-\d+$")


def remove_leftovers(run_dir: Path) -> None:
    """Delete what interrupted writes left in a run folder (its owner calls this at start):
    ``.*.partial`` files, ``.XXXXXXXX`` temporaries of earlier versions, unfinished checkpoints."""
    run_dir = Path(run_dir)
    for folder in (run_dir, run_dir / "samples", run_dir / "checkpoints", run_dir / "nonfinite", run_dir / "spikes"):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if path.is_file() and (path.name.endswith(PARTIAL) or LEGACY_TEMP.match(path.name)):
                path.unlink()
            elif path.is_dir() and UNFINISHED.match(path.name):
                committed = path.with_name(path.name.split("-", 1)[1])
                if path.name.startswith(".old-") and not committed.exists():  # a crash mid-replace: put it back
                    os.replace(path, committed)
                else:
                    shutil.rmtree(path, ignore_errors=True)


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
    saved = SafeFileSystemReader(path).read_metadata().state_dict_metadata.get(f"rng.{rank_key}.loader")
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


class DigestingFileSystem(FileSystem):
    """DCP's file system whose files written whole get their sha256 on the way (``digests``: file
    name -> (bytes, sha256)), for the manifest."""

    def __init__(self) -> None:
        super().__init__()
        self.digests: dict[str, tuple[int, str]] = {}

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[Any]:
        with super().create_stream(path, mode) as stream:
            if mode != "wb":
                yield stream
                return
            digesting = DigestingStream(stream)
            try:
                yield digesting
            finally:
                digesting.close()
            digest = digesting.digest()
            if digest is not None:
                self.digests[Path(path).name] = digest

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        super().rename(path, new_path)
        digest = self.digests.pop(Path(path).name, None)
        if digest is not None:
            self.digests[Path(new_path).name] = digest


def _digests_of_all_ranks(digests: dict[str, tuple[int, str]]) -> dict[str, tuple[int, str]]:
    """Collective: every rank's digests of the files it wrote, merged."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return digests
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, digests)
    return {name: digest for part in gathered for name, digest in part.items()}


def save_training_state(run_dir: Path, step: int, state: dict[str, Any], meta: dict[str, Any], keep_last: int,
                        is_main: bool) -> Path:
    """Collective: every rank writes its part of ``state`` (tensors, DTensor shards), rank 0 adds
    ``meta`` (JSON) and commits ``checkpoints/step-XXXXXXX`` by a rename, then keeps the newest
    ``keep_last`` checkpoints (0 = all)."""
    ckpt_dir = run_dir / "checkpoints"
    final, tmp = ckpt_dir / f"step-{step:07d}", ckpt_dir / f".tmp-step-{step:07d}"
    needed = state_bytes(state)
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash while writing this step
        tmp.mkdir(parents=True)
        if free_bytes(tmp) < needed:
            log.warning("%s: %s free, the training state needs at least %s: the write will fail", ckpt_dir,
                        size_text(free_bytes(tmp)), size_text(needed))
    barrier()
    try:
        writer = FileSystemWriter(tmp)
        writer.fs = DigestingFileSystem()  # hashes as it writes: the manifest needs no second pass
        with _single_process_quiet():  # returns once every rank's files and the metadata are written
            dcp.save(state, checkpoint_id=tmp, storage_writer=writer, no_dist=_no_dist())
        digests = _digests_of_all_ranks(writer.fs.digests)
        if is_main:
            atomic_write(tmp / "meta.json", lambda p: p.write_text(json.dumps(meta, indent=1)))
            write_manifest(tmp, digests)  # last: it covers every file above
    except (OSError, CheckpointException, UserError) as err:
        full = disk_error(err)
        if full is None:
            raise
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # the partial files; the committed states are untouched
        raise disk_full(final, full, needed) from None
    if is_main:
        _commit(tmp, final)
        _retain(ckpt_dir, keep_last)
    barrier()
    return final


def state_bytes(state: Any) -> int:
    """Bytes of the tensors in a (nested) state: a sharded tensor counts its global size, so this
    estimates the whole training state on disk."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


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
    """The newest committed training state of a run, or None (not checked: see :func:`latest_intact_training_state`)."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    found = _checkpoints(ckpt_dir) if ckpt_dir.is_dir() else []
    return found[-1] if found else None


def training_state_damage(path: Path) -> str | None:
    """What is wrong with the training state ``path`` (a file missing, truncated or changed since it
    was written), or None."""
    path = Path(path)
    if path.is_file():
        return None  # an earlier version's single file: no checksums
    if not (path / ".metadata").is_file():
        return ".metadata is missing"
    return folder_damage(path)


def latest_intact_training_state(run_dir: Path) -> Path | None:
    """Collective under torchrun (rank 0 checks, every rank gets its answer): the newest training
    state of a run whose files match their checksums, or None if it has none. Damaged newer ones are
    named in a warning; a UserError if every one is damaged."""
    chosen, problem = None, None
    if not dist.is_initialized() or dist.get_rank() == 0:
        ckpt_dir = Path(run_dir) / "checkpoints"
        for path in reversed(_checkpoints(ckpt_dir) if ckpt_dir.is_dir() else []):
            damage = training_state_damage(path)
            if damage is None:
                chosen = path
                break
            log.warning("%s is damaged (%s): skipped; delete it once the run has resumed", path, damage)
        newest = latest_training_state(run_dir)
        if chosen is None and newest is not None:
            problem = f"every training state in {Path(run_dir) / 'checkpoints'} is damaged; start a new run in another --out"
        elif chosen != newest:
            log.warning("resuming from %s, the newest complete training state", chosen)
    shared = [chosen, problem]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(shared, src=0)
    if shared[1] is not None:
        raise UserError(shared[1])
    return shared[0]


def read_meta(path: Path) -> dict[str, Any]:
    """``meta.json`` of a DCP training state: step, world_size, scaler, config."""
    return json.loads((Path(path) / "meta.json").read_text())


UNSAVED = "unsaved"  # key of the optimizer entries load_into set aside
WRAPPER_NAMES = {"module", "_orig_mod", "_checkpoint_wrapped_module"}  # DDP, compile, activation checkpointing


def _set_aside_unsaved_optimizer_state(state: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
    """Parameters that never had a gradient (the mask token of an unmasked run) have no optimizer
    state in a checkpoint, while ``get_state_dict`` of a fresh optimizer makes one for every
    parameter: set those entries aside (not loaded) for :func:`set_training_state`."""
    moments = state.get("optimizer", {}).get("state", {})
    unsaved = [fqn for fqn, entries in moments.items()
               if not any(f"optimizer.state.{fqn}.{key}" in saved for key in entries)]
    return {fqn: moments.pop(fqn) for fqn in unsaved}


def set_training_state(net: torch.nn.Module, optimizer: torch.optim.Optimizer, ema_model: torch.nn.Module,
                       state: dict[str, Any]) -> None:
    """Apply ``model``, ``optimizer`` and ``ema`` of a state filled by :func:`load_into` to the
    (wrapped, maybe sharded) objects. Parameters without saved optimizer state stay without one,
    as in the run that saved (AdamW makes it at their first gradient)."""
    optim = state["optimizer"]
    unsaved = optim.pop(UNSAVED, {})
    optim["state"].update(unsaved)  # placeholders: set_state_dict of some torch versions wants every entry
    set_state_dict(net, optimizer, model_state_dict=state["model"], optim_state_dict=optim)
    set_model_state_dict(ema_model, state["ema"])
    if unsaved:
        names = {p: ".".join(a for a in name.split(".") if a not in WRAPPER_NAMES) for name, p in net.named_parameters()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if names.get(p) in unsaved:
                    optimizer.state.pop(p, None)


def _dcp_load(state: dict[str, Any], path: Path, no_dist: bool) -> None:
    """``dcp.load`` through :class:`SafeFileSystemReader`; a refused pickle or a damaged file comes out
    as the user error it is, not wrapped in DCP's ``CheckpointException``."""
    try:
        with _single_process_quiet():
            dcp.load(state, storage_reader=SafeFileSystemReader(path), no_dist=no_dist)
    except CheckpointException as err:
        causes = [failure[0] for failure in err.failures.values()]
        for cause in causes:
            if isinstance(cause, UserError):
                raise cause from None
        for cause in causes:
            if isinstance(cause, (OSError, EOFError, pickle.UnpicklingError)):
                raise UserError(f"the training state {path} is damaged ({type(cause).__name__}: {cause}); "
                                "remove it and resume from an earlier one") from None
        raise


def load_into(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    """Collective: fill ``state`` in place from the DCP checkpoint ``path``. ``state`` holds the
    tensors to fill, with this process's shapes and shardings (``get_state_dict`` of the wrapped
    model), so the checkpoint may come from another number of processes. RNG entries the checkpoint
    lacks (another device type, another world size) are dropped from ``state["rng"]``. Returns the meta."""
    saved = SafeFileSystemReader(path).read_metadata().state_dict_metadata
    rng = {rank: {name: t for name, t in entries.items() if f"rng.{rank}.{name}" in saved}
           for rank, entries in state.pop("rng", {}).items()}
    rng = {rank: entries for rank, entries in rng.items() if entries}
    if rng:
        state["rng"] = rng
    unsaved = _set_aside_unsaved_optimizer_state(state, saved)
    _dcp_load(state, path, _no_dist())
    if "optimizer" in state:
        state["optimizer"][UNSAVED] = unsaved
    return read_meta(path)


def load_training_state(path: Path, parts: tuple[str, ...] = ("model", "ema", "optimizer", "rng")) -> dict[str, Any]:
    """A training state as plain CPU tensors in one process, e.g. to inspect or export it: the meta
    (step, world_size, scaler, config) plus the ``parts`` asked for, nested as saved
    (``model``/``ema``: name -> tensor; ``optimizer``: ``{"state": {name: {"exp_avg", ...}}}``;
    ``rng``: ``{"rank0": {"cpu", ["cuda"]}, ...}``). Reads legacy ``.pt`` files whole."""
    path = Path(path)
    if path.is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # weights_only refusals and damaged files alike: not loadable
            raise UserError(f"{path} is not a readable training state ({type(err).__name__}: "
                            f"{str(err).splitlines()[0]})") from None
    damage = training_state_damage(path)
    if damage is not None:
        raise UserError(f"the training state {path} is damaged ({damage}); use an earlier checkpoints/step-* of "
                        "the run, or its ema.safetensors")
    saved = SafeFileSystemReader(path).read_metadata()
    flat = {key: torch.empty(m.size, dtype=m.properties.dtype) for key, m in saved.state_dict_metadata.items()
            if isinstance(m, TensorStorageMetadata) and saved.planner_data[key][0] in parts}
    if flat:
        _dcp_load(flat, path, True)
    state = read_meta(path)
    for key, tensor in flat.items():
        *outer, leaf = saved.planner_data[key]
        node = state
        for name in outer:
            node = node.setdefault(name, {})
        node[leaf] = tensor
    return state
