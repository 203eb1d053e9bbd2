"""Per-GPU memory of the real training step, from fake tensors: no GPU and no memory needed.

:func:`plan_memory` builds the network, its EMA copy, the parallel wrapper and the optimizer as the
trainer does (:mod:`maskdit_fast.train`), and runs whole training steps (forward and backward of
every micro-batch under autocast, the optimizer, the EMA update) under PyTorch's FakeTensorMode,
counting storages with :class:`~maskdit_fast.plan.tracker.MemoryTracker`. Step 2 is the steady
state: the optimizer's states exist from step 1 on.

**The CUDA code path, as far as it goes without a GPU.** For ``device="cuda"`` (the default) the
step takes the choices a CUDA run takes: bf16 autocast (``train.precision=auto``), the Triton ops
(whose fake implementations return, and whose autograd saves, what the real kernels do), a fused
AdamW, 512-byte allocation rounding, and under FSDP real ``fully_shard`` on a fake process group of
``world_size`` ranks (this process plays rank 0). The tensors themselves live on a fake *CPU*
device: PyTorch's autograd engine needs a CUDA driver to run a backward pass on (even fake) CUDA
tensors. What that changes (docs/planning.md measures each):

- autocast follows the CPU's op lists; for the ops of these models both cast the same ops
  (matmuls, convolutions and attention to bf16);
- attention runs PyTorch's SDPA on the CPU, whose flash kernel saves what CUDA's flash kernels save
  (the output and a float32 log-sum-exp per query; FlashAttention 2/3 and cuDNN's do likewise);
- DDP is not run but emulated: its gradient buckets hold every gradient from the start
  (``gradient_as_bucket_view``), so the gradients are allocated before the first forward pass and
  never freed; the all-reduce works in place;
- ``train.optimizer=apex_fused_adam`` is planned as torch's fused AdamW (apex needs a GPU): the
  same moments, plus AdamW's step count per tensor (4 bytes each);
- the caching allocator's fragmentation, the CUDA context and library workspaces are not counted:
  the planner keeps back a reserve for them (:data:`~maskdit_fast.plan.gpus.DEFAULT_RESERVE_GB`).

``device="cpu"`` plans the CPU path as a CPU run takes it (fp32 unless set, the PyTorch references,
foreach AdamW, exact bytes): what the tests compare with real allocations.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.tensor import DTensor

import kernels

from ..config import Config, ModelConfig
from ..data.sampler import split_global_batch
from ..diffusion.edm import build_net
from ..models.precision import autocast_for, resolve_precision
from ..train.ema import EMA
from ..train.loop import MicroBatch
from ..train.objective import maskdit_objective
from ..train.optimizer import build_optimizer
from ..train.parallel import clip_grad_norm, parallelize
from .roofline import OpCounter
from .tracker import CUDA_ROUNDING, MemoryTracker, Peak

STATE_CATEGORIES = ("parameters", "gradients", "optimizer", "ema")


@dataclass
class MemoryPlan:
    """What one GPU (rank 0) holds in a training step. Bytes throughout; ``peak`` is the largest live
    total of the planned steps (``steps[i]``: step i+1's), ``at_peak`` its parts by category with the
    ``peak_phase`` / ``peak_module`` / ``peak_step`` it happened in; ``phase_peaks``: the largest live
    total within each phase; ``saved_activations``: what the last micro-batch's forward pass left for
    its backward pass (activations at the end of the forward); ``state``: parameters, gradients,
    optimizer states and EMA after the last step's backward pass (sharded sizes under FSDP);
    ``fallbacks``: where the planned path differs from a real CUDA run; ``measured``: a real run's
    ``torch.cuda.max_memory_allocated`` (``fake=False`` on CUDA), else None."""

    arch: str
    size: str
    mask_ratio: float
    micro_batch: int
    accumulation: int
    world_size: int
    parallel: str
    precision: str
    kernels: str
    activation_checkpointing: bool
    device: str
    parameters: int
    peak: int
    at_peak: dict[str, int]
    peak_phase: str
    peak_module: str
    peak_step: int
    steps: list[int]
    phase_peaks: dict[str, int]
    saved_activations: int
    state: dict[str, int]
    fallbacks: list[str] = field(default_factory=list)
    seconds: float = 0.0
    measured: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def plan_memory(cfg: Config, world_size: int = 1, micro_batch: int | None = None, device: str = "cuda",
                steps: int = 2, fake: bool = True, mask_ratio: float | None = None,
                counter: OpCounter | None = None) -> MemoryPlan:
    """Run ``steps`` training steps of ``cfg`` on fake tensors as rank 0 of ``world_size`` and return
    what it holds. ``micro_batch``: samples per forward pass (None: ``train.micro_batch``, else the
    whole share of the global batch); a step runs two micro-batches when it has two or more (the second
    one already finds the first one's gradients: the steady state of any number). ``device``: the code
    path planned, ``cuda`` or ``cpu`` (module docstring). ``fake=False`` runs the same steps on real
    tensors of ``device`` instead (one process; what the tests and the GPU check compare a plan with;
    on CUDA the plan then also holds ``torch.cuda.max_memory_allocated`` as ``measured``). ``mask_ratio``: MaskDiT's
    ratio in the planned steps; None: that of the run's phase that needs the most memory (unmasked,
    when the run has unmasked steps: every token then goes through the encoder). ``counter``: counts
    the ops of the last step (:mod:`.roofline`; its phases are those of the plan), when given."""
    if not fake and world_size > 1:
        raise ValueError("a real run (fake=False) runs one process only")
    if not fake and device == "cuda" and not torch.cuda.is_available():
        raise ValueError("a real run (fake=False) on cuda needs a CUDA device; plan it with fake=True")
    t = cfg.train
    configured = t.micro_batch if isinstance(t.micro_batch, int) else None  # auto: what is planned here
    micro, accumulation = split_global_batch(t.global_batch, world_size, micro_batch or configured)
    target = torch.device(device)
    precision = resolve_precision(t.precision, target)
    if mask_ratio is None:
        mask_ratio = cfg.model.mask_ratio if t.unmasked_steps == 0 else 0.0
    backend, fallbacks = _kernel_backend(cfg.model.kernels, device)
    if t.parallel == "ddp" and world_size > 1:
        fallbacks.append("DDP emulated: gradients held from the start as in its buckets, no reducer run")
    if t.optimizer == "apex_fused_adam":
        fallbacks.append("apex FusedAdam planned as torch's fused AdamW: the same two moments per parameter; "
                         "AdamW adds a 4-byte step count per tensor")
    started = time.perf_counter()
    tensors = torch.device("cpu") if fake else target  # where the step's tensors live
    if tensors.type == "cuda":
        torch.cuda.reset_peak_memory_stats(tensors)
    with kernels.backend(backend), _fake_process_group(t.parallel, world_size), \
            FakeTensorMode() if fake else contextlib.nullcontext(), \
            MemoryTracker(CUDA_ROUNDING if device == "cuda" else 1) as tracker, _fsdp_instrumented(tracker):
        peaks, saved, state, count = _run_steps(cfg, tracker, world_size, micro, accumulation, precision, target,
                                                tensors, steps, mask_ratio, counter)
    peak = tracker.peak
    return MemoryPlan(
        arch=cfg.model.arch, size=_size_name(cfg), mask_ratio=mask_ratio, micro_batch=micro, accumulation=accumulation,
        world_size=world_size, parallel=t.parallel if world_size > 1 else "none", precision=precision,
        kernels=backend, activation_checkpointing=t.activation_checkpointing, device=device, parameters=count,
        peak=peak.bytes, at_peak=peak.by_category, peak_phase=peak.phase, peak_module=peak.module,
        peak_step=1 + max(range(len(peaks)), key=lambda i: peaks[i].bytes), steps=[p.bytes for p in peaks],
        phase_peaks={k: v.bytes for k, v in tracker.phase_peaks.items() if k != "setup"},
        saved_activations=saved, state=state, fallbacks=fallbacks, seconds=time.perf_counter() - started,
        measured=torch.cuda.max_memory_allocated(tensors) if tensors.type == "cuda" else None)


def _size_name(cfg: Config) -> str:
    m = cfg.model
    return f"{m.size or f'{m.hidden_size}x{m.depth}'}/{m.patch_size}"


def _kernel_backend(requested: str, device: str) -> tuple[str, list[str]]:
    """The fused ops' backend the planned run uses: what ``model.kernels`` gives on ``device``."""
    if requested == "reference" or (requested == "auto" and device != "cuda"):
        return "reference", []
    if kernels.triton_available():
        return "triton", []
    return "reference", ["Triton does not import here: the fused ops are planned as their PyTorch references, "
                         "which save more for the backward pass than the kernels"]


@contextlib.contextmanager
def _fake_process_group(parallel: str, world_size: int) -> Iterator[None]:
    """A process group of ``world_size`` ranks whose collectives do nothing, as this process's default
    group, for FSDP's real sharding (``fsdp`` with several ranks only)."""
    if parallel != "fsdp" or world_size == 1:
        yield
        return
    if dist.is_initialized():
        raise RuntimeError("plan_memory runs FSDP on a fake process group of its own: call it in a process "
                           "without one (the trainer runs the planner in a child process)")
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _run_steps(cfg: Config, tracker: MemoryTracker, world_size: int, micro: int, accumulation: int, precision: str,
               device: torch.device, tensors: torch.device, steps: int, mask_ratio: float, counter: OpCounter | None
               ) -> tuple[list[Peak], int, dict[str, int], int]:
    """The trainer's objects and steps (see :func:`maskdit_fast.train.loop.train_loop`) for the code path of
    ``device``, on tensors of ``tensors`` (fake CPU tensors, or real ones)."""
    t, m = cfg.train, cfg.model
    net = _built(m, tensors).train()
    ema = EMA(net, t.ema_decay, t.ema_warmup, average=_built(m, tensors))
    count = sum(p.numel() for p in net.parameters())
    emulate_ddp = t.parallel == "ddp" and world_size > 1
    wrapped = parallelize(net, ema.model, _without_ddp(cfg) if emulate_ddp else cfg, precision, tensors,
                          world_size, accumulation)
    tracker.assign([*net.parameters(), *net.buffers()], "parameters")  # after sharding: the shards
    tracker.assign([*ema.model.parameters(), *ema.model.buffers()], "ema")
    if emulate_ddp:
        for p in net.parameters():
            p.grad = torch.zeros_like(p)
        _assign_gradients(net, tracker)
    _tag_gradients(net, tracker)
    # apex's FusedAdam (CUDA only) keeps the same two moments: planned as the fused AdamW (module docstring)
    optimizer = build_optimizer([{"params": list(net.parameters())}], dataclasses.replace(t, optimizer="adamw"), device)
    scaler = torch.amp.GradScaler(tensors.type, enabled=precision == "fp16")
    loss_fn = maskdit_objective(cfg, lambda step: mask_ratio)
    autocast = autocast_for(precision, tensors)
    simulated = min(accumulation, 2)
    labels = m.num_classes > 0
    peaks, saved = [], 0
    for step in range(steps):
        counting = counter if step == steps - 1 else None
        tracker.peak = Peak()
        for j in range(simulated):
            images = torch.randn(micro, m.in_channels, m.input_size, m.input_size, device=tensors)
            batch = MicroBatch(j, torch.arange(micro), images,
                               torch.zeros(micro, dtype=torch.long, device=tensors) if labels else None)
            with _phase(tracker, counting, "forward"), autocast:
                loss, _ = loss_fn(wrapped, batch, step)
            saved = tracker.bytes_of("activations")
            with _phase(tracker, counting, "backward"):
                scaler.scale(loss / accumulation).backward()
            del loss
        _assign_gradients(net, tracker)
        with _phase(tracker, counting, "optimizer"):
            if t.grad_clip > 0:
                scaler.unscale_(optimizer)
                clip_grad_norm(net.parameters(), t.grad_clip)
            _scaled_step(scaler, optimizer, unscaled=t.grad_clip > 0)
            scaler.update()
        tracker.assign([v for s in optimizer.state.values() for v in s.values()], "optimizer")
        state = {c: tracker.bytes_of(c) for c in STATE_CATEGORIES}
        optimizer.zero_grad(set_to_none=not emulate_ddp)
        with _phase(tracker, counting, "ema"):
            ema.update(wrapped, step)
        peaks.append(tracker.peak)
    tracker.peak = max(peaks, key=lambda p: p.bytes)
    return peaks, saved, state, count


def _built(model: ModelConfig, device: torch.device) -> torch.nn.Module:
    """A new network, on ``device`` (built on the CPU: fake tensors are built there and cannot move)."""
    net = build_net(model)
    return net if device.type == "cpu" else net.to(device)


@contextlib.contextmanager
def _phase(tracker: MemoryTracker, counter: OpCounter | None, name: str) -> Iterator[None]:
    """Phase ``name`` of the step for the tracker, and for the counter (counting inside only) if given."""
    with tracker.phase(name), (counter if counter is not None else contextlib.nullcontext()), \
            (counter.phase(name) if counter is not None else contextlib.nullcontext()):
        yield


def _scaled_step(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, unscaled: bool) -> None:
    """``scaler.step(optimizer)``, but for an optimizer that takes no inf flag (foreach AdamW: the CPU
    path under fp16) the scaler reads the flag's value (``.item()``), which a fake tensor has none of:
    unscale and step as the scaler does when no inf is found (the same allocations)."""
    if not scaler.is_enabled() or getattr(optimizer, "_step_supports_amp_scaling", False):
        scaler.step(optimizer)  # fused AdamW checks the flag on the device
        return
    if not unscaled:
        scaler.unscale_(optimizer)
    optimizer.step()


def _without_ddp(cfg: Config) -> Config:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, parallel="none"))


