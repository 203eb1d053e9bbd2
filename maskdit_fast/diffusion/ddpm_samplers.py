"""DDPM ancestral and DDIM samplers on DiT's schedule, respaced as DiT's ``sample.py`` does.

Both walk ``num_steps`` steps picked evenly out of the 1000 training steps (250 in the official
sampling); the network is told the original step indices. Any network of this package can be
sampled this way: a :class:`DDPMPrecond` gives eps and its learned variance directly; an EDM
network gives eps = (x - D(x; sigma_t)) / sigma_t at the step's noise level and the fixed small
variance beta-tilde_t (it has no learned one).
"""
from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from .ddpm import Schedule
from .ddpm_precond import DDPMPrecond
from .denoiser import Denoiser

# (x_t (N, C, H, W), original step indices (N,) int64) -> (eps, variance values or None)
EpsModel = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
# step position i (counting down) -> (N, C, H, W) standard normal noise for that step
StepNoise = Callable[[int], torch.Tensor]


def eps_model(net: Denoiser, class_labels: torch.Tensor | None, cfg_scale: float | None = None,
              guidance: str = "standard") -> EpsModel:
    """The DDPM view of ``net`` for fixed class labels (N,) or None and guidance settings."""
    if isinstance(net, DDPMPrecond):
        return lambda x_t, t: net.predict(x_t, t, class_labels, cfg_scale, guidance)
    if guidance != "standard":
        raise ValueError("guidance=dit (three guided channels, as the official DiT) is for DDPM-trained "
                         "checkpoints (official DiT); use guidance=standard")
    sigmas = Schedule.dit().sigmas

    def from_denoiser(x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, None]:
        sigma = sigmas.to(x_t.device)[t].float()
        s = sigma.view(-1, 1, 1, 1)
        x = x_t * (1 + s**2).sqrt()  # x_t / sqrt(abar_t)
        return (x - net(x, sigma, class_labels, cfg_scale=cfg_scale)) / s, None

    return from_denoiser


def p_mean_log_variance(schedule: Schedule, x_t: torch.Tensor, i: torch.Tensor, eps: torch.Tensor,
                        values: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and log variance of p(x_{i-1} | x_i) at positions ``i`` (N,) of ``schedule``: the
    posterior mean at x_0 = predict_x0(x_t, eps) (not clipped, as DiT samples latents), the learned
    log variance (or the fixed small one without ``values``). Shapes: (N, C, H, W), (N, C|1, H|1, W|1)."""
    x0 = schedule.predict_x0(x_t, i, eps)
    return schedule.posterior_mean(x0, x_t, i), schedule.model_log_variance(i, values)


@torch.no_grad()
def ddpm_sample(model: EpsModel, noise: torch.Tensor, num_steps: int = 250, step_noise: StepNoise | None = None,
                schedule: Schedule | None = None, progress: bool = False) -> torch.Tensor:
    """Ancestral sampling from x_T = ``noise`` (N, C, H, W) over ``num_steps`` respaced steps of
    ``schedule`` (DiT's by default); ``step_noise(i)`` draws each step's noise (default
    ``torch.randn_like``; the last step adds none). Returns x_0, float32."""
    spaced = (schedule or Schedule.dit()).respaced(num_steps)
    x = noise.float()
    n = x.shape[0]
    for i in tqdm(range(len(spaced) - 1, -1, -1), desc="ddpm", disable=not progress, leave=False):
        at = torch.full((n,), i, dtype=torch.long, device=x.device)
        eps, values = model(x, spaced.steps.to(x.device)[at])
        mean, log_var = p_mean_log_variance(spaced, x, at, eps, values)
        if i == 0:
            x = mean
        else:
            z = step_noise(i) if step_noise is not None else torch.randn_like(x)
            x = mean + (0.5 * log_var).exp() * z
    return x


@torch.no_grad()
def ddim_sample(model: EpsModel, noise: torch.Tensor, num_steps: int = 250, eta: float = 0.0,
                step_noise: StepNoise | None = None, schedule: Schedule | None = None,
                progress: bool = False) -> torch.Tensor:
    """DDIM (Song et al. 2021) from x_T = ``noise`` over ``num_steps`` respaced steps:
    x_{prev} = sqrt(abar_prev) x_0 + sqrt(1 - abar_prev - s^2) eps + s z, with
    s = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev) (eta = 0: deterministic).
    The learned variance is not used. Returns x_0, float32."""
    spaced = (schedule or Schedule.dit()).respaced(num_steps)
    abar, prev = spaced.alphas_cumprod, spaced.alphas_cumprod_prev
    spread = eta * ((1 - prev) / (1 - abar)).sqrt() * (1 - abar / prev).sqrt()
    x = noise.float()
    n = x.shape[0]
    for i in tqdm(range(len(spaced) - 1, -1, -1), desc="ddim", disable=not progress, leave=False):
        at = torch.full((n,), i, dtype=torch.long, device=x.device)
        eps, _ = model(x, spaced.steps.to(x.device)[at])
        x0 = spaced.predict_x0(x, at, eps)
        s = spaced.at(spread, at, x)
        x = spaced.at(prev.sqrt(), at, x) * x0 + spaced.at((1 - prev - spread**2).clamp(min=0).sqrt(), at, x) * eps
        if i > 0 and eta > 0:
            x = x + s * (step_noise(i) if step_noise is not None else torch.randn_like(x))
    return x
