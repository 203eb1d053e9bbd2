"""How things are measured: step times, peak memory, model FLOPs, the matmul peak, the machine.

- Time: on CUDA a pair of CUDA events around every call (launch gaps included, no host sync in
  between); on CPU a wall clock. Callers take the median.
- Memory: on CUDA ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` since
  :func:`reset_peak_memory`. On CPU there is no allocator to ask: "allocated" is the growth of
  the process's peak resident set (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``)
  over its size at the reset, "reserved" the peak resident set of the whole process.
- FLOPs: ``torch.utils.flop_counter`` on fake tensors (nothing is computed, so XL/2 is counted in
  seconds on a CPU), with the reference attention, whose two matmuls per direction are the model
  FLOPs (a flash backward recomputes, which MFU does not count). Two conventions per image, see
  :class:`Flops`: 2 x MACs (what MFU divides by the hardware peak) and the DiT paper's "Gflops"
  (one multiply-add = one FLOP, forward only).
- Residual stream: the dtype of the tokens entering and leaving every DiT block, read by forward
  hooks during one forward of the configuration (:func:`residual_stream_dtype`), never assumed.
"""
from __future__ import annotations

import ctypes
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

import kernels
from maskdit_fast.config import ModelConfig
from maskdit_fast.models import build_model, random_masking
from maskdit_fast.models.layers import DiTBlock

GIB = 2**30
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> list[float]:
    """Milliseconds of each of ``reps`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class PeakMemory:
    """Peak memory of what runs between :meth:`reset` and :meth:`read` (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._rss_at_reset_kib = 0

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # so that "reserved" starts from what is in use
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:  # hand freed heap pages back to the OS so that the next peak starts low
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
        self._rss_at_reset_kib = _proc_status_kib("VmRSS")

    def read(self) -> tuple[float, float]:
        """(peak allocated GiB, peak reserved GiB)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / GIB, torch.cuda.max_memory_reserved(self.device) / GIB
        peak = _proc_status_kib("VmHWM")
        return (peak - self._rss_at_reset_kib) / 2**20, peak / 2**20


@dataclass(frozen=True)
class Flops:
    """Model FLOPs per image of one network evaluation (forward) and of a training step (fwd + bwd).

    Both count 2 FLOPs per multiply-accumulate of every matmul, linear and convolution, attention's
    two matmuls included; norms, softmax, GELU and element-wise ops are not counted. This is the
    convention of MFU (the hardware peak counts an FMA as 2 FLOPs).
    """

    forward: float
    train: float

    @property
    def dit_paper(self) -> float:
        """The DiT paper's "Gflops" of one forward (Peebles & Xie; 118.6 G for DiT-XL/2 at 256 px): the same
        matmuls and convolutions with one multiply-add counted as one FLOP (fvcore's convention), i.e.
        forward MACs. See docs/benchmarks.md for the remaining small differences."""
        return self.forward / 2


def count_flops(cfg: ModelConfig, mask_ratio: float, batch: int = 2) -> Flops:
    """FLOPs per image of ``build_model(cfg)`` at ``mask_ratio``, counted on fake tensors."""
    with kernels.backend("reference"), FakeTensorMode(allow_non_fake_inputs=True):
        kernels.set_attention_backend("reference")
        try:
            model = build_model(cfg).train()
            side = cfg.input_size
            x = torch.randn(batch, cfg.in_channels, side, side)
            noise_labels = torch.randn(batch)
            labels = torch.randint(0, cfg.num_classes, (batch,)) if cfg.num_classes else None
            ids_keep = random_masking(batch, model.num_patches, mask_ratio) if mask_ratio > 0 else None
            with FlopCounterMode(display=False) as forward:
                model(x, noise_labels, labels, ids_keep)
            with FlopCounterMode(display=False) as train:
                model(x, noise_labels, labels, ids_keep).float().square().mean().backward()
        finally:
            kernels.set_attention_backend(None)
    return Flops(forward.get_total_flops() / batch, train.get_total_flops() / batch)


def residual_stream_dtype(net: torch.nn.Module, forward: Callable[[], object]) -> str:
    """The dtype(s) of the residual stream of ``net`` while ``forward()`` runs, e.g. ``float32`` or
    ``bfloat16`` (``bfloat16/float32`` if blocks differ): the tokens entering and leaving every
    :class:`~maskdit_fast.models.layers.DiTBlock` (DiT, MaskDiT encoder and decoder, DyDiT), read by
    forward hooks, so that it is what the code did, whatever the model does with autocast."""
    seen: set[torch.dtype] = set()

    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        seen.update((args[0].dtype, output.dtype))

    blocks = [m for m in net.modules() if isinstance(m, DiTBlock)]
    if not blocks:
        raise ValueError(f"{type(net).__name__} has no DiTBlock: cannot measure its residual stream dtype")
    handles = [block.register_forward_hook(hook) for block in blocks]
    try:
        forward()
    finally:
        for handle in handles:
            handle.remove()
    return "/".join(sorted(str(dtype).removeprefix("torch.") for dtype in seen))


def matmul_peak_tflops(device: torch.device, precision: str, size: int, reps: int) -> float:
    """Measured TFLOP/s of a square ``size`` matmul in ``precision`` (TF32 allowed for fp32 on CUDA)."""
    a, b = (torch.randn(size, size, device=device, dtype=DTYPES[precision]) for _ in range(2))
    out = torch.empty_like(a)
    ms = statistics.median(time_calls(lambda: torch.matmul(a, b, out=out), device, warmup=2, reps=reps))
    return 2 * size**3 / ms / 1e9


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict:
    """Device name and properties, for the report header."""
    info = {"type": device.type, "cpu": _cpu_name(), "cpu_threads": torch.get_num_threads(),
            "platform": platform.platform()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}", memory_gib=props.total_memory / GIB,
                    multiprocessors=props.multi_processor_count)
    else:
        threads = info["cpu_threads"]
        info["name"] = f"CPU: {info['cpu']} ({threads} torch thread{'s' * (threads != 1)})"
    return info


def versions() -> dict:
    """Versions of what a benchmark ran on (``triton``: None where it does not import: references only)."""
    import importlib.metadata

    import numpy

    triton = importlib.metadata.version("triton") if kernels.triton_available() else None
    return {"python": platform.python_version(), "torch": torch.__version__, "triton": triton,
            "cuda": torch.version.cuda, "numpy": numpy.__version__,
            "attention_backends": kernels.available_attention_backends()}


def git_state(root: Path) -> dict:
    """Commit of the working tree and whether it has uncommitted changes (None outside a checkout)."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}
