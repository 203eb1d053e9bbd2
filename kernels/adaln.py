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
import triton
import triton.language as tl

from . import reference
from ._backend import use_triton
from ._common import block_sizes, row_chunks, sum_partials


@triton.jit
def _adaln_fwd_kernel(
    X, GATE, Y, SHIFT, SCALE,  # inputs: (N, L, D), (N, D), (N, L, D), (N, D), (N, D)
    R, OUT, MEAN, RSTD,  # outputs: residual (N, L, D), normed (N, L, D), mean/rstd (N*L,) float32
    L, D, stride_gate, stride_shift, stride_scale, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_NORM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0)
    ls = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    mask = (ls < L)[:, None] & col_ok[None, :]
    rows = n.to(tl.int64) * L + ls
    offs = rows[:, None] * D + cols[None, :]

    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        gate = tl.load(GATE + n * stride_gate + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
        r = (x + gate[None, :] * y).to(R.dtype.element_ty)
        tl.store(R + offs, r, mask=mask)
        # Normalise the stored (rounded) residual: the backward only sees that one.
        x = r.to(tl.float32)
    if HAS_NORM:
        mean = tl.sum(x, axis=1) / D
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / D + eps)
        shift = tl.load(SHIFT + n * stride_shift + cols, mask=col_ok, other=0.0).to(tl.float32)
        scale = tl.load(SCALE + n * stride_scale + cols, mask=col_ok, other=0.0).to(tl.float32)
        out = xc * rstd[:, None] * (1.0 + scale[None, :]) + shift[None, :]
        tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)
        tl.store(MEAN + rows, mean, mask=ls < L)
        tl.store(RSTD + rows, rstd, mask=ls < L)


