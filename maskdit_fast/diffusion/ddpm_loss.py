"""The DDPM training loss as DiT trains: eps MSE plus, with a learned variance, the variational
bound term of the variance with the mean frozen (Nichol & Dhariwal 2021's hybrid loss, lambda = 1
as DiT: no rescaling at T = 1000), at uniform step indices t in [0, T-1].

With MaskDiT's masking the per-pixel terms are averaged over the kept patches (as the EDM loss does)
and the MAE term is added on the masked ones (its prediction: the denoised estimate in x_t's scale).
"""
from __future__ import annotations

import math

import torch

from ..config import LossConfig, ModelConfig
from ..models.masking import mask_from_ids, random_masking
from .ddpm import Schedule
from .loss import LossTerms, dsm_loss, mae_loss

LOG2 = math.log(2.0)


def normal_kl(mean1: torch.Tensor, log_var1: torch.Tensor, mean2: torch.Tensor, log_var2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^log_var1) || N(mean2, e^log_var2)) elementwise, in nats."""
    return 0.5 * (log_var2 - log_var1 + (log_var1 - log_var2).exp() + (mean1 - mean2) ** 2 * (-log_var2).exp() - 1)


def _approx_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Standard normal CDF by the tanh approximation the DDPM codebases use (so the bound matches theirs)."""
    return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_nll(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """-log P(x) in nats, elementwise, of data in [-1, 1] quantised to 256 levels (bins of width 2/255)
    under N(mean, e^(2 log_scale)); the end bins extend to -inf and +inf."""
    centred = x - mean
    inv = (-log_scale).exp()
    cdf_hi = _approx_normal_cdf(inv * (centred + 1 / 255))
    cdf_lo = _approx_normal_cdf(inv * (centred - 1 / 255))
    log_below = cdf_hi.clamp(min=1e-12).log()
    log_above = (1 - cdf_lo).clamp(min=1e-12).log()
    log_bin = (cdf_hi - cdf_lo).clamp(min=1e-12).log()
    return -torch.where(x < -0.999, log_below, torch.where(x > 0.999, log_above, log_bin))


def vb_terms(schedule: Schedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
             values: torch.Tensor) -> torch.Tensor:
    """The variational bound term L_t in bits per dimension, elementwise (N, C, H, W): KL from the true
    posterior q(x_{t-1} | x_t, x_0) to p(x_{t-1} | x_t) for t > 0, the decoder's discretised NLL
    of x_0 for t = 0. p's mean comes from ``eps`` (pass it detached to train the variance only)."""
    mean = schedule.posterior_mean(schedule.predict_x0(x_t, t, eps), x_t, t)
    log_var = schedule.model_log_variance(t, values)
    true_mean = schedule.posterior_mean(x0, x_t, t)
    true_log_var = schedule.at(schedule.posterior_log_variance_clipped, t, x_t)
    kl = normal_kl(true_mean, true_log_var, mean, log_var) / LOG2
    nll = discretized_gaussian_nll(x0, mean, 0.5 * log_var) / LOG2
    return torch.where((t == 0).view(-1, 1, 1, 1), nll, kl)


def ddpm_loss(
    net: torch.nn.Module,
    images: torch.Tensor,
    class_labels: torch.Tensor | None,
    mask_ratio: float,
    cfg: LossConfig,
    model: ModelConfig,
) -> LossTerms:
    """One draw of the DDPM loss for a ``model.diffusion=ddpm`` network (a :class:`DDPMPrecond`, only
    called: it may be wrapped for DDP / FSDP; the patch layout comes from its config ``model``).
    images: (N, C, H, W); class_labels: (N,) int64 or None. Per-sample terms:
    ``dsm`` = eps MSE + VB (the diffusion loss), ``mae`` (masked training only); ``loss`` = dsm + mae_coef * mae.

    The network is called through its forward, in EDM's variables: x = x_0 + sigma_t eps is x_t /
    sqrt(abar_t), and sigma_t maps back to the step t exactly.
    """
    schedule = Schedule.dit()
    n, c, height, width = images.shape
    p = model.patch_size
    num_patches = (height // p) * (width // p)
    t = torch.randint(0, len(schedule), (n,), device=images.device)
    sigma = schedule.sigmas.to(images.device)[t].float()
    s = sigma.view(-1, 1, 1, 1)
    noise = torch.randn_like(images)
    x = images + s * noise
    ids_keep = random_masking(n, num_patches, mask_ratio, device=images.device) if mask_ratio > 0 else None
    out = net(x, sigma, class_labels, ids_keep=ids_keep, raw=True).float()
    eps = out[:, :c]
    per_pixel = (noise - eps) ** 2
    x_t = x / (1 + s**2).sqrt()
    if out.shape[1] > c:  # learned variance: its bound term, the mean held fixed
        per_pixel = per_pixel + vb_terms(schedule, images.float(), x_t, t, eps.detach(), out[:, c:])
    mask = None if ids_keep is None else mask_from_ids(ids_keep, num_patches)
    diffusion = dsm_loss(per_pixel, p, mask)
    if mask is None or cfg.mae_coef == 0:
        return LossTerms(loss=diffusion, dsm=diffusion, mae=torch.zeros_like(diffusion))
    # MAE in x_t's scale: sqrt(abar_t) D = x_t - sqrt(1 - abar_t) eps stays O(1) where D = x - sigma eps
    # (sigma up to 157) would not; the target is normalised per patch, so its scale does not matter.
    mae = mae_loss(x_t, x_t - (s**2 / (1 + s**2)).sqrt() * eps, p, mask)
    return LossTerms(loss=diffusion + cfg.mae_coef * mae, dsm=diffusion, mae=mae)
