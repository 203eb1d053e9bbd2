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

import os

import torch

from . import reference
from ._backend import use_triton
from ._common import launch_over_rows, row_tiles, sum_partials
from ._triton import jit, tl


@jit(do_not_specialize=["rows_per_chunk"])
def _gather_kernel(
    X, IDS, POS, OUT,  # (N, L, D) with unit column stride, (N, K) int64, (L, D), (N, K, D)
    K, D, rows_per_chunk, stride_xn, stride_xl,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    # Program (n, c) copies kept rows [c * rows_per_chunk, ...) of sample n, ROWS at a time, in two
    # column tiles (see kernels._common). x may have any row strides (no copy of a strided input).
    n = tl.program_id(0)
    start = tl.program_id(1) * rows_per_chunk
    end = tl.minimum(start + rows_per_chunk, K)
    cd = tl.arange(0, BLOCK_D)
    ce = BLOCK_D + tl.arange(0, BLOCK_E if BLOCK_E > 0 else 1)
    ce_ok = ce < D
    for k0 in range(start, end, ROWS):
        ks = k0 + tl.arange(0, ROWS)
        k_ok = ks < end
        ids = tl.load(IDS + n.to(tl.int64) * K + ks, mask=k_ok, other=0)
        src = n.to(tl.int64) * stride_xn + ids * stride_xl
        dst = (n.to(tl.int64) * K + ks) * D
        md = k_ok[:, None]
        me = k_ok[:, None] & ce_ok[None, :]
        vd = tl.load(X + src[:, None] + cd[None, :], mask=md, other=0.0).to(tl.float32)
        if BLOCK_E > 0:
            ve = tl.load(X + src[:, None] + ce[None, :], mask=me, other=0.0).to(tl.float32)
        if POS is not None:
            vd += tl.load(POS + ids[:, None] * D + cd[None, :], mask=md, other=0.0).to(tl.float32)
            if BLOCK_E > 0:
                ve += tl.load(POS + ids[:, None] * D + ce[None, :], mask=me, other=0.0).to(tl.float32)
        tl.store(OUT + dst[:, None] + cd[None, :], vd.to(OUT.dtype.element_ty), mask=md)
        if BLOCK_E > 0:
            tl.store(OUT + dst[:, None] + ce[None, :], ve.to(OUT.dtype.element_ty), mask=me)


@jit(do_not_specialize=["rows_per_chunk"])
def _scatter_kernel(
    X, INV, FILL, POS, OUT,  # (N, K, D), (N, L) int32, (D,), (L, D), (N, L, D)
    L, K, D, rows_per_chunk,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    # Every output row is written once: x_keep[n, inv] where kept, else fill (or 0).
    n = tl.program_id(0)
    start = tl.program_id(1) * rows_per_chunk
    end = tl.minimum(start + rows_per_chunk, L)
    cd = tl.arange(0, BLOCK_D)
    ce = BLOCK_D + tl.arange(0, BLOCK_E if BLOCK_E > 0 else 1)
    ce_ok = ce < D
    if FILL is not None:
        fill_d = tl.load(FILL + cd).to(tl.float32)[None, :]
        fill_e = tl.load(FILL + ce, mask=ce_ok, other=0.0).to(tl.float32)[None, :]
    for l0 in range(start, end, ROWS):
        ls = l0 + tl.arange(0, ROWS)
        l_ok = ls < end
        inv = tl.load(INV + n.to(tl.int64) * L + ls, mask=l_ok, other=-1)
        kept = (inv >= 0)[:, None]
        src = (n.to(tl.int64) * K + inv) * D
        dst = (n.to(tl.int64) * L + ls) * D
        md = l_ok[:, None]
        me = l_ok[:, None] & ce_ok[None, :]
        vd = tl.load(X + src[:, None] + cd[None, :], mask=md & kept, other=0.0).to(tl.float32)
        if BLOCK_E > 0:
            ve = tl.load(X + src[:, None] + ce[None, :], mask=me & kept, other=0.0).to(tl.float32)
        if FILL is not None:
            vd = tl.where(kept, vd, fill_d)
            if BLOCK_E > 0:
                ve = tl.where(kept, ve, fill_e)
        if POS is not None:
            vd += tl.load(POS + ls[:, None] * D + cd[None, :], mask=md, other=0.0).to(tl.float32)
            if BLOCK_E > 0:
                ve += tl.load(POS + ls[:, None] * D + ce[None, :], mask=me, other=0.0).to(tl.float32)
        tl.store(OUT + dst[:, None] + cd[None, :], vd.to(OUT.dtype.element_ty), mask=md)
        if BLOCK_E > 0:
            tl.store(OUT + dst[:, None] + ce[None, :], ve.to(OUT.dtype.element_ty), mask=me)


@jit(do_not_specialize=["rows_per_chunk"])
def _scatter_bwd_kernel(
    DOUT, INV, DX, PARTIAL,  # (N, L, D), (N, L) int32, (N, K, D), float32 (N, C, D)
    L, K, D, rows_per_chunk,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    # Kept rows' gradient goes to dx; the masked rows' is summed for dfill in (ROWS, BLOCK) register
    # tiles across the program's rows, then into one partial row per program.
    n = tl.program_id(0)
    c = tl.program_id(1)
    start = c * rows_per_chunk
    end = tl.minimum(start + rows_per_chunk, L)
    cd = tl.arange(0, BLOCK_D)
    ce = BLOCK_D + tl.arange(0, BLOCK_E if BLOCK_E > 0 else 1)
    ce_ok = ce < D
    acc_d = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
    acc_e = tl.zeros((ROWS, BLOCK_E if BLOCK_E > 0 else 1), dtype=tl.float32)
    for l0 in range(start, end, ROWS):
        ls = l0 + tl.arange(0, ROWS)
        l_ok = ls < end
        inv = tl.load(INV + n.to(tl.int64) * L + ls, mask=l_ok, other=-1)
        kept = (inv >= 0)[:, None]
        src = (n.to(tl.int64) * L + ls) * D
        dst = (n.to(tl.int64) * K + inv) * D
        md = l_ok[:, None]
        me = l_ok[:, None] & ce_ok[None, :]
        dd = tl.load(DOUT + src[:, None] + cd[None, :], mask=md, other=0.0)
        tl.store(DX + dst[:, None] + cd[None, :], dd.to(DX.dtype.element_ty), mask=md & kept)
        acc_d += tl.where(kept, 0.0, dd.to(tl.float32))
        if BLOCK_E > 0:
            de = tl.load(DOUT + src[:, None] + ce[None, :], mask=me, other=0.0)
            tl.store(DX + dst[:, None] + ce[None, :], de.to(DX.dtype.element_ty), mask=me & kept)
            acc_e += tl.where(kept, 0.0, de.to(tl.float32))
    here = (n * tl.num_programs(1) + c).to(tl.int64) * D
    tl.store(PARTIAL + here + cd, tl.sum(acc_d, axis=0))
    if BLOCK_E > 0:
        tl.store(PARTIAL + here + ce, tl.sum(acc_e, axis=0), mask=ce_ok)


# Launch shapes: the copies use 4-warp programs with 16-byte accesses; the scatter backward writes
# one float32 partial row per program for dfill, so it uses fewer, 16-warp programs (its 32 or so
# registers let 4 fit per SM), which keeps the partials < 5% of its bytes.
_COPY_WARPS, _COPY_PER_THREAD = 4, 8
_REDUCE_WARPS, _REDUCE_PER_THREAD = 16, 8


def _debug() -> bool:
    return os.environ.get("MASKDIT_KERNELS_DEBUG", "") not in ("", "0")


def _check_ids(ids_keep: torch.Tensor, length: int) -> None:
    """With ``MASKDIT_KERNELS_DEBUG=1``: ids_keep rows unique and in ``[0, length)`` (costs a sort and a sync)."""
    if not _debug() or ids_keep.numel() == 0:
        return
    lo, hi = int(ids_keep.min()), int(ids_keep.max())
    if lo < 0 or hi >= length:
        raise ValueError(f"ids_keep holds {lo if lo < 0 else hi}, outside [0, {length})")
    ordered = ids_keep.sort(dim=1).values
    if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
        raise ValueError("ids_keep has a repeated index within a row; kept positions must be unique "
                         "(an argsort of noise gives them)")


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
        tiles = row_tiles(d, _COPY_WARPS, _COPY_PER_THREAD)
        launch_over_rows(_scatter_kernel, n, length, tiles.rows, out.device, lambda rows_per_chunk, _: (
            x_keep if k > 0 else out,  # an empty tensor may carry no valid pointer; never read then
            inv, fill, pos, out, length, k, d, rows_per_chunk,
        ), dict(ROWS=tiles.rows, BLOCK_D=tiles.block_d, BLOCK_E=tiles.block_e, num_warps=tiles.num_warps))
    return out


# ------------------------------------------------------------------------------------ gather_tokens


@torch.library.custom_op("maskdit::gather_tokens", mutates_args=())
def _gather_op(x: torch.Tensor, ids_keep: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    # Any row strides are read in place; only a non-unit column stride needs a copy.
    x = x if x.stride(2) == 1 else x.contiguous()
    ids_keep = ids_keep.contiguous()
    n, length, d = x.shape
    k = ids_keep.shape[1]
    out = torch.empty((n, k, d), dtype=x.dtype, device=x.device)
    if out.numel() > 0:
        tiles = row_tiles(d, _COPY_WARPS, _COPY_PER_THREAD)
        pos = pos.contiguous() if pos is not None else None
        launch_over_rows(_gather_kernel, n, k, tiles.rows, x.device, lambda rows_per_chunk, _: (
            x, ids_keep, pos, out, k, d, rows_per_chunk, x.stride(0), x.stride(1),
        ), dict(ROWS=tiles.rows, BLOCK_D=tiles.block_d, BLOCK_E=tiles.block_e, num_warps=tiles.num_warps))
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

    x: (N, L, D); ids_keep: (N, K) int64, unique per row, in [0, L); pos: (L, D) or None -> (N, K, D).
    Repeated or out-of-range ids are not checked (a sort and a host sync per call) unless
    ``MASKDIT_KERNELS_DEBUG=1``: a repeat leaves gradient rows unwritten, an out-of-range id reads
    out of bounds.
    """
    _check_ids(ids_keep, x.shape[1])
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
    tiles = row_tiles(d, _REDUCE_WARPS, _REDUCE_PER_THREAD)
    inv = _inverse(ids_keep, length)
    partial = launch_over_rows(_scatter_bwd_kernel, n, length, tiles.rows, dout.device, lambda rows_per_chunk, part: (
        dout, inv, dx if k > 0 else part, part, length, k, d, rows_per_chunk,
    ), dict(ROWS=tiles.rows, BLOCK_D=tiles.block_d, BLOCK_E=tiles.block_e, num_warps=tiles.num_warps),
        partial_width=d, partial_slots=1)[0]
    chunks = partial.shape[1]
    # One fixed-order pass over every (sample, chunk) partial.
    return dx, sum_partials(partial.view(1, n * chunks, d))[0]


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

    x_keep: (N, K, D); ids_keep: (N, K) int64, unique per row, in [0, length) (checked only with
    ``MASKDIT_KERNELS_DEBUG=1``, see :func:`gather_tokens`); fill: (D,); pos: (L, D) or None
    -> (N, length, D).
    """
    _check_ids(ids_keep, length)
    if use_triton(x_keep):
        return _scatter_op(x_keep, ids_keep, length, fill, pos)
    return reference.scatter_tokens(x_keep, ids_keep, length, fill, pos)
