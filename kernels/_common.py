"""Pieces shared by the Triton kernels: row tiles, grid sizing, and the deterministic sum.

Tiles. A row of width D is covered by two power-of-two column tiles, ``BLOCK_D`` (the largest power
of two <= D) and ``BLOCK_E`` (the next power of two >= the rest, 0 when D is one): D = 1152 is
1024 + 128 with no masked lane, where one 2048-wide tile would mask 44% of them. ``ROWS`` rows
share a step so that every thread holds ``per_thread`` elements of each streamed tensor.

Grids. Every kernel is persistent over rows: program ``(n, c)`` walks rows
``[c * rows_per_chunk, (c + 1) * rows_per_chunk)`` of sample n. :func:`launch_over_rows` sizes the
grid from the GPU's resident-block slots: resident blocks per SM read from the compiled kernel
(registers, shared memory, warps) times the SMs, filled once, or in whole waves when the batch
does not divide the slots, so no wave has a tail.

Reductions over the sequence (dshift, dscale, dgate, dfill) never use atomics: each program
keeps its column sums in registers across its rows and writes one float32 partial row;
:func:`sum_partials` adds the partials in a fixed order in a second kernel, so two identical
backward passes give identical bits.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch

from ._triton import jit, tl, triton

_MAX_ROWS = 64


class Tiles(NamedTuple):
    rows: int  # ROWS: rows per step
    block_d: int  # BLOCK_D: first column tile
    block_e: int  # BLOCK_E: second column tile (0: none)
    num_warps: int


def col_tiles(d: int) -> tuple[int, int]:
    """``(BLOCK_D, BLOCK_E)`` covering ``d`` columns: the largest power of two <= d, then the next power
    of two >= the rest (1152 -> 1024 + 128, 72 -> 64 + 8, 512 -> 512 + 0, 1000 -> 512 + 512)."""
    block_d = 1 << (max(1, d).bit_length() - 1)
    rest = d - block_d
    return block_d, (triton.next_power_of_2(rest) if rest else 0)


def row_tiles(d: int, num_warps: int, per_thread: int) -> Tiles:
    """Tiles for rows of width ``d`` in programs of ``num_warps`` warps, ``per_thread`` elements per thread
    and streamed tensor in the first tile (8 bf16 = one 16-byte load; 4 = 8 bytes, for register-heavy
    backward kernels). Narrow rows get more rows per step; tiny widths fewer warps."""
    block_d, block_e = col_tiles(d)
    warps = max(1, min(num_warps, block_d * _MAX_ROWS // (32 * per_thread)))
    rows = max(1, min(_MAX_ROWS, 32 * warps * per_thread // block_d))
    return Tiles(rows, block_d, block_e, warps)


class GpuLimits(NamedTuple):
    """What bounds the resident blocks of a kernel on one SM (sm_80 and sm_90 share all but memory)."""
    sms: int
    registers: int = 65536
    max_warps: int = 64
    max_blocks: int = 32
    smem: int = 228 * 1024
    smem_reserved: int = 1024  # per block, taken by the runtime


_simulated: GpuLimits | None = None
_INTERPRETER_BLOCKS = 2  # the interpreter runs programs one by one: any small count tests the split


@functools.cache
def _cuda_limits(index: int) -> GpuLimits:
    p = torch.cuda.get_device_properties(index)
    return GpuLimits(p.multi_processor_count, getattr(p, "regs_per_multiprocessor", 65536),
                     getattr(p, "max_threads_per_multi_processor", 2048) // 32, 32,
                     getattr(p, "shared_memory_per_multiprocessor", 228 * 1024))


def gpu_limits(device: torch.device) -> GpuLimits:
    """The GPU the grids are sized for: the CUDA device, the one :func:`simulated_gpu` sets (the
    static report on a CPU), or one SM elsewhere (the interpreter)."""
    if _simulated is not None:
        return _simulated
    return _cuda_limits(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else GpuLimits(1)


@contextlib.contextmanager
def simulated_gpu(gpu: GpuLimits | int) -> Iterator[None]:
    """Size every grid launched inside for ``gpu`` (or a GPU with that many SMs); no GPU needed."""
    global _simulated
    previous, _simulated = _simulated, GpuLimits(gpu) if isinstance(gpu, int) else gpu
    try:
        yield
    finally:
        _simulated = previous


def blocks_per_sm(registers: int, num_warps: int, shared: int, gpu: GpuLimits) -> int:
    """Resident blocks per SM (the CUDA occupancy calculator's rules: registers allocated per warp
    in units of 256, shared memory in units of 128 bytes plus the runtime's reserve per block)."""
    per_warp = -(-registers * 32 // 256) * 256
    by_regs = (gpu.registers // per_warp) // num_warps if registers else gpu.max_blocks
    by_smem = gpu.smem // (-(-shared // 128) * 128 + gpu.smem_reserved)
    return max(0, min(gpu.max_blocks, gpu.max_warps // num_warps, by_regs, by_smem))


_resident: dict = {}


def resident_blocks(kernel, args: tuple, kwargs: dict, device: torch.device) -> int:
    """How many programs of ``kernel`` launched with ``args``/``kwargs`` fit on one SM at once.

    Read from the compiled binary (``warmup`` compiles without launching; the static report
    answers it for its simulated GPU), cached per kernel, constexprs and dtypes.
    """
    if not isinstance(kernel, triton.runtime.jit.JITFunction) or (device.type != "cuda" and _simulated is None):
        return _INTERPRETER_BLOCKS
    gpu = gpu_limits(device)
    key = (kernel, gpu, tuple(sorted(kwargs.items())),
           tuple(a.dtype if isinstance(a, torch.Tensor) else a is None for a in args))
    if key not in _resident:
        compiled = kernel.warmup(*args, grid=(1,), **kwargs)
        compiled._init_handles()
        _resident[key] = max(1, blocks_per_sm(compiled.n_regs, compiled.metadata.num_warps,
                                              compiled.metadata.shared, gpu))
    return _resident[key]


_MIN_WAVE_FILL = 0.85  # the static report's target too


def row_chunks(batch: int, rows: int, step: int, programs_per_sm: int, device: torch.device) -> tuple[int, int]:
    """Split each sample's ``rows`` into chunks, one program each, so that the grid fills whole waves.

    Returns ``(chunks, rows_per_chunk)``; ``rows_per_chunk`` is a multiple of ``step``. The fewest
    chunks (fewest partial sums) that fill the GPU's ``programs_per_sm * SMs`` slots once, or, when
    ``batch`` does not divide them (64 samples on 108 slots), that keep the last wave >= 85% full
    (3 chunks: 192 programs, 1.78 waves). The split depends only on shapes and the device.
    """
    steps = triton.cdiv(max(rows, 1), step)
    slots = programs_per_sm * gpu_limits(device).sms
    batch = max(batch, 1)

    def split(chunks: int) -> tuple[int, int]:
        per_chunk = triton.cdiv(steps, chunks) * step
        return triton.cdiv(max(rows, 1), per_chunk), per_chunk

    def fill(chunks: int) -> float:
        waves = batch * split(chunks)[0] / slots
        return waves / triton.cdiv(batch * split(chunks)[0], slots)

    first = max(1, min(steps, slots // batch))
    candidates = range(first, min(steps, max(first, 4 * triton.cdiv(slots, batch))) + 1)
    best = next((c for c in candidates if fill(c) >= _MIN_WAVE_FILL), max(candidates, key=fill))
    return split(best)


def launch_over_rows(kernel, batch: int, rows: int, step: int, device: torch.device,
                     args: Callable[[int, torch.Tensor | None], tuple], kwargs: dict,
                     partial_width: int = 0, partial_slots: int = 0) -> torch.Tensor | None:
    """Launch a persistent row kernel on a ``(batch, chunks)`` grid sized by :func:`row_chunks` from its
    resident blocks per SM.

    ``args(rows_per_chunk, partial)`` builds the argument tuple; with ``partial_width`` a float32
    ``(partial_slots, batch, chunks, partial_width)`` buffer is allocated for the program's column
    sums and returned.
    """
    scratch = torch.empty((1,), dtype=torch.float32, device=device) if partial_width else None
    per_sm = resident_blocks(kernel, args(1, scratch), kwargs, device)
    chunks, rows_per_chunk = row_chunks(batch, rows, step, per_sm, device)
    partial = torch.empty((partial_slots, batch, chunks, partial_width), dtype=torch.float32,
                          device=device) if partial_width else None
    kernel[(batch, chunks)](*args(rows_per_chunk, partial), **kwargs)
    return partial


@jit
def _sum_partials_kernel(PARTIAL, OUT, C, D, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    # PARTIAL: (B, C, D) float32 -> OUT: (B, D), summed over C in a fixed order, stored in OUT's dtype.
    # A small second pass (the partials are < 7% of the backward's bytes): its occupancy does not matter.
    b = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    base = PARTIAL + b.to(tl.int64) * C * D
    acc = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        mask = (cs < C)[:, None] & col_ok[None, :]
        acc += tl.load(base + cs[:, None] * D + cols[None, :], mask=mask, other=0.0)
    tl.store(OUT + b.to(tl.int64) * D + cols, tl.sum(acc, axis=0).to(OUT.dtype.element_ty), mask=col_ok)


def sum_partials(partial: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Deterministic ``partial.sum(1)`` for a contiguous float32 ``(B, C, D)`` -> ``(B, D)`` in ``dtype``."""
    b, c, d = partial.shape
    out = torch.empty((b, d), dtype=dtype, device=partial.device)
    if out.numel() == 0:
        return out
    # A column block that divides D (1152 = 9 x 128) leaves no masked lane.
    block_d = next((w for w in (256, 128, 64, 32) if d % w == 0), min(triton.next_power_of_2(d), 128))
    block_c = min(triton.next_power_of_2(max(c, 1)), 8)
    _sum_partials_kernel[(b, triton.cdiv(d, block_d))](partial, out, c, d, BLOCK_C=block_c, BLOCK_D=block_d)
    return out
