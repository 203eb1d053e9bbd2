"""Pieces shared by the Triton kernels: tile sizes, row chunking, and the deterministic sum.

Reductions over the sequence (dshift, dscale, dgate, dfill) never use atomics: each program
sums its own chunk of rows into a float32 partial, and :func:`sum_partials` adds the partials
in a fixed order in a second kernel, so two identical backward passes give identical bits.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

# Elements per program tile: large enough to stream rows at full bandwidth, small enough to
# keep the backward's half-dozen live (BLOCK_M, BLOCK_D) float32 tiles in registers.
_TILE = 4096
_MAX_ROWS = 32


def block_sizes(d: int) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_D, num_warps)`` for rows of width ``d``.

    ``BLOCK_D`` is the next power of two (tl.arange needs one; the tail is masked), and
    ``BLOCK_M`` rows share a program so narrow widths (72, 512) still give full tiles.
    """
    block_d = triton.next_power_of_2(d)
    block_m = max(1, min(_MAX_ROWS, _TILE // block_d))
    num_warps = min(16, max(1, block_m * block_d // 512))
    return block_m, block_d, num_warps


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


def row_chunks(batch: int, rows: int, block_m: int, device: torch.device) -> tuple[int, int]:
    """Split each sample's ``rows`` into chunks for a backward pass with per-chunk partial sums.

    Returns ``(chunks, rows_per_chunk)``; ``rows_per_chunk`` is a multiple of ``block_m``.
    ``batch * chunks`` programs are enough to fill the GPU (a few per SM) while keeping the
    partial-sum buffers small. The split depends only on shapes and the device, so results
    are reproducible run to run.
    """
    blocks = triton.cdiv(rows, block_m)
    target = 4 * sm_count(device)
    chunks = max(1, min(blocks, triton.cdiv(target, batch)))
    rows_per_chunk = triton.cdiv(blocks, chunks) * block_m
    return triton.cdiv(rows, rows_per_chunk), rows_per_chunk


@triton.jit
def _sum_partials_kernel(PARTIAL, OUT, C, D, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    # PARTIAL: (B, C, D) float32 -> OUT: (B, D) float32, summed over C in a fixed order.
    b = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    base = PARTIAL + b.to(tl.int64) * C * D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        mask = (cs < C)[:, None] & col_ok[None, :]
        acc += tl.sum(tl.load(base + cs[:, None] * D + cols[None, :], mask=mask, other=0.0), axis=0)
    tl.store(OUT + b.to(tl.int64) * D + cols, acc, mask=col_ok)


def sum_partials(partial: torch.Tensor) -> torch.Tensor:
    """Deterministic ``partial.sum(1)`` for a contiguous float32 ``(B, C, D)`` -> ``(B, D)``."""
    b, c, d = partial.shape
    out = torch.empty((b, d), dtype=torch.float32, device=partial.device)
    block_d = min(triton.next_power_of_2(d), 256)
    block_c = min(triton.next_power_of_2(c), 16)
    _sum_partials_kernel[(b, triton.cdiv(d, block_d))](partial, out, c, d, BLOCK_C=block_c, BLOCK_D=block_d)
    return out
