"""Counting the bytes a training step holds, storage by storage, as an allocator would see them.

:class:`MemoryTracker` is a dispatch mode: every tensor an op returns is looked at, each new storage
is counted (rounded up as the CUDA caching allocator rounds, 512 bytes) until it is freed (a weak
reference's callback), and every storage carries one category. The live total's maximum is the
peak; at the peak the tracker keeps the bytes of each category, the phase and the innermost module
that was running. It works on fake tensors (no storage is ever allocated) as on real ones.

Categories: parameters (and buffers) of the trained network, its gradients, the optimizer's states,
the EMA copy, activations (what the forward pass creates and still holds: mostly the tensors autograd
saved for the backward pass), temporaries (what the backward pass and the optimizer create besides
gradients and states: gradients of activations, workspaces), and under FSDP the gathered (unsharded)
parameters and gradient reduce buffers in flight.

Why not torch's ``MemTracker``: it does the same storage counting, but updates every module's peak
on every op, which at XL/2 (1000+ modules, thousands of ops per step) made two fake MaskDiT-XL/2
steps take 49 s in an earlier probe on this project's 2-vCPU VM; this tracker keeps one running
total per category, and a whole plan of two such steps takes about 2-3 s there.
"""
from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._guards import active_fake_mode
from torch.distributed._tools.mod_tracker import ModTracker
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._sharding_prop import ShardingPropagator
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_iter

CATEGORIES = ("parameters", "gradients", "optimizer", "ema", "activations", "temporaries", "fsdp_gathered")
CUDA_ROUNDING = 512  # the CUDA caching allocator hands out multiples of 512 bytes


def storages(t: torch.Tensor) -> Iterator[torch.UntypedStorage]:
    """The storages behind ``t``: its own, or for a wrapper subclass (a DTensor) its inner tensors'."""
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        for name in names:
            inner = getattr(t, name)
            if isinstance(inner, torch.Tensor):
                yield from storages(inner)
    else:
        yield t.untyped_storage()


@dataclass
class Peak:
    """The peak of a tracked region: ``bytes`` in all, ``by_category`` at that moment, the ``phase``
    and ``module`` (fully qualified name of the innermost running module, '' outside any) then."""

    bytes: int = 0
    by_category: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    phase: str = ""
    module: str = ""


class _Entry:
    __slots__ = ("bytes", "category", "ref")

    def __init__(self, nbytes: int, category: str):
        self.bytes, self.category, self.ref = nbytes, category, None


