"""Per-sample random token masks for MaskDiT training."""
from __future__ import annotations

import torch


def num_kept(length: int, mask_ratio: float) -> int:
    """Tokens kept out of ``length``: floor(length * (1 - mask_ratio)), as the official release counts."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    kept = int(length * (1.0 - mask_ratio))
    if kept < 1:
        raise ValueError(f"mask_ratio {mask_ratio} keeps no token out of {length}; lower it")
    return kept


def random_masking(
    batch: int,
    length: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Indices of the tokens each sample keeps: argsort of uniform noise, first K entries.

    Returns ids_keep: (batch, K) int64, unique per row, in random order.
    """
    kept = num_kept(length, mask_ratio)
    noise = torch.rand(batch, length, generator=generator, device=device)
    return noise.argsort(dim=1)[:, :kept]


def mask_from_ids(ids_keep: torch.Tensor, length: int) -> torch.Tensor:
    """(N, K) kept indices -> (N, length) float mask, 1 where a token is masked, 0 where kept."""
    mask = torch.ones(ids_keep.shape[0], length, device=ids_keep.device)
    return mask.scatter(1, ids_keep, 0.0)