@triton.jit
def _adaln_bwd_kernel(
    DR, DOUT, XR, Y, GATE, SCALE, MEAN, RSTD,  # grads of (residual, normed); saved tensors
    DX, DY, PARTIAL,  # outputs: (N, L, D), (N, L, D), float32 (P, N, C, D) partial sums
    L, D, rows_per_chunk, stride_gate, stride_scale,
    HAS_RESIDUAL: tl.constexpr, HAS_NORM: tl.constexpr, HAS_DR: tl.constexpr, NORM_SLOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # XR is the normalised input: x for layernorm_modulate, the saved residual r for the fused op.
    # PARTIAL slots: [dgate] if HAS_RESIDUAL, then [dshift, dscale] from NORM_SLOT if HAS_NORM.
    n = tl.program_id(0)
    c = tl.program_id(1)
    num_n = tl.num_programs(0)
    num_c = tl.num_programs(1)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    start = c * rows_per_chunk
    end = tl.minimum(start + rows_per_chunk, L)

    if HAS_RESIDUAL:
        gate = tl.load(GATE + n * stride_gate + cols, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_NORM:
        scale1 = 1.0 + tl.load(SCALE + n * stride_scale + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc_gate = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_shift = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_scale = tl.zeros((BLOCK_D,), dtype=tl.float32)

    for l0 in range(start, end, BLOCK_M):
        ls = l0 + tl.arange(0, BLOCK_M)
        row_ok = ls < end
        mask = row_ok[:, None] & col_ok[None, :]
        rows = n.to(tl.int64) * L + ls
        offs = rows[:, None] * D + cols[None, :]

        if HAS_NORM:
            dout = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
            xr = tl.load(XR + offs, mask=mask, other=0.0).to(tl.float32)
            xhat = tl.where(mask, (xr - mean[:, None]) * rstd[:, None], 0.0)
            acc_shift += tl.sum(dout, axis=0)
            acc_scale += tl.sum(dout * xhat, axis=0)
            g = dout * scale1[None, :]
            mean_g = tl.sum(g, axis=1) / D
            mean_gx = tl.sum(g * xhat, axis=1) / D
            dx = (g - mean_g[:, None] - xhat * mean_gx[:, None]) * rstd[:, None]
            if HAS_DR:
                dx += tl.load(DR + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        else:
            # gated_residual alone: dx is the incoming gradient itself, returned without a copy.
            dx = tl.load(DR + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(DY + offs, (dx * gate[None, :]).to(DY.dtype.element_ty), mask=mask)
            acc_gate += tl.sum(dx * y, axis=0)

    here = (n * num_c + c).to(tl.int64) * D + cols
    slot = num_n.to(tl.int64) * num_c * D
    if HAS_RESIDUAL:
        tl.store(PARTIAL + here, acc_gate, mask=col_ok)
    if HAS_NORM:
        tl.store(PARTIAL + NORM_SLOT * slot + here, acc_shift, mask=col_ok)
        tl.store(PARTIAL + (NORM_SLOT + 1) * slot + here, acc_scale, mask=col_ok)


def _vec(t: torch.Tensor) -> torch.Tensor:
    """A per-sample (N, D) vector with unit column stride (adaLN chunks are strided views)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_fwd(x, gate, y, shift, scale, eps: float, has_residual: bool, has_norm: bool):
    """Returns ``(r, normed, mean, rstd)`` with the norm, else just ``r``; ``r`` is ``x`` without residual."""
    n, length, d = x.shape
    r = torch.empty_like(x) if has_residual else x
    out = torch.empty_like(x) if has_norm else r
    stats = [torch.empty((n, length), dtype=torch.float32, device=x.device) for _ in range(2)] if has_norm else None
    if x.numel() > 0:
        block_m, block_d, num_warps = block_sizes(d)
        gate, y = (gate, y) if has_residual else (x, x)  # x stands in for pointers never read
        shift, scale, mean, rstd = (shift, scale, *stats) if has_norm else (x, x, x, x)
        _adaln_fwd_kernel[(n, triton.cdiv(length, block_m))](
            x, gate, y, shift, scale, r, out, mean, rstd,
            length, d, gate.stride(0), shift.stride(0), scale.stride(0), eps,
            HAS_RESIDUAL=has_residual, HAS_NORM=has_norm, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
        )
    return (r, out, *stats) if has_norm else r


def _launch_bwd(dr, dout, xr, y, gate, scale, mean, rstd, has_residual: bool, has_norm: bool):
    """Returns ``(dx or None, dy or None, float32 (P, N, D) sums stacked as [dgate?, dshift?, dscale?])``."""
    n, length, d = xr.shape
    has_dr = dr is not None
    dx = torch.empty_like(xr) if has_norm else None
    dy = torch.empty_like(y) if has_residual else None
    slots = int(has_residual) + 2 * int(has_norm)
    if xr.numel() == 0:
        return dx, dy, torch.zeros((slots, n, d), dtype=torch.float32, device=xr.device)
    block_m, block_d, num_warps = block_sizes(d)
    chunks, rows_per_chunk = row_chunks(n, length, block_m, xr.device)
    partial = torch.empty((slots * n, chunks, d), dtype=torch.float32, device=xr.device)
    unused = xr  # stands in for pointers the flags say are never read
    _adaln_bwd_kernel[(n, chunks)](
        dr if has_dr else unused, dout if has_norm else unused, xr,
        y if has_residual else unused, gate if has_residual else unused,
        scale if has_norm else unused, mean if has_norm else unused, rstd if has_norm else unused,
        dx if has_norm else unused, dy if has_residual else unused, partial,
        length, d, rows_per_chunk,
        gate.stride(0) if has_residual else 0, scale.stride(0) if has_norm else 0,
        HAS_RESIDUAL=has_residual, HAS_NORM=has_norm, HAS_DR=has_dr, NORM_SLOT=int(has_residual),
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
    )
    sums = sum_partials(partial).view(slots, n, d)
    return dx, dy, sums


# ------------------------------------------------------------------------------ layernorm_modulate
# Backward ops return the (N, D) parameter grads stacked in one float32 (P, N, D) tensor (outputs
# of a custom op may not alias each other); the autograd formulas split them and cast each to
# its parameter's dtype.


@torch.library.custom_op("maskdit::layernorm_modulate", mutates_args=())
def _layernorm_modulate_op(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, out, mean, rstd = _launch_fwd(x.contiguous(), None, None, _vec(shift), _vec(scale), eps, False, True)
    return out, mean, rstd


@_layernorm_modulate_op.register_fake
def _(x, shift, scale, eps):
    stats = x.new_empty(x.shape[:2], dtype=torch.float32)
    return torch.empty_like(x, memory_format=torch.contiguous_format), stats, stats.clone()


@torch.library.custom_op("maskdit::layernorm_modulate_backward", mutates_args=())
def _layernorm_modulate_bwd_op(
    dout: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    dx, _, sums = _launch_bwd(None, dout.contiguous(), x.contiguous(), None, None, _vec(scale), mean, rstd, False, True)
    return dx, sums


@_layernorm_modulate_bwd_op.register_fake
def _(dout, x, scale, mean, rstd):
    sums = x.new_empty((2, x.shape[0], x.shape[2]), dtype=torch.float32)
    return torch.empty_like(x, memory_format=torch.contiguous_format), sums


def _layernorm_modulate_setup(ctx, inputs, output):
    x, shift, scale, _ = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.shift_dtype = shift.dtype
    ctx.save_for_backward(x, scale, mean, rstd)


def _layernorm_modulate_backward(ctx, dout, _dmean, _drstd):
    x, scale, mean, rstd = ctx.saved_tensors
    dx, (dshift, dscale) = _layernorm_modulate_bwd_op(dout, x, scale, mean, rstd)
    return dx, dshift.to(ctx.shift_dtype), dscale.to(scale.dtype), None


_layernorm_modulate_op.register_autograd(_layernorm_modulate_backward, setup_context=_layernorm_modulate_setup)


def layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm without affine, then ``* (1 + scale[n]) + shift[n]``.

    x: (N, L, D); shift, scale: (N, D) -> (N, L, D).
    """
    if use_triton(x):
        return _layernorm_modulate_op(x, shift, scale, eps)[0]
    return reference.layernorm_modulate(x, shift, scale, eps)


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
    _, dy, sums = _launch_bwd(dr.contiguous(), None, y, y, _vec(gate), None, None, None, True, False)
    return dy, sums[0]


@_gated_residual_bwd_op.register_fake
def _(dr, gate, y):
    return torch.empty_like(y, memory_format=torch.contiguous_format), gate.new_empty(gate.shape, dtype=torch.float32)


def _gated_residual_setup(ctx, inputs, output):
    _, gate, y = inputs
    ctx.save_for_backward(gate, y)


def _gated_residual_backward(ctx, dr):
    gate, y = ctx.saved_tensors
    dy, dgate = _gated_residual_bwd_op(dr, gate, y)
    return dr, dgate.to(gate.dtype), dy


_gated_residual_op.register_autograd(_gated_residual_backward, setup_context=_gated_residual_setup)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x + gate[n] * y``.  x, y: (N, L, D); gate: (N, D) -> (N, L, D)."""
    if use_triton(x):
        return _gated_residual_op(x, gate, y)
    return reference.gated_residual(x, gate, y)


# --------------------------------------------------------------- gated_residual_layernorm_modulate


@torch.library.custom_op("maskdit::gated_residual_layernorm_modulate", mutates_args=())
def _fused_op(
    x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_fwd(x.contiguous(), _vec(gate), y.contiguous(), _vec(shift), _vec(scale), eps, True, True)


@_fused_op.register_fake
def _(x, gate, y, shift, scale, eps):
    stats = x.new_empty(x.shape[:2], dtype=torch.float32)
    r = torch.empty_like(x, memory_format=torch.contiguous_format)
    return r, torch.empty_like(r), stats, stats.clone()


@torch.library.custom_op("maskdit::gated_residual_layernorm_modulate_backward", mutates_args=())
def _fused_bwd_op(
    dr: torch.Tensor, dout: torch.Tensor, r: torch.Tensor, gate: torch.Tensor, y: torch.Tensor,
    scale: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_bwd(dr.contiguous(), dout.contiguous(), r.contiguous(), y.contiguous(), _vec(gate), _vec(scale),
                       mean, rstd, True, True)


@_fused_bwd_op.register_fake
def _(dr, dout, r, gate, y, scale, mean, rstd):
    sums = r.new_empty((3, r.shape[0], r.shape[2]), dtype=torch.float32)
    dx = torch.empty_like(r, memory_format=torch.contiguous_format)
    return dx, torch.empty_like(y, memory_format=torch.contiguous_format), sums


def _fused_setup(ctx, inputs, output):
    _, gate, y, shift, scale, _ = inputs
    r, _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.shift_dtype = shift.dtype
    ctx.save_for_backward(r, gate, y, scale, mean, rstd)


def _fused_backward(ctx, dr, dout, _dmean, _drstd):
    r, gate, y, scale, mean, rstd = ctx.saved_tensors
    dx, dy, (dgate, dshift, dscale) = _fused_bwd_op(dr, dout, r, gate, y, scale, mean, rstd)
    return dx, dgate.to(gate.dtype), dy, dshift.to(ctx.shift_dtype), dscale.to(scale.dtype), None


_fused_op.register_autograd(_fused_backward, setup_context=_fused_setup)


def gated_residual_layernorm_modulate(
    x: torch.Tensor,
    gate: torch.Tensor,
    y: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``r = x + gate[n] * y`` and ``layernorm_modulate(r, shift, scale)`` in one pass.

    x, y: (N, L, D); gate, shift, scale: (N, D) -> (r, normed), both (N, L, D).
    The kernel reads x and y once and writes r and normed once (plus 8 bytes of float32
    mean/rstd per row, saved for the backward).
    """
    if use_triton(x):
        r, out, _, _ = _fused_op(x, gate, y, shift, scale, eps)
        return r, out
    return reference.gated_residual_layernorm_modulate(x, gate, y, shift, scale, eps)
