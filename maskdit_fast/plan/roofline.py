"""A roofline lower bound on the time of a training step, counted without a GPU.

:class:`OpCounter` watches every aten (and custom) op of a step run on fake or real tensors and
tallies, per phase, the FLOPs of its matmuls / convolutions / attention and the bytes it must move
from and to memory at least. :func:`step_time_bound` turns a count into time on a :class:`GPU`:
each op takes at least ``max(flops / peak, bytes / bandwidth)``, and the step at least the sum.

This is a LOWER bound, not an estimate: no kernel reaches the data-sheet peaks, consecutive ops do
not overlap perfectly, kernel launches and host work cost time, and collectives (FSDP / DDP
communication) are left out. A measured step is slower; ``measured / bound`` says by how much.

:func:`maskdit_fast.plan.memory.plan_memory` counts the last of its fake training steps with an
``OpCounter`` when given one; ``python -m benchmarks.plan`` prints the bound of the planned run.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch._guards import active_fake_mode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from .gpus import GPU

if torch.distributed.is_available():
    from torch.distributed.tensor import DTensor
else:  # builds without torch.distributed have no DTensor to step aside for
    DTensor = None

aten = torch.ops.aten
DEFAULT_PHASE = "other"

# Ops that allocate or re-describe memory without reading or writing its contents. Views, in-place
# view ops (t_, resize_, ...) and metadata queries are found from their schema (see _plan_for).
_FREE = {aten._unsafe_view, aten.lift_fresh, aten.set_, aten.empty, aten.empty_like, aten.empty_strided,
         aten.new_empty, aten.new_empty_strided, aten.empty_permuted}
# Waiting for a collective; wrapping its output for autograd.
_FREE_NAMES = {"_c10d_functional::wait_tensor", "c10d_functional::wait_tensor",
               "_c10d_functional::_wrap_tensor_autograd"}
# Ops that read only the shape and dtype of their tensor argument, then write a new tensor.
_SHAPE_ONLY = {aten.zeros_like, aten.ones_like, aten.full_like, aten.rand_like, aten.randn_like, aten.randint_like,
               aten.new_zeros, aten.new_ones, aten.new_full}
# In-place ops that overwrite their first argument without reading it.
_OVERWRITES = {aten.copy_, aten.fill_, aten.zero_, aten.normal_, aten.uniform_, aten.bernoulli_,
               aten.exponential_, aten.random_, aten._foreach_copy_, aten._foreach_zero_}
# Fused Adam(W) writes the gradients back only when it unscales them (grad_scale given).
_GRADS_WRITTEN_WITH_SCALE = {aten._fused_adam_, aten._fused_adamw_}
_COLLECTIVE_NAMESPACES = {"c10d", "_c10d_functional", "_c10d_functional_autograd", "c10d_functional"}
_DTYPE_TAGS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


def _attention_flops(query, key, value, *args, out_val=None, **kwargs) -> int:
    """Fused attention forward, q (B,H,Lq,E), k (B,Hk,Lk,E), v (B,Hk,Lk,Ev): Q K^T and P V."""
    b, h, lq, e = query.shape
    lk, ev = key.shape[-2], value.shape[-1]
    return 2 * b * h * lq * lk * (e + ev)


def _attention_backward_flops(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
    """Fused attention backward: Q K^T recomputed, dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q."""
    b, h, lq, e = query.shape
    lk, ev = key.shape[-2], value.shape[-1]
    return 2 * b * h * lq * lk * (3 * e + 2 * ev)


# torch.utils.flop_counter's registry (mm, addmm, bmm, baddbmm, convolutions and their backward, the CUDA
# attention kernels) plus the CPU flash attention that a fake-tensor step on CPU runs in their place.
_OWN_FLOPS: dict[object, Callable[..., int]] = {
    aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward_flops,
}


def _is_tensor_type(schema_type: object) -> bool:
    return "Tensor" in str(schema_type)


@dataclass(frozen=True)
class _OpPlan:
    """How to count one op overload, worked out once from its schema.

    ``reads`` / ``writes``: (position, name) of the tensor arguments read / written; ``fresh``: the
    indices of the returns that are new tensors (written); ``single``: one return (not a tuple).
    """

    reads: tuple[tuple[int, str], ...]
    writes: tuple[tuple[int, str], ...]
    fresh: tuple[int, ...]
    single: bool
    flops: Callable[..., int] | None
    collective: bool
    grads_written_with_scale: bool


def _plan_for(func: torch._ops.OpOverload) -> _OpPlan | None:
    """The counting plan of ``func``, or None when it moves no data (a view, an allocation, a query)."""
    packet = func._overloadpacket
    schema = func._schema
    namespace = schema.name.split("::", 1)[0]
    if func.is_view or torch.Tag.inplace_view in func.tags or packet in _FREE or schema.name in _FREE_NAMES:
        return None
    writes = tuple((i, a.name) for i, a in enumerate(schema.arguments)
                   if a.alias_info is not None and a.alias_info.is_write)
    fresh = tuple(i for i, r in enumerate(schema.returns) if _is_tensor_type(r.type) and r.alias_info is None)
    if not writes and not fresh:  # returns no new tensor and writes nothing: a metadata query, .item()
        return None
    overwritten = schema.arguments[0].name if packet in _OVERWRITES else None
    reads = () if packet in _SHAPE_ONLY else tuple(
        (i, a.name) for i, a in enumerate(schema.arguments)
        if _is_tensor_type(a.type) and not a.is_out and a.name != overwritten)
    return _OpPlan(reads, writes, fresh, len(schema.returns) == 1,
                   _OWN_FLOPS.get(packet) or flop_registry.get(packet),
                   namespace in _COLLECTIVE_NAMESPACES, packet in _GRADS_WRITTEN_WITH_SCALE)


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the elements ``t`` addresses: a broadcast (stride 0) dimension holds one element."""
    stride = t.stride()
    if 0 not in stride:
        return t.numel() * t.element_size()
    n = t.element_size()
    for size, step in zip(t.shape, stride):
        if step:
            n *= size
    return n


