"""Fused adaLN ops: LayerNorm(no affine) + modulate, gated residual, and both fused.

One forward and one backward Triton kernel serve all three ops (constexpr flags switch the
residual and the norm parts on). Each op is a ``torch.library.custom_op`` with a fake
implementation and an autograd formula whose backward is itself a custom op, so eager
autograd, ``torch.compile`` and FSDP all see single ops. Rows are ``(n, l)`` pairs of a
contiguous ``(N, L, D)`` tensor; the program grid is ``(N, row blocks)`` so every program
reads its sample's gate/shift/scale vectors once.

Numerics: everything is computed in float32 whatever the storage dtype (``1 + scale`` in
bf16 would round small scales away); mean and rstd are saved in float32; the sums over the
sequence for dgate/dshift/dscale go through per-chunk partials and a fixed-order second pass
(:func:`kernels._common.sum_partials`), never atomics, so gradients are bitwise reproducible.
"""
from __future__ import annotations

import torch

from . import reference
from ._backend import use_triton
from ._common import col_tiles, launch_over_rows, row_tiles, sum_partials
from ._triton import jit, tl


@jit(do_not_specialize=["rows_per_chunk"])
def _adaln_fwd_kernel(
    X, GATE, Y, SHIFT, SCALE,  # inputs: (N, L, D), (N|1, D), (N, L, D), (N|1, D), (N|1, D)
    R, OUT, MEAN, RSTD,  # outputs: residual (N, L, D), normed (N, L, D), mean/rstd (N*L,) float32
    L, D, rows_per_chunk, stride_gate, stride_shift, stride_scale, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_NORM: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    # Program (n, c) walks its chunk of sample n's rows, ROWS at a time; a row is the column tiles
    # [0, BLOCK_D) and [BLOCK_D, BLOCK_D + BLOCK_E) (BLOCK_E = 0: one tile). The per-sample vectors
    # are loaded once per program.
    n = tl.program_id(0)
    start = tl.program_id(1) * rows_per_chunk
    end = tl.minimum(start + rows_per_chunk, L)
    cd = tl.arange(0, BLOCK_D)
    ce = BLOCK_D + tl.arange(0, BLOCK_E if BLOCK_E > 0 else 1)
    ce_ok = ce < D
    if HAS_RESIDUAL:
        gate_d = tl.load(GATE + n * stride_gate + cd).to(tl.float32)[None, :]
        gate_e = tl.load(GATE + n * stride_gate + ce, mask=ce_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_NORM:
        shift_d = tl.load(SHIFT + n * stride_shift + cd).to(tl.float32)[None, :]
        shift_e = tl.load(SHIFT + n * stride_shift + ce, mask=ce_ok, other=0.0).to(tl.float32)[None, :]
        scale_d = 1.0 + tl.load(SCALE + n * stride_scale + cd).to(tl.float32)[None, :]
        scale_e = 1.0 + tl.load(SCALE + n * stride_scale + ce, mask=ce_ok, other=0.0).to(tl.float32)[None, :]

    for l0 in range(start, end, ROWS):
        ls = l0 + tl.arange(0, ROWS)
        row_ok = ls < end
        rows = n.to(tl.int64) * L + ls
        od = rows[:, None] * D + cd[None, :]
        oe = rows[:, None] * D + ce[None, :]
        md = row_ok[:, None]
        me = row_ok[:, None] & ce_ok[None, :]
        xd = tl.load(X + od, mask=md, other=0.0).to(tl.float32)
        if BLOCK_E > 0:
            xe = tl.load(X + oe, mask=me, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            yd = tl.load(Y + od, mask=md, other=0.0).to(tl.float32)
            rd = (xd + gate_d * yd).to(R.dtype.element_ty)
            tl.store(R + od, rd, mask=md)
            xd = rd.to(tl.float32)  # normalise the stored (rounded) residual: the backward only sees that one
            if BLOCK_E > 0:
                ye = tl.load(Y + oe, mask=me, other=0.0).to(tl.float32)
                re = (xe + gate_e * ye).to(R.dtype.element_ty)
                tl.store(R + oe, re, mask=me)
                xe = re.to(tl.float32)
        if HAS_NORM:
            total = tl.sum(xd, axis=1)
            if BLOCK_E > 0:
                total += tl.sum(xe, axis=1)
            mean = total / D
            xd = xd - mean[:, None]
            sq = tl.sum(xd * xd, axis=1)
            if BLOCK_E > 0:
                xe = tl.where(me, xe - mean[:, None], 0.0)
                sq += tl.sum(xe * xe, axis=1)
            rstd = tl.rsqrt(sq / D + eps)
            tl.store(OUT + od, (xd * rstd[:, None] * scale_d + shift_d).to(OUT.dtype.element_ty), mask=md)
            if BLOCK_E > 0:
                tl.store(OUT + oe, (xe * rstd[:, None] * scale_e + shift_e).to(OUT.dtype.element_ty), mask=me)
            tl.store(MEAN + rows, mean, mask=row_ok)
            tl.store(RSTD + rows, rstd, mask=row_ok)


@jit(do_not_specialize=["rows_per_chunk"])
def _adaln_bwd_kernel(
    DR, DOUT, XR, Y, GATE, SCALE, MEAN, RSTD,  # grads of (residual, normed); saved tensors
    DX, DY, PARTIAL,  # outputs: (N, L, D), (N, L, D), float32 (P, N, C, D) partial sums
    L, D, rows_per_chunk, stride_gate, stride_scale,
    HAS_RESIDUAL: tl.constexpr, HAS_NORM: tl.constexpr, HAS_DR: tl.constexpr, NORM_SLOT: tl.constexpr,
    LATE_Y: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    # XR is the normalised input: x for layernorm_modulate, the saved residual r for the fused op.
    # PARTIAL slots: [dgate] if HAS_RESIDUAL, then [dshift, dscale] from NORM_SLOT if HAS_NORM.
    # The column sums stay in (ROWS, BLOCK) register tiles across the program's rows (no cross-warp
    # reduction per step) and are reduced over ROWS once, into one partial row per program.
    n = tl.program_id(0)
    c = tl.program_id(1)
    start = c * rows_per_chunk
    end = tl.minimum(start + rows_per_chunk, L)
    cd = tl.arange(0, BLOCK_D)
    ce = BLOCK_D + tl.arange(0, BLOCK_E if BLOCK_E > 0 else 1)
    ce_ok = ce < D
    if HAS_RESIDUAL:
        gate_d = tl.load(GATE + n * stride_gate + cd).to(tl.float32)[None, :]
        gate_e = tl.load(GATE + n * stride_gate + ce, mask=ce_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_NORM:
        scale_d = 1.0 + tl.load(SCALE + n * stride_scale + cd).to(tl.float32)[None, :]
        scale_e = 1.0 + tl.load(SCALE + n * stride_scale + ce, mask=ce_ok, other=0.0).to(tl.float32)[None, :]
    acc_gate_d = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
    acc_shift_d = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
    acc_scale_d = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
    acc_gate_e = tl.zeros((ROWS, BLOCK_E if BLOCK_E > 0 else 1), dtype=tl.float32)
    acc_shift_e = tl.zeros((ROWS, BLOCK_E if BLOCK_E > 0 else 1), dtype=tl.float32)
    acc_scale_e = tl.zeros((ROWS, BLOCK_E if BLOCK_E > 0 else 1), dtype=tl.float32)

    for l0 in range(start, end, ROWS):
        ls = l0 + tl.arange(0, ROWS)
        row_ok = ls < end
        rows = n.to(tl.int64) * L + ls
        od = rows[:, None] * D + cd[None, :]
        oe = rows[:, None] * D + ce[None, :]
        md = row_ok[:, None]
        me = row_ok[:, None] & ce_ok[None, :]
        # Every load of the step is issued before the first reduction (one memory round trip per step;
        # y after it with LATE_Y, see the launch shapes); dr and y stay in their storage dtype until
        # used (bf16: half the registers while in flight).
        if HAS_DR:
            drd = tl.load(DR + od, mask=md, other=0.0)
            if BLOCK_E > 0:
                dre = tl.load(DR + oe, mask=me, other=0.0)
        if HAS_RESIDUAL and not LATE_Y:
            yd = tl.load(Y + od, mask=md, other=0.0)
            if BLOCK_E > 0:
                ye = tl.load(Y + oe, mask=me, other=0.0)
        if HAS_NORM:
            dod = tl.load(DOUT + od, mask=md, other=0.0).to(tl.float32)
            xd = tl.load(XR + od, mask=md, other=0.0).to(tl.float32)
            if BLOCK_E > 0:
                doe = tl.load(DOUT + oe, mask=me, other=0.0).to(tl.float32)
                xe = tl.load(XR + oe, mask=me, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)[:, None]
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)[:, None]
            # Masked rows and columns have dout = 0 (and masked rows rstd = 0): g, the sums and the
            # accumulators get nothing from them.
            xhd = (xd - mean) * rstd
            gd = dod * scale_d
            acc_shift_d += dod
            acc_scale_d += dod * xhd
            s_g = tl.sum(gd, axis=1)
            s_gx = tl.sum(gd * xhd, axis=1)
            if BLOCK_E > 0:
                xhe = (xe - mean) * rstd
                ge = doe * scale_e
                acc_shift_e += doe
                acc_scale_e += doe * xhe
                s_g += tl.sum(ge, axis=1)
                s_gx += tl.sum(ge * xhe, axis=1)
            s_g = (s_g / D)[:, None]
            s_gx = (s_gx / D)[:, None]
            if LATE_Y:  # issued after the reductions, overlapping dx's arithmetic and stores
                yd = tl.load(Y + od, mask=md, other=0.0)
                if BLOCK_E > 0:
                    ye = tl.load(Y + oe, mask=me, other=0.0)
            dxd = (gd - s_g - xhd * s_gx) * rstd
            if BLOCK_E > 0:
                dxe = (ge - s_g - xhe * s_gx) * rstd
            if HAS_DR:
                dxd += drd.to(tl.float32)
                if BLOCK_E > 0:
                    dxe += dre.to(tl.float32)
            tl.store(DX + od, dxd.to(DX.dtype.element_ty), mask=md)
            if BLOCK_E > 0:
                tl.store(DX + oe, dxe.to(DX.dtype.element_ty), mask=me)
        else:
            # gated_residual alone: dx is the incoming gradient itself, returned without a copy.
            dxd = drd.to(tl.float32)
            if BLOCK_E > 0:
                dxe = dre.to(tl.float32)
        if HAS_RESIDUAL:
            tl.store(DY + od, (dxd * gate_d).to(DY.dtype.element_ty), mask=md)
            acc_gate_d += dxd * yd.to(tl.float32)
            if BLOCK_E > 0:
                tl.store(DY + oe, (dxe * gate_e).to(DY.dtype.element_ty), mask=me)
                acc_gate_e += dxe * ye.to(tl.float32)

    here = (n * tl.num_programs(1) + c).to(tl.int64) * D
    slot = tl.num_programs(0).to(tl.int64) * tl.num_programs(1) * D
    if HAS_RESIDUAL:
        tl.store(PARTIAL + here + cd, tl.sum(acc_gate_d, axis=0))
        if BLOCK_E > 0:
            tl.store(PARTIAL + here + ce, tl.sum(acc_gate_e, axis=0), mask=ce_ok)
    if HAS_NORM:
        tl.store(PARTIAL + NORM_SLOT * slot + here + cd, tl.sum(acc_shift_d, axis=0))
        tl.store(PARTIAL + (NORM_SLOT + 1) * slot + here + cd, tl.sum(acc_scale_d, axis=0))
        if BLOCK_E > 0:
            tl.store(PARTIAL + NORM_SLOT * slot + here + ce, tl.sum(acc_shift_e, axis=0), mask=ce_ok)
            tl.store(PARTIAL + (NORM_SLOT + 1) * slot + here + ce, tl.sum(acc_scale_e, axis=0), mask=ce_ok)


# Launch shapes (the static report checks each against its binary; grids fill the resident slots).
# Forward: 4-warp programs, 8 elements (16 bytes of bf16) per thread and tensor.
# Backward: 16-warp programs with 4 elements per thread (its register tiles: 3 column sums and 4
# streamed tensors), <= 64 registers: 2 programs (32 warps, 50%) per SM. Few, large programs keep
# the float32 partial rows (one per program and sum) small: ~3% of the fused backward's bytes at
# N=64, L=128, D=1152, where 4-warp programs would write 4x as many.
# The fused op on a row of two column tiles (D=1152 = 1024 + 128) costs more registers (Triton gives
# the 128-wide tile its own layouts and converts the row sums between them):
# - forward: 8 warps x 4 elements per thread: <= 64 registers, 50% occupancy (79 at 4 x 8: 38%);
# - backward: ~110 registers at 4 elements per thread, so one 16-warp program per SM whatever the
#   split. Argued instead: at 8 elements per thread (128 registers, no spill) it issues 16-byte loads
#   of dr, y, dout and r before each step's reductions: 512 threads x 4 x 16 bytes = 32 KB (+4 KB
#   of the second tile) in flight per SM, what 32 warps of 8-byte loads would have. With a float32
#   residual stream (a training step's) that spills; it loads y only after the row reductions
#   (LATE_Y): 128 registers, no spill, and dr, r (float32) and dout (bf16) still before them,
#   512 threads x 80 bytes = 40 KB in flight per SM; y's load overlaps dx's arithmetic and stores.
_FWD_TILES, _FWD_FUSED_TWO_TILES = (4, 8), (8, 4)
_BWD_TILES, _BWD_FUSED_TWO_TILES = (16, 4), (16, 8)


def _check_vector(v: torch.Tensor, x: torch.Tensor, name: str) -> None:
    """Per-sample vectors are (N, D), or (1, D) broadcast over the batch."""
    n, _, d = x.shape
    if v.dim() != 2 or v.shape[1] != d or v.shape[0] not in (1, n):
        raise ValueError(f"{name} must be ({n}, {d}) or (1, {d}) for x of shape {tuple(x.shape)}, "
                         f"got {tuple(v.shape)}")


def _vec(t: torch.Tensor) -> torch.Tensor:
    """A per-sample vector with unit column stride (adaLN chunks are strided views, read in place)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _row_stride(v: torch.Tensor) -> int:
    """0 for a (1, D) vector broadcast over the batch (every program reads row 0)."""
    return 0 if v.shape[0] == 1 else v.stride(0)


def _launch_fwd(x, gate, y, shift, scale, eps: float, has_residual: bool, has_norm: bool,
                out_dtype: torch.dtype | None = None):
    """Returns ``(r, normed, mean, rstd)`` with the norm (normed in ``out_dtype``, default x's), else
    just ``r``; ``r`` is ``x`` without residual."""
    n, length, d = x.shape
    r = torch.empty_like(x) if has_residual else x
    out = torch.empty_like(x, dtype=out_dtype or x.dtype) if has_norm else r
    mean, rstd = [torch.empty((n, length), dtype=torch.float32, device=x.device) for _ in range(2)] if has_norm \
        else (None, None)
    if x.numel() > 0:
        two_tiles = has_residual and has_norm and col_tiles(d)[1] > 0
        tiles = row_tiles(d, *(_FWD_FUSED_TWO_TILES if two_tiles else _FWD_TILES))
        launch_over_rows(_adaln_fwd_kernel, n, length, tiles.rows, x.device, lambda rows_per_chunk, _: (
            x, gate, y, shift, scale, r if has_residual else None, out if has_norm else None, mean, rstd,
            length, d, rows_per_chunk,
            _row_stride(gate) if has_residual else 0, _row_stride(shift) if has_norm else 0,
            _row_stride(scale) if has_norm else 0, eps,
        ), dict(HAS_RESIDUAL=has_residual, HAS_NORM=has_norm, ROWS=tiles.rows, BLOCK_D=tiles.block_d,
                BLOCK_E=tiles.block_e, num_warps=tiles.num_warps))
    return (r, out, mean, rstd) if has_norm else r


def _launch_bwd(dr, dout, xr, y, gate, shift_like, scale, mean, rstd, has_residual: bool, has_norm: bool):
    """Returns ``(dx or None, dy or None, [dgate?, dshift?, dscale?])``; each parameter gradient has its
    vector's shape ((N, D) or (1, D)) and dtype (``shift_like`` gives dshift's)."""
    n, length, d = xr.shape
    has_dr = dr is not None
    dx = torch.empty_like(xr) if has_norm else None
    dy = torch.empty_like(y) if has_residual else None
    vectors = ([gate] if has_residual else []) + ([shift_like, scale] if has_norm else [])
    if xr.numel() == 0:
        return dx, dy, [torch.zeros(v.shape, dtype=v.dtype, device=v.device) for v in vectors]
    two_tiles = has_residual and has_norm and col_tiles(d)[1] > 0
    tiles = row_tiles(d, *(_BWD_FUSED_TWO_TILES if two_tiles else _BWD_TILES))
    partial = launch_over_rows(_adaln_bwd_kernel, n, length, tiles.rows, xr.device, lambda rows_per_chunk, part: (
        dr, dout, xr, y, gate, scale, mean, rstd, dx, dy, part, length, d, rows_per_chunk,
        _row_stride(gate) if has_residual else 0, _row_stride(scale) if has_norm else 0,
    ), dict(HAS_RESIDUAL=has_residual, HAS_NORM=has_norm, HAS_DR=has_dr, NORM_SLOT=int(has_residual),
            LATE_Y=two_tiles and xr.element_size() == 4, ROWS=tiles.rows, BLOCK_D=tiles.block_d,
            BLOCK_E=tiles.block_e, num_warps=tiles.num_warps),
        partial_width=d, partial_slots=len(vectors))
    # A (1, D) vector's gradient sums the partials of every sample: one (1, N*C, D) view.
    sums = [sum_partials(partial[i].view(v.shape[0], -1, d), v.dtype) for i, v in enumerate(vectors)]
    return dx, dy, sums


# ------------------------------------------------------------------------------ layernorm_modulate
# Backward ops return each parameter gradient as its own tensor, in its vector's shape and dtype.


@torch.library.custom_op("maskdit::layernorm_modulate", mutates_args=())
def _layernorm_modulate_op(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, out, mean, rstd = _launch_fwd(x.contiguous(), None, None, _vec(shift), _vec(scale), eps, False, True,
                                     out_dtype)
    return out, mean, rstd


@_layernorm_modulate_op.register_fake
def _(x, shift, scale, eps, out_dtype):
    stats = x.new_empty(x.shape[:2], dtype=torch.float32)
    return torch.empty_like(x, dtype=out_dtype, memory_format=torch.contiguous_format), stats, stats.clone()


@torch.library.custom_op("maskdit::layernorm_modulate_backward", mutates_args=())
def _layernorm_modulate_bwd_op(
    dr: torch.Tensor | None, dout: torch.Tensor, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
    mean: torch.Tensor, rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``dr``: a gradient reaching ``x`` by another path (the residual stream), added inside the kernel.
    ``shift`` only gives dshift's shape and dtype."""
    dx, _, (dshift, dscale) = _launch_bwd(dr.contiguous() if dr is not None else None, dout.contiguous(),
                                          x.contiguous(), None, None, shift, _vec(scale), mean, rstd, False, True)
    return dx, dshift, dscale


@_layernorm_modulate_bwd_op.register_fake
def _(dr, dout, x, shift, scale, mean, rstd):
    return torch.empty_like(x, memory_format=torch.contiguous_format), shift.new_empty(shift.shape), scale.new_empty(scale.shape)


def _layernorm_modulate_setup(ctx, inputs, output):
    x, shift, scale, _, _ = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, shift, scale, mean, rstd)


def _layernorm_modulate_backward(ctx, dout, _dmean, _drstd):
    x, shift, scale, mean, rstd = ctx.saved_tensors
    dx, dshift, dscale = _layernorm_modulate_bwd_op(None, dout, x, shift, scale, mean, rstd)
    return dx, dshift, dscale, None, None


_layernorm_modulate_op.register_autograd(_layernorm_modulate_backward, setup_context=_layernorm_modulate_setup)


def layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
                       out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """LayerNorm without affine, then ``* (1 + scale[n]) + shift[n]``.

    x: (N, L, D); shift, scale: (N, D) or (1, D) (broadcast over the batch) -> (N, L, D) in ``out_dtype``
    (default: x's dtype; the autocast dtype when a Linear under autocast reads it: its cast then
    costs no extra pass). The maths is float32 whatever the dtypes.
    """
    for v, name in ((shift, "shift"), (scale, "scale")):
        _check_vector(v, x, name)
    out_dtype = out_dtype or x.dtype
    if use_triton(x):
        return _layernorm_modulate_op(x, shift, scale, eps, out_dtype)[0]
    return reference.layernorm_modulate(x, shift, scale, eps, out_dtype)


class _ResidualLayerNormModulate(torch.autograd.Function):
    """``(x, layernorm_modulate(x))`` where the first output is ``x`` itself for the residual stream:
    its gradient reaches the norm's backward kernel, which adds it in (no extra N x L x D pass)."""

    @staticmethod
    def forward(ctx, x, shift, scale, eps, out_dtype):
        out, mean, rstd = _layernorm_modulate_op(x, shift, scale, eps, out_dtype)
        ctx.save_for_backward(x, shift, scale, mean, rstd)
        return x.view_as(x), out

    @staticmethod
    def backward(ctx, dres, dout):
        x, shift, scale, mean, rstd = ctx.saved_tensors
        if dout is None:
            return dres, None, None, None, None
        dx, dshift, dscale = _layernorm_modulate_bwd_op(dres, dout, x, shift, scale, mean, rstd)
        return dx, dshift, dscale, None, None


def residual_layernorm_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6, out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, layernorm_modulate(x, shift, scale))`` for a block whose input feeds both its norm and its
    residual stream: use the first output as the residual. Its gradient and the norm's are summed
    inside the backward kernel instead of by autograd (which would read two and write one
    N x L x D gradient more).

    x: (N, L, D); shift, scale: (N, D) or (1, D) -> (x, normed), both (N, L, D), normed in ``out_dtype``
    (default: x's dtype).
    """
    for v, name in ((shift, "shift"), (scale, "scale")):
        _check_vector(v, x, name)
    out_dtype = out_dtype or x.dtype
    if use_triton(x):
        return _ResidualLayerNormModulate.apply(x, shift, scale, eps, out_dtype)
    return x, reference.layernorm_modulate(x, shift, scale, eps, out_dtype)


# ---------------------------------------------------------------------------------- gated_residual


@torch.library.custom_op("maskdit::gated_residual", mutates_args=())
def _gated_residual_op(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return _launch_fwd(x.contiguous(), _vec(gate), y.contiguous(), None, None, 0.0, True, False)


@_gated_residual_op.register_fake
def _(x, gate, y):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("maskdit::gated_residual_backward", mutates_args=())
def _gated_residual_bwd_op(dr: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y = y.contiguous()
    # No norm here, so the "normalised input" slot is never read; y stands in for it.
    _, dy, (dgate,) = _launch_bwd(dr.contiguous(), None, y, y, _vec(gate), None, None, None, None, True, False)
    return dy, dgate


@_gated_residual_bwd_op.register_fake
def _(dr, gate, y):
    return torch.empty_like(y, memory_format=torch.contiguous_format), gate.new_empty(gate.shape)


def _gated_residual_setup(ctx, inputs, output):
    _, gate, y = inputs
    ctx.save_for_backward(gate, y)


def _gated_residual_backward(ctx, dr):
    gate, y = ctx.saved_tensors
    dy, dgate = _gated_residual_bwd_op(dr, gate, y)
    return dr, dgate, dy


_gated_residual_op.register_autograd(_gated_residual_backward, setup_context=_gated_residual_setup)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x + gate[n] * y``.  x, y: (N, L, D); gate: (N, D) or (1, D) -> (N, L, D)."""
    _check_vector(gate, x, "gate")
    if use_triton(x):
        return _gated_residual_op(x, gate, y)
    return reference.gated_residual(x, gate, y)


# --------------------------------------------------------------- gated_residual_layernorm_modulate


@torch.library.custom_op("maskdit::gated_residual_layernorm_modulate", mutates_args=())
def _fused_op(
    x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_fwd(x.contiguous(), _vec(gate), y.contiguous(), _vec(shift), _vec(scale), eps, True, True,
                       out_dtype)


@_fused_op.register_fake
def _(x, gate, y, shift, scale, eps, out_dtype):
    stats = x.new_empty(x.shape[:2], dtype=torch.float32)
    r = torch.empty_like(x, memory_format=torch.contiguous_format)
    return r, torch.empty_like(r, dtype=out_dtype), stats, stats.clone()


@torch.library.custom_op("maskdit::gated_residual_layernorm_modulate_backward", mutates_args=())
def _fused_bwd_op(
    dr: torch.Tensor, dout: torch.Tensor, r: torch.Tensor, gate: torch.Tensor, y: torch.Tensor,
    shift: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``shift`` only gives dshift's shape and dtype."""
    dx, dy, (dgate, dshift, dscale) = _launch_bwd(dr.contiguous(), dout.contiguous(), r.contiguous(), y.contiguous(),
                                                  _vec(gate), shift, _vec(scale), mean, rstd, True, True)
    return dx, dy, dgate, dshift, dscale


@_fused_bwd_op.register_fake
def _(dr, dout, r, gate, y, shift, scale, mean, rstd):
    dx = torch.empty_like(r, memory_format=torch.contiguous_format)
    return (dx, torch.empty_like(y, memory_format=torch.contiguous_format), gate.new_empty(gate.shape),
            shift.new_empty(shift.shape), scale.new_empty(scale.shape))


def _fused_setup(ctx, inputs, output):
    _, gate, y, shift, scale, _, _ = inputs
    r, _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(r, gate, y, shift, scale, mean, rstd)


def _fused_backward(ctx, dr, dout, _dmean, _drstd):
    r, gate, y, shift, scale, mean, rstd = ctx.saved_tensors
    dx, dy, dgate, dshift, dscale = _fused_bwd_op(dr, dout, r, gate, y, shift, scale, mean, rstd)
    return dx, dgate, dy, dshift, dscale, None, None


_fused_op.register_autograd(_fused_backward, setup_context=_fused_setup)


def gated_residual_layernorm_modulate(
    x: torch.Tensor,
    gate: torch.Tensor,
    y: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``r = x + gate[n] * y`` and ``layernorm_modulate(r, shift, scale)`` in one pass.

    x, y: (N, L, D); gate, shift, scale: (N, D) or (1, D) -> (r, normed), both (N, L, D), r in x's
    dtype, normed in ``out_dtype`` (default: x's dtype). The kernel reads x and y once and writes
    r and normed once (plus 8 bytes of float32 mean/rstd per row, saved for the backward).
    """
    for v, name in ((gate, "gate"), (shift, "shift"), (scale, "scale")):
        _check_vector(v, x, name)
    out_dtype = out_dtype or x.dtype
    if use_triton(x):
        r, out, _, _ = _fused_op(x, gate, y, shift, scale, eps, out_dtype)
        return r, out
    return reference.gated_residual_layernorm_modulate(x, gate, y, shift, scale, eps, out_dtype)