class MemoryTracker(TorchDispatchMode):
    """Use as ``with MemoryTracker() as tracker:``, around code that may run under a FakeTensorMode
    entered before it. Set the phase with :meth:`phase`; give storages made outside the tracker
    (parameters, the EMA) or whose role is known later (gradients, optimizer states) their category
    with :meth:`assign`. ``rounding``: allocation granularity in bytes (1 = exact tensor bytes)."""

    def __init__(self, rounding: int = CUDA_ROUNDING):
        super().__init__()
        self.rounding = rounding
        self.current = dict.fromkeys(CATEGORIES, 0)
        self.live = 0
        self.peak = Peak()
        self.phase_peaks: dict[str, Peak] = {}
        self._entries: dict[int, _Entry] = {}  # id of a live storage -> its entry
        self._phase = "setup"
        self._override: str | None = None
        self._paused = False
        self._modules = ModTracker()
        self._original_resize = torch.UntypedStorage.resize_

    # ------------------------------------------------------------------ what the caller says
    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Ops inside run in phase ``name`` (forward | backward | optimizer | ema | ...): new storages
        of the forward pass are activations, of any other phase temporaries."""
        previous, self._phase = self._phase, name
        try:
            yield
        finally:
            self._phase = previous

    @contextlib.contextmanager
    def category(self, name: str) -> Iterator[None]:
        """Storages created inside get category ``name`` whatever the phase (FSDP's all-gathers)."""
        previous, self._override = self._override, name
        try:
            yield
        finally:
            self._override = previous

    def assign(self, tensors: Iterable[Any], category: str) -> None:
        """Count the storages of ``tensors`` (non-tensors are skipped) as ``category`` from now on."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                for st in storages(t):
                    self._track(st, category, retag=True)

    def bytes_of(self, category: str) -> int:
        return self.current[category]

    # ------------------------------------------------------------------ counting
    def _size(self, st: torch.UntypedStorage) -> int:
        n = st.nbytes()
        return -(-n // self.rounding) * self.rounding

    def _track(self, st: torch.UntypedStorage, category: str, retag: bool = False) -> None:
        key = id(st)
        entry = self._entries.get(key)
        if entry is not None and entry.ref is not None and entry.ref() is st:
            size = self._size(st)
            if size != entry.bytes:  # resized in place (FSDP frees and refills unsharded parameters so)
                self._add(entry.category, size - entry.bytes)
                entry.bytes = size
            if retag and entry.category != category:
                self._add(entry.category, -entry.bytes)
                self._add(category, entry.bytes)
                entry.category = category
            return
        entry = _Entry(self._size(st), category)
        entry.ref = weakref.ref(st, self._freed(key, entry))
        self._entries[key] = entry
        self._add(category, entry.bytes)

    def _freed(self, key: int, entry: _Entry):
        def callback(_ref: weakref.ref) -> None:
            if self._entries.get(key) is entry:
                del self._entries[key]
            self._add(entry.category, -entry.bytes)
        return callback

    def _add(self, category: str, nbytes: int) -> None:
        self.current[category] += nbytes
        self.live += nbytes
        if nbytes > 0:
            best = self.phase_peaks.get(self._phase)
            if best is None or self.live > best.bytes:
                self.phase_peaks[self._phase] = snapshot = self._snapshot()
                if self.live > self.peak.bytes:
                    self.peak = snapshot

    def _snapshot(self) -> Peak:
        parents = self._modules.parents - {"Global"}  # ModTracker's name for "outside every module"
        module = max(parents, key=lambda name: (name.count("."), len(name))) if parents else ""
        phase = self._phase
        if phase == "forward" and self._modules.is_bw:  # activation checkpointing recomputes in the backward pass
            phase = "backward"
        return Peak(self.live, dict(self.current), phase, module)

    def _resized(self, st: torch.UntypedStorage, size: int) -> None:
        self._original_resize(st, size)
        entry = self._entries.get(id(st))
        if entry is not None and entry.ref is not None and entry.ref() is st:
            self._track(st, entry.category)
        elif size > 0:
            self._track(st, self._new_category())

    def _new_category(self) -> str:
        if self._override is not None:
            return self._override
        if self._phase == "forward" and not self._modules.is_bw:
            return "activations"
        return "temporaries"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t is DTensor for t in types):
            return NotImplemented  # let DTensor run its local ops: those are what holds memory
        out = func(*args, **(kwargs or {}))
        if self._paused or active_fake_mode() is not self._fake_mode:
            return out
        category = self._new_category()
        for t in tree_iter(out):
            if isinstance(t, torch.Tensor):
                for st in storages(t):
                    self._track(st, category)
        return out

    def __enter__(self) -> MemoryTracker:
        self._fake_mode = active_fake_mode()  # None on real tensors
        self._modules.__enter__()
        self._unpatch = _pause_in_sharding_propagation(self)
        tracker = self

        def resize_(st: torch.UntypedStorage, size: int):  # not an op: the dispatch mode does not see it
            tracker._resized(st, size)

        torch.UntypedStorage.resize_ = resize_
        super().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        torch.UntypedStorage.resize_ = self._original_resize
        self._unpatch()
        self._modules.__exit__(*exc)



def _pause_in_sharding_propagation(tracker: MemoryTracker) -> Callable[[], None]:
    """DTensor works out an op's output shape by running it on fake tensors of the global shapes, in the
    fake mode it finds active: under the planner's fake mode those would count as allocations that a
    real run never makes (it uses a fake mode of its own). The tracker pauses there. Returns the undo."""
    propagator = ShardingPropagator
    original = getattr(propagator, "_propagate_tensor_meta_non_cached", None)
    if original is None:  # another torch: DTensor ops' shape propagation is counted (a small over-count)
        return lambda: None

    def propagate(self, *args: Any, **kwargs: Any) -> Any:
        paused, tracker._paused = tracker._paused, True
        try:
            return original(self, *args, **kwargs)
        finally:
            tracker._paused = paused

    propagator._propagate_tensor_meta_non_cached = propagate

    def undo() -> None:
        propagator._propagate_tensor_meta_non_cached = original

    return undo