def _bytes(x: object) -> int:
    if isinstance(x, torch.Tensor):
        return tensor_bytes(x)
    if isinstance(x, (list, tuple)):
        return sum(tensor_bytes(t) for t in x if isinstance(t, torch.Tensor))
    return 0


def _first_dtype(args: Sequence[object]) -> str:
    for a in args:
        if isinstance(a, torch.Tensor):
            return _DTYPE_TAGS.get(a.dtype, str(a.dtype).removeprefix("torch."))
    return "none"


@dataclass(frozen=True)
class OpRecord:
    """Calls of one op with the same phase, matmul dtype, FLOPs and bytes: each call does ``flops``
    FLOPs and moves ``bytes`` bytes; ``dtype`` is the input dtype of ops with FLOPs, else None."""

    phase: str
    op: str
    dtype: str | None
    flops: int
    bytes: int
    count: int


class OpCounter(TorchDispatchMode):
    """Counts the FLOPs and the minimum memory traffic of every op run inside it, per phase.

    Enter it inside a ``FakeTensorMode`` (entered outside one, it sees no op), or use it on real
    tensors::

        with FakeTensorMode():
            ...build the model and inputs...
            with OpCounter() as counter:
                with counter.phase("forward"):
                    loss = ...
                with counter.phase("backward"):
                    loss.backward()

    FLOPs: matmuls, convolutions and attention (2 per multiply-add, backward variants included; the
    formulas of ``torch.utils.flop_counter`` plus the CPU flash attention); element-wise work is
    not counted (memory-bound). Bytes: every tensor argument the op reads and every tensor it writes
    (new outputs, arguments it mutates), each by the elements it addresses; views, allocations and
    metadata queries move nothing; an in-place op reads and writes its target (``copy_``, ``fill_``,
    ``zero_`` and random fills only write it); list arguments (``_foreach_*``, ``_fused_adamw_``)
    count every tensor. Custom ops (``maskdit::*``) count like any op. Collectives (``c10d``) are kept
    apart in :attr:`collectives` and are not in :meth:`records`. Under DTensor the local shard ops
    are counted (this mode steps aside for DTensor and for its sharding propagation).

    Calls are aggregated by (phase, op, dtype, flops, bytes), so that a bound per call stays exact
    while the tally stays small.
    """

    def __init__(self) -> None:
        super().__init__()
        self._phase = DEFAULT_PHASE
        self._plans: dict[torch._ops.OpOverload, _OpPlan | None] = {}
        self._counts: dict[tuple[str, torch._ops.OpOverload, str | None, int, int], int] = {}
        self._collectives: dict[tuple[str, torch._ops.OpOverload], list[int]] = {}
        self._fake_mode: object = None

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Attribute the ops run inside to phase ``name`` (e.g. forward, backward, optimizer, ema)."""
        previous, self._phase = self._phase, name
        try:
            yield
        finally:
            self._phase = previous

    def __enter__(self) -> OpCounter:
        self._fake_mode = active_fake_mode()  # ops under another fake mode are DTensor's propagation
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if DTensor is not None and DTensor in types:
            return NotImplemented  # let DTensor run its local ops, which come back here
        out = func(*args, **kwargs)
        try:
            plan = self._plans[func]
        except KeyError:
            plan = self._plans[func] = _plan_for(func)
        if plan is None or active_fake_mode() is not self._fake_mode:
            return out
        n = len(args)
        moved = 0
        for i, name in plan.reads:
            moved += _bytes(args[i] if i < n else kwargs.get(name))
        for i, name in plan.writes:
            if plan.grads_written_with_scale and name == "grads" and kwargs.get("grad_scale") is None:
                continue
            moved += _bytes(args[i] if i < n else kwargs.get(name))
        for j in plan.fresh:
            moved += _bytes(out if plan.single else out[j])
        if plan.collective:
            tally = self._collectives.setdefault((self._phase, func), [0, 0])
            tally[0] += 1
            tally[1] += moved
            return out
        flops, dtype = 0, None
        if plan.flops is not None:
            flops = plan.flops(*args, **kwargs, out_val=out)
            dtype = _first_dtype(args)
        key = (self._phase, func, dtype, flops, moved)
        self._counts[key] = self._counts.get(key, 0) + 1
        return out

    def records(self) -> list[OpRecord]:
        """The tally: one record per (phase, op, dtype, FLOPs, bytes), in first-seen order."""
        return [OpRecord(phase, _op_name(func), dtype, flops, moved, count)
                for (phase, func, dtype, flops, moved), count in self._counts.items()]

    def flops(self, phase: str | None = None) -> int:
        """FLOPs counted (in ``phase``, or in all)."""
        return sum(r.flops * r.count for r in self.records() if phase in (None, r.phase))

    def bytes(self, phase: str | None = None) -> int:
        """Bytes counted (in ``phase``, or in all), collectives excluded."""
        return sum(r.bytes * r.count for r in self.records() if phase in (None, r.phase))

    @property
    def phases(self) -> list[str]:
        """The phases seen, in first-seen order."""
        return list(dict.fromkeys(phase for phase, *_ in self._counts))

    @property
    def collectives(self) -> dict[str, dict[str, int]]:
        """Collective ops seen, ``"phase/op" -> {"count", "bytes"}`` (the tensors they read and write
        locally); not part of :meth:`records` nor of the bound."""
        return {f"{phase}/{_op_name(func)}": {"count": count, "bytes": moved}
                for (phase, func), (count, moved) in self._collectives.items()}


def _op_name(func: torch._ops.OpOverload) -> str:
    return str(func).removesuffix(".default")


def matmul_peak(gpu: GPU, dtype: str, tf32: bool) -> float:
    """The dense peak (FLOP/s) a matmul in ``dtype`` runs at: bf16 / fp16 on the tensor cores, fp32 at
    the TF32 tensor-core peak when ``tf32`` (``torch.backends.cuda.matmul.allow_tf32``) else at the
    FP32 peak; fp64 at the FP32 figure (on A100 / H100 / H200 the data sheets give the same number for
    FP64 tensor cores)."""
    if dtype in ("bf16", "fp16"):
        return gpu.matmul_flops(dtype)
    if dtype == "fp32":
        return gpu.matmul_flops("tf32" if tf32 else "fp32")
    if dtype == "fp64":
        return gpu.matmul_flops("fp32")
    raise ValueError(f"no peak for matmuls in {dtype} on {gpu.name}: the GPU table knows bf16, fp16, fp32 / tf32")


@dataclass(frozen=True)
class OpTime:
    """One op's share of the bound, summed over its calls."""

    name: str
    count: int
    flops: int
    bytes: int
    seconds: float


