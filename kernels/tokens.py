"""Gather / scatter of kept tokens (MaskDiT masking, DyDiT token routing), with fused ``+ pos``.

``ids_keep`` holds, per sample, the positions of the kept tokens; they must be unique within a
row and lie in ``[0, L)`` (MaskDiT takes them from an argsort of noise). Uniqueness lets every
backward write each gradient row exactly once, with no atomics.

Kernels: a gather kernel (forward of ``gather_tokens``), a scatter kernel driven by the inverse
index ``inv[n, l] = k`` (or -1 where position l is masked) which writes every output row once
(forward of ``scatter_tokens`` and, with a zero fill, the backward of ``gather_tokens``), and a
scatter-backward kernel that gathers the kept rows' gradient and sums the masked rows' into
per-chunk partials for ``dfill``. The optional ``dpos`` (``pos`` is normally a frozen buffer)
is a plain ``sum`` over the batch, which PyTorch does deterministically.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from ._backend import use_triton
from ._common import block_sizes, row_chunks, sum_partials


@triton.jit
def _gather_kernel(
    X, IDS, POS, OUT,  # (N, L, D), (N, K) int64, (L, D), (N, K, D)
    L, K, D,
    HAS_POS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0)
    ks = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    k_ok = ks < K
    mask = k_ok[:, None] & (cols < D)[None, :]
    ids = tl.load(IDS + n.to(tl.int64) * K + ks, mask=k_ok, other=0)
    val = tl.load(X + (n.to(tl.int64) * L + ids)[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_POS:
        val += tl.load(POS + ids[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + (n.to(tl.int64) * K + ks)[:, None] * D + cols[None, :], val.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _scatter_kernel(
    X, INV, FILL, POS, OUT,  # (N, K, D), (N, L) int32, (D,), (L, D), (N, L, D)
    L, K, D,
    HAS_FILL: tl.constexpr, HAS_POS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Every output row is written once: x_keep[n, inv] where kept, else fill (or 0).
    n = tl.program_id(0)
    ls = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    l_ok = ls < L
    col_ok = cols < D
    mask = l_ok[:, None] & col_ok[None, :]
    inv = tl.load(INV + n.to(tl.int64) * L + ls, mask=l_ok, other=-1)
    kept = inv >= 0
    src = (n.to(tl.int64) * K + inv)[:, None] * D + cols[None, :]
    val = tl.load(X + src, mask=mask & kept[:, None], other=0.0).to(tl.float32)
    if HAS_FILL:
        fill = tl.load(FILL + cols, mask=col_ok, other=0.0).to(tl.float32)
        val = tl.where(kept[:, None], val, fill[None, :])
    if HAS_POS:
        val += tl.load(POS + ls[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + (n.to(tl.int64) * L + ls)[:, None] * D + cols[None, :], val.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _scatter_bwd_kernel(
    DOUT, INV, DX, PARTIAL,  # (N, L, D), (N, L) int32, (N, K, D), float32 (N, C, D)
    L, K, D, rows_per_chunk,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0)
    c = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    start = c * rows_per_chunk
    end = tl.minimum(start + rows_per_chunk, L)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for l0 in range(start, end, BLOCK_M):
        ls = l0 + tl.arange(0, BLOCK_M)
        l_ok = ls < end
        mask = l_ok[:, None] & col_ok[None, :]
        inv = tl.load(INV + n.to(tl.int64) * L + ls, mask=l_ok, other=-1)
        kept = inv >= 0
        dout = tl.load(DOUT + (n.to(tl.int64) * L + ls)[:, None] * D + cols[None, :], mask=mask, other=0.0)
        dst = (n.to(tl.int64) * K + inv)[:, None] * D + cols[None, :]
        tl.store(DX + dst, dout.to(DX.dtype.element_ty), mask=mask & kept[:, None])
        acc += tl.sum(tl.where(kept[:, None], 0.0, dout.to(tl.float32)), axis=0)
    tl.store(PARTIAL + (n * tl.num_programs(1) + c).to(tl.int64) * D + cols, acc, mask=col_ok)


def _inverse(ids_keep: torch.Tensor, length: int) -> torch.Tensor:
    """``inv[n, ids_keep[n, k]] = k``, -1 at masked positions: (N, K) -> (N, length) int32."""
    n, k = ids_keep.shape
    inv = torch.full((n, length), -1, dtype=torch.int32, device=ids_keep.device)
    return inv.scatter_(1, ids_keep, torch.arange(k, dtype=torch.int32, device=ids_keep.device).expand(n, k))


def _scatter(x_keep: torch.Tensor, inv: torch.Tensor, fill: torch.Tensor | None, pos: torch.Tensor | None,
             dtype: torch.dtype) -> torch.Tensor:
    """Launch the scatter kernel: (N, K, D) kept rows -> (N, L, D) in ``dtype``."""
    n, k, d = x_keep.shape
    length = inv.shape[1]
    out = torch.empty((n, length, d), dtype=dtype, device=x_keep.device)
    if out.numel() > 0:
        block_m, block_d, num_warps = block_sizes(d)
        _scatter_kernel[(n, triton.cdiv(length, block_m))](
            x_keep if k > 0 else out,  # an empty tensor may carry no valid pointer; never read then
            inv, fill if fill is not None else out, pos if pos is not None else out, out,
            length, k, d,
            HAS_FILL=fill is not None, HAS_POS=pos is not None, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
        )
    return out


# ------------------------------------------------------------------------------------ gather_tokens


@torch.library.custom_op("maskdit::gather_tokens", mutates_args=())
def _gather_op(x: torch.Tensor, ids_keep: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    x, ids_keep = x.contiguous(), ids_keep.contiguous()
    n, length, d = x.shape
    k = ids_keep.shape[1]
    out = torch.empty((n, k, d), dtype=x.dtype, device=x.device)
    if out.numel() > 0:
        block_m, block_d, num_warps = block_sizes(d)
        _gather_kernel[(n, triton.cdiv(k, block_m))](
            x, ids_keep, pos.contiguous() if pos is not None else x, out, length, k, d,
            HAS_POS=pos is not None, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
        )
    return out


@_gather_op.register_fake
def _(x, ids_keep, pos):
    return x.new_empty((x.shape[0], ids_keep.shape[1], x.shape[2]))


@torch.library.custom_op("maskdit::gather_tokens_backward", mutates_args=())
def _gather_bwd_op(dout: torch.Tensor, ids_keep: torch.Tensor, length: int) -> torch.Tensor:
    return _scatter(dout.contiguous(), _inverse(ids_keep.contiguous(), length), None, None, dout.dtype)


@_gather_bwd_op.register_fake
def _(dout, ids_keep, length):
    return dout.new_empty((dout.shape[0], length, dout.shape[2]))


def _gather_setup(ctx, inputs, output):
    x, ids_keep, pos = inputs
    ctx.length = x.shape[1]
    ctx.pos_dtype = pos.dtype if pos is not None else None
    ctx.save_for_backward(ids_keep)


def _gather_backward(ctx, dout):
    (ids_keep,) = ctx.saved_tensors
    need_x, _, need_pos = ctx.needs_input_grad
    if not (need_x or need_pos):
        return None, None, None
    dx = _gather_bwd_op(dout, ids_keep, ctx.length)
    dpos = dx.sum(0, dtype=torch.float32).to(ctx.pos_dtype) if need_pos else None
    return (dx if need_x else None), None, dpos


_gather_op.register_autograd(_gather_backward, setup_context=_gather_setup)


def gather_tokens(x: torch.Tensor, ids_keep: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
    """``out[n, k] = x[n, ids_keep[n, k]] (+ pos[ids_keep[n, k]])``.

    x: (N, L, D); ids_keep: (N, K) int64, unique per row; pos: (L, D) or None -> (N, K, D).
    """
    if use_triton(x):
        return _gather_op(x, ids_keep, pos)
    return reference.gather_tokens(x, ids_keep, pos)


# ----------------------------------------------------------------------------------- scatter_tokens


@torch.library.custom_op("maskdit::scatter_tokens", mutates_args=())
def _scatter_op(
    x_keep: torch.Tensor, ids_keep: torch.Tensor, length: int, fill: torch.Tensor, pos: torch.Tensor | None
) -> torch.Tensor:
    inv = _inverse(ids_keep.contiguous(), length)
    return _scatter(x_keep.contiguous(), inv, fill.contiguous(), pos.contiguous() if pos is not None else None,
                    x_keep.dtype)


@_scatter_op.register_fake
def _(x_keep, ids_keep, length, fill, pos):
    return x_keep.new_empty((x_keep.shape[0], length, x_keep.shape[2]))


@torch.library.custom_op("maskdit::scatter_tokens_backward", mutates_args=())
def _scatter_bwd_op(dout: torch.Tensor, ids_keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, L, D) grad -> (grad of x_keep (N, K, D), float32 grad of fill (D,))."""
    dout, ids_keep = dout.contiguous(), ids_keep.contiguous()
    n, length, d = dout.shape
    k = ids_keep.shape[1]
    dx = torch.empty((n, k, d), dtype=dout.dtype, device=dout.device)
    if dout.numel() == 0:
        return dx, torch.zeros((d,), dtype=torch.float32, device=dout.device)
    block_m, block_d, num_warps = block_sizes(d)
    chunks, rows_per_chunk = row_chunks(n, length, block_m, dout.device)
    partial = torch.empty((n, chunks, d), dtype=torch.float32, device=dout.device)
    _scatter_bwd_kernel[(n, chunks)](
        dout, _inverse(ids_keep, length), dx if k > 0 else partial, partial, length, k, d, rows_per_chunk,
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
    )
    # Two fixed-order passes: chunks within each sample, then samples.
    return dx, sum_partials(sum_partials(partial).unsqueeze(0))[0]


