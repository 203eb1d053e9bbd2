"""Plain PyTorch versions of every fused op: the ground truth the Triton kernels are tested against.

Numerics follow the kernels: normalisation and modulation run in float32 whatever the input
dtype (float64 inputs stay float64, so tests can compute exact ground truth), and the result is
cast back to the input dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or float64 if it already is."""
    return t if t.dtype == torch.float64 else t.float()


def layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
                       out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """LayerNorm without affine, then ``* (1 + scale[n]) + shift[n]``.

    x: (N, L, D); shift, scale: (N, D) -> (N, L, D) in ``out_dtype`` (default: x's dtype).
    """
    xf = _wide(x)
    normed = F.layer_norm(xf, (x.shape[-1],), eps=eps)
    out = normed * (1.0 + _wide(scale).unsqueeze(1)) + _wide(shift).unsqueeze(1)
    return out.to(out_dtype or x.dtype)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x + gate[n] * y``.  x, y: (N, L, D); gate: (N, D) -> (N, L, D) in x's dtype."""
    return (_wide(x) + _wide(gate).unsqueeze(1) * _wide(y)).to(x.dtype)


def gated_residual_layernorm_modulate(
    x: torch.Tensor,
    gate: torch.Tensor,
    y: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The DiT block's "add, then norm for the next sub-layer" pair.

    x, y: (N, L, D); gate, shift, scale: (N, D) ->
    (residual = x + gate*y in x's dtype, layernorm_modulate(residual, shift, scale) in ``out_dtype``),
    both (N, L, D).
    """
    residual = gated_residual(x, gate, y)
    return residual, layernorm_modulate(residual, shift, scale, eps, out_dtype)


def _flat_ids(ids_keep: torch.Tensor, length: int) -> torch.Tensor:
    """(N, K) token indices per row -> (N*K,) row indices into the batch flattened to (N*length, D)."""
    offsets = torch.arange(ids_keep.shape[0], device=ids_keep.device).unsqueeze(1) * length
    return (ids_keep + offsets).reshape(-1)


# Both token ops index the batch flattened to (N*L, D): index_select / index_copy move whole rows and
# are several times faster on a CPU than torch.gather / scatter with an index expanded over D.
def gather_tokens(x: torch.Tensor, ids_keep: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
    """``out[n, k] = x[n, ids_keep[n, k]] (+ pos[ids_keep[n, k]])``.

    x: (N, L, D); ids_keep: (N, K) int64; pos: (L, D) or None -> (N, K, D).
    """
    n, length, d = x.shape
    out = x.reshape(n * length, d).index_select(0, _flat_ids(ids_keep, length)).view(n, ids_keep.shape[1], d)
    if pos is not None:
        out = out + pos[ids_keep].to(out.dtype)
    return out


def scatter_tokens(
    x_keep: torch.Tensor,
    ids_keep: torch.Tensor,
    length: int,
    fill: torch.Tensor,
    pos: torch.Tensor | None = None,
) -> torch.Tensor:
    """Put kept tokens back in place and ``fill`` (the mask token) everywhere else, plus ``pos``.

    x_keep: (N, K, D); ids_keep: (N, K) int64 (unique per row); fill: (D,); pos: (L, D) or None
    -> (N, length, D).
    """
    n, k, d = x_keep.shape
    dtype = x_keep.dtype
    rows = x_keep.reshape(n * k, d)
    # One pass writes the whole output (fill, + pos), then the kept rows overwrite their places.
    if pos is None:
        out = fill.to(dtype).expand(n * length, d).clone()  # a new tensor, also when it is one row
    else:
        pos = pos.to(dtype)
        out = (fill.to(dtype) + pos.expand(n, length, d)).reshape(n * length, d)
        rows = (_wide(rows) + _wide(pos).index_select(0, ids_keep.reshape(-1))).to(dtype)  # pos's grad sums in fp32
    return out.index_copy_(0, _flat_ids(ids_keep, length), rows).view(n, length, d)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention with scale ``head_dim ** -0.5``, computed in float32.

    q, k, v: (N, L, H, Dh) -> (N, L, H, Dh).
    """
    qf, kf, vf = (_wide(t).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax((qf @ kf.transpose(-2, -1)) * q.shape[-1] ** -0.5, dim=-1)
    return (weights @ vf).transpose(1, 2).to(q.dtype)