@dataclass(frozen=True)
class PhaseBound:
    """The bound of one phase: ``seconds`` = sum over ops of max(compute, memory)."""

    seconds: float
    flops: int
    bytes: int
    compute_seconds: float
    memory_seconds: float


@dataclass(frozen=True)
class RooflineBound:
    """A LOWER bound on the time of the counted ops on ``gpu`` (seconds).

    ``seconds`` = sum over op calls of max(flops / matmul peak, bytes / HBM bandwidth): every kernel at
    the data-sheet peak of whichever resource limits it, no launch overhead, no gaps, no communication.
    ``compute_seconds`` / ``memory_seconds``: all FLOPs at the peak / all bytes at the bandwidth (each
    alone a weaker lower bound); ``compute_bound_share``: the share of ``seconds`` spent in ops whose
    FLOPs take longer than their bytes. ``collectives``: what :attr:`OpCounter.collectives` saw, not
    included in any time.
    """

    gpu: str
    tf32: bool
    seconds: float
    flops: int
    bytes: int
    compute_seconds: float
    memory_seconds: float
    compute_bound_share: float
    phases: dict[str, PhaseBound]
    top_ops: list[OpTime]
    collectives: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain nested dict (for JSON)."""
        return asdict(self)


def step_time_bound(counter: OpCounter, gpu: GPU, tf32: bool = True, top: int = 10) -> RooflineBound:
    """A LOWER bound on the time of the ops ``counter`` saw, on one ``gpu``.

    Per op call: max(flops / peak(dtype), bytes / ``gpu.hbm_bytes_per_s``), peak from
    :func:`matmul_peak` (``tf32``: fp32 matmuls run as TF32, the trainer's ``train.tf32=true``).
    Summed per phase and in all; ``top`` ops by time. No real step is this fast (see the module
    docstring); for a run, compare a measurement with it as measured / bound.
    """
    bandwidth = gpu.hbm_bytes_per_s
    phases: dict[str, list[float]] = {}  # seconds, flops, bytes, compute, memory
    ops: dict[str, list[float]] = {}  # count, flops, bytes, seconds
    compute_bound = 0.0
    for r in counter.records():
        compute = r.flops / matmul_peak(gpu, r.dtype, tf32) if r.flops else 0.0
        memory = r.bytes / bandwidth
        seconds = max(compute, memory) * r.count
        if compute > memory:
            compute_bound += seconds
        p = phases.setdefault(r.phase, [0.0, 0, 0, 0.0, 0.0])
        p[0] += seconds
        p[1] += r.flops * r.count
        p[2] += r.bytes * r.count
        p[3] += compute * r.count
        p[4] += memory * r.count
        o = ops.setdefault(r.op, [0, 0, 0, 0.0])
        o[0] += r.count
        o[1] += r.flops * r.count
        o[2] += r.bytes * r.count
        o[3] += seconds
    by_phase = {name: PhaseBound(s, int(f), int(b), c, m) for name, (s, f, b, c, m) in phases.items()}
    total = sum(p.seconds for p in by_phase.values())
    top_ops = sorted((OpTime(name, int(c), int(f), int(b), s) for name, (c, f, b, s) in ops.items()),
                     key=lambda o: -o.seconds)[:top]
    return RooflineBound(
        gpu=gpu.name, tf32=tf32, seconds=total,
        flops=sum(p.flops for p in by_phase.values()), bytes=sum(p.bytes for p in by_phase.values()),
        compute_seconds=sum(p.compute_seconds for p in by_phase.values()),
        memory_seconds=sum(p.memory_seconds for p in by_phase.values()),
        compute_bound_share=compute_bound / total if total else 0.0,
        phases=by_phase, top_ops=top_ops, collectives=counter.collectives)


def images_per_s(bound_s: float, global_batch: int) -> float:
    """Images per second when a step of ``bound_s`` seconds trains ``global_batch`` images.

    For data parallelism pass the per-GPU step time (all GPUs step at once) and the global batch;
    with gradient accumulation, ``bound_s`` must cover all micro-batches of the step. An upper bound
    on throughput when ``bound_s`` is a lower bound on time."""
    return global_batch / bound_s


def gpu_hours(bound_s_per_step: float, steps: int, gpus: int) -> float:
    """GPU-hours of ``steps`` steps of ``bound_s_per_step`` seconds each on ``gpus`` GPUs (wall time x
    GPUs); a lower bound when the step time is."""
    return bound_s_per_step * steps * gpus / 3600
