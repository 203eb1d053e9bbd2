"""The MaskDiT training loss: EDM denoising score matching on kept patches + MAE on masked ones."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import LossConfig, ModelConfig
from ..models.layers import patchify
from ..models.masking import mask_from_ids, random_masking


@dataclass
class LossTerms:
    """Per-sample loss terms, each (N,): ``loss = dsm + mae_coef * mae``."""

    loss: torch.Tensor
    dsm: torch.Tensor
    mae: torch.Tensor


def sample_sigma(n: int, P_mean: float, P_std: float, device: torch.device) -> torch.Tensor:
    """Training noise levels: ln(sigma) ~ N(P_mean, P_std^2). Returns (N,)."""
    return (torch.randn(n, device=device) * P_std + P_mean).exp()


def edm_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """EDM loss weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def dsm_loss(weighted_sq_err: torch.Tensor, patch_size: int, mask: torch.Tensor | None) -> torch.Tensor:
    """Weighted squared error (N, C, H, W) -> (N,): mean over channels, average per patch, then mean
    over the kept patches (mask (N, L), 1 = masked) or over all pixels when ``mask`` is None."""
    if mask is None:
        return weighted_sq_err.mean(dim=(1, 2, 3))
    per_patch = F.avg_pool2d(weighted_sq_err.mean(dim=1), patch_size).flatten(1)
    kept = 1.0 - mask
    return (per_patch * kept).sum(dim=1) / kept.sum(dim=1)


def mae_loss(noisy: torch.Tensor, denoised: torch.Tensor, patch_size: int, mask: torch.Tensor) -> torch.Tensor:
    """MAE reconstruction loss on masked patches -> (N,).

    Target: the noisy input patchified and normalised per patch (mean, unbiased variance, eps 1e-6);
    prediction: the denoised output patchified. Squared error averaged over the patch, then over
    masked patches (mask (N, L), 1 = masked).
    """
    target = patchify(noisy, patch_size)
    target = (target - target.mean(dim=-1, keepdim=True)) / (target.var(dim=-1, keepdim=True) + 1e-6).sqrt()
    err = (patchify(denoised, patch_size) - target).pow(2).mean(dim=-1)
    return (err * mask).sum(dim=1) / mask.sum(dim=1)


def edm_loss(
    net: torch.nn.Module,
    images: torch.Tensor,
    class_labels: torch.Tensor | None,
    mask_ratio: float,
    cfg: LossConfig,
    model: ModelConfig,
) -> LossTerms:
    """One draw of the MaskDiT loss. images: (N, C, H, W); class_labels: (N,) int64 or None.

    ``net`` is only called (it may be wrapped for DDP / FSDP); the patch layout and sigma_data come
    from the network's config ``model``. Noise, masks and label dropout use the global RNG (saved in
    checkpoints for exact resume).
    """
    n, _, height, width = images.shape
    p = model.patch_size
    num_patches = (height // p) * (width // p)
    sigma = sample_sigma(n, cfg.P_mean, cfg.P_std, images.device)
    s = sigma.view(-1, 1, 1, 1)
    noisy = images + torch.randn_like(images) * s
    ids_keep = None
    if mask_ratio > 0:
        ids_keep = random_masking(n, num_patches, mask_ratio, device=images.device)
    denoised = net(noisy, sigma, class_labels, ids_keep=ids_keep)
    weighted = edm_weight(s, model.sigma_data) * (denoised - images).pow(2)
    if ids_keep is None:
        dsm = dsm_loss(weighted, p, None)
        return LossTerms(loss=dsm, dsm=dsm, mae=torch.zeros_like(dsm))
    mask = mask_from_ids(ids_keep, num_patches)
    dsm = dsm_loss(weighted, p, mask)
    mae = mae_loss(noisy, denoised, p, mask) if cfg.mae_coef > 0 else torch.zeros_like(dsm)
    return LossTerms(loss=dsm + cfg.mae_coef * mae, dsm=dsm, mae=mae)
