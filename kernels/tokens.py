"""Gather / scatter of kept tokens (MaskDiT masking, DyDiT token routing).

Triton kernels arrive with the kernels issue; until then these dispatch to the reference.
"""
from __future__ import annotations

import torch

from . import reference


def gather_tokens(x: torch.Tensor, ids_keep: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
    """``out[n, k] = x[n, ids_keep[n, k]] (+ pos[ids_keep[n, k]])``.

    x: (N, L, D); ids_keep: (N, K) int64; pos: (L, D) or None -> (N, K, D).
    """
    return reference.gather_tokens(x, ids_keep, pos)


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
    return reference.scatter_tokens(x_keep, ids_keep, length, fill, pos)
