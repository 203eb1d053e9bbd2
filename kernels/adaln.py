"""Fused adaLN ops: LayerNorm(no affine) + modulate, gated residual, and both fused.

Triton kernels arrive with the kernels issue; until then these dispatch to the reference.
"""
from __future__ import annotations

import torch

from . import reference


def layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm without affine, then ``* (1 + scale[n]) + shift[n]``.

    x: (N, L, D); shift, scale: (N, D) -> (N, L, D).
    """
    return reference.layernorm_modulate(x, shift, scale, eps)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x + gate[n] * y``.  x, y: (N, L, D); gate: (N, D) -> (N, L, D)."""
    return reference.gated_residual(x, gate, y)


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
    """
    return reference.gated_residual_layernorm_modulate(x, gate, y, shift, scale, eps)