def _tag_gradients(net: torch.nn.Module, tracker: MemoryTracker) -> None:
    """Gradients are counted as such the moment autograd stores them (FSDP: :func:`_fsdp_instrumented`)."""
    for p in net.parameters():
        if p.requires_grad and not isinstance(p, DTensor):
            p.register_post_accumulate_grad_hook(lambda p: tracker.assign([p.grad], "gradients"))


def _assign_gradients(net: torch.nn.Module, tracker: MemoryTracker) -> None:
    tracker.assign([p.grad for p in net.parameters() if p.grad is not None], "gradients")


@contextlib.contextmanager
def _fsdp_instrumented(tracker: MemoryTracker) -> Iterator[None]:
    """FSDP2's all-gathers (unsharded parameters) and reduce-scatters run in its parameter groups'
    methods: what they allocate is counted as gathered in flight, the sharded gradients they leave
    as gradients. (The class's methods are wrapped for the block, as torch's FSDPMemTracker does.)"""
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    originals = {name: getattr(FSDPParamGroup, name) for name in ("unshard", "wait_for_unshard", "post_backward")}

    def wrapped(name: str):
        def method(self, *args, **kwargs):
            with tracker.category("fsdp_gathered"):
                out = originals[name](self, *args, **kwargs)
            if name == "post_backward":
                tracker.assign([p.sharded_param.grad for p in self.fsdp_params], "gradients")
            return out
        return method

    for name in originals:
        setattr(FSDPParamGroup, name, wrapped(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(FSDPParamGroup, name, original)