@_scatter_bwd_op.register_fake
def _(dout, ids_keep):
    dx = dout.new_empty((dout.shape[0], ids_keep.shape[1], dout.shape[2]))
    return dx, dout.new_empty((dout.shape[2],), dtype=torch.float32)


def _scatter_setup(ctx, inputs, output):
    _, ids_keep, _, fill, pos = inputs
    ctx.fill_dtype = fill.dtype
    ctx.pos_dtype = pos.dtype if pos is not None else None
    ctx.save_for_backward(ids_keep)


def _scatter_backward(ctx, dout):
    (ids_keep,) = ctx.saved_tensors
    need_x, _, _, need_fill, need_pos = ctx.needs_input_grad
    dx = dfill = dpos = None
    if need_x or need_fill:
        dx, dfill = _scatter_bwd_op(dout, ids_keep)
        dfill = dfill.to(ctx.fill_dtype)
    if need_pos:
        dpos = dout.sum(0, dtype=torch.float32).to(ctx.pos_dtype)
    return (dx if need_x else None), None, None, (dfill if need_fill else None), dpos


_scatter_op.register_autograd(_scatter_backward, setup_context=_scatter_setup)


def scatter_tokens(
    x_keep: torch.Tensor,
    ids_keep: torch.Tensor,
    length: int,
    fill: torch.Tensor,
    pos: torch.Tensor | None = None,
) -> torch.Tensor:
    """Kept tokens back in place, ``fill`` elsewhere, plus ``pos``.

    x_keep: (N, K, D); ids_keep: (N, K) int64, unique per row; fill: (D,); pos: (L, D) or None
    -> (N, length, D).
    """
    if use_triton(x_keep):
        return _scatter_op(x_keep, ids_keep, length, fill, pos)
    return reference.scatter_tokens(x_keep, ids_keep, length, fill, pos)
