"""Pieces shared by the Triton kernels: row tiles, grid sizing, and the deterministic sum.

Tiles. A row of width D is covered by two power-of-two column tiles, ``BLOCK_D`` (the largest power
of two <= D) and ``BLOCK_E`` (the next power of two >= the rest, 0 when D is one): D = 1152 is
1024 + 128 with no masked lane, where one 2048-wide tile would mask 44% of them. ``ROWS`` rows
share a step so that every thread holds ``per_thread`` elements of each streamed tensor.

Grids. Every kernel is persistent over rows: program ``(n, c)`` walks rows
``[c * rows_per_chunk, (c + 1) * rows_per_chunk)`` of sample n. :func:`row_chunks` sizes the grid
to fill the GPU's resident-block slots once (``programs_per_sm`` x SMs, the occupancy each
launcher states for its kernel, which the static report checks against the compiled binary).

Reductions over the sequence (dshift, dscale, dgate, dfill) never use atomics: each program
keeps its column sums in registers across its rows and writes one float32 partial row;
:func:`sum_partials` adds the partials in a fixed order in a second kernel, so two identical
backward passes give identical bits.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import NamedTuple

import torch
import triton
import triton.language as tl

_MAX_ROWS = 64


class Tiles(NamedTuple):
    rows: int  # ROWS: rows per step
    block_d: int  # BLOCK_D: first column tile
    block_e: int  # BLOCK_E: second column tile (0: none)
    num_warps: int


def col_tiles(d: int) -> tuple[int, int]:
    """``(BLOCK_D, BLOCK_E)``: two powers of two covering ``d`` columns with the least padding."""
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


_simulated_sms: int | None = None


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors the grids are sized for: the CUDA device's, 1 elsewhere (the
    interpreter), or the count :func:`simulated_gpu` sets (the static report on a CPU)."""
    if _simulated_sms is not None:
        return _simulated_sms
    return _cuda_sm_count(device.index or 0) if device.type == "cuda" else 1


@contextlib.contextmanager
def simulated_gpu(sms: int) -> Iterator[None]:
    """Size every grid launched inside for a GPU with ``sms`` multiprocessors (no GPU needed)."""
    global _simulated_sms
    previous, _simulated_sms = _simulated_sms, sms
    try:
        yield
    finally:
        _simulated_sms = previous


def row_chunks(batch: int, rows: int, step: int, programs_per_sm: int, device: torch.device) -> tuple[int, int]:
    """Split each sample's ``rows`` into chunks, one program each, to fill the GPU's slots once.

    Returns ``(chunks, rows_per_chunk)``; ``rows_per_chunk`` is a multiple of ``step``. The grid
    ``batch * chunks`` is at most ``programs_per_sm * SMs`` (one wave) unless a sample has fewer
    steps than that needs. The split depends only on shapes and the device: reproducible results.
    """
    steps = triton.cdiv(max(rows, 1), step)
    slots = programs_per_sm * sm_count(device)
    chunks = max(1, min(steps, slots // max(batch, 1)))
    rows_per_chunk = triton.cdiv(steps, chunks) * step
    return triton.cdiv(max(rows, 1), rows_per_chunk), rows_per_chunk


@triton.jit
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
