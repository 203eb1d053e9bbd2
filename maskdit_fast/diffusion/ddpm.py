"""DDPM as DiT trains and samples it: the linear beta schedule, respacing, the posterior and the
learned-variance interpolation (Ho et al. 2020; Nichol & Dhariwal 2021).

Conventions: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps for t in [0, T-1] (T = 1000, t = 0 the
least noisy step); every coefficient is computed in float64 and cast to the sample's dtype when
used. In EDM's variables (x = x_t / sqrt(abar_t)), step t is the noise level
sigma_t = sqrt((1 - abar_t) / abar_t), so the two views are one process.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

NUM_STEPS = 1000          # DiT's training steps
BETA_START, BETA_END = 1e-4, 0.02


def linear_betas(num_steps: int = NUM_STEPS, start: float = BETA_START, end: float = BETA_END) -> torch.Tensor:
    """DiT's (and DDPM's) linear schedule: betas spaced evenly from ``start`` to ``end``, (T,) float64."""
    return torch.linspace(start, end, num_steps, dtype=torch.float64)


def space_timesteps(num_steps: int, count: int) -> list[int]:
    """``count`` step indices out of ``num_steps``, spread evenly from 0 to ``num_steps - 1`` as DiT's
    respacing picks them (one section: index round(i * (T-1)/(count-1)), the stride accumulated in
    floating point). Returns the sorted list."""
    if not 1 <= count <= num_steps:
        raise ValueError(f"cannot take {count} sampling steps out of {num_steps}: use 1..{num_steps}")
    stride = (num_steps - 1) / (count - 1) if count > 1 else 1
    taken, position = [], 0.0
    for _ in range(count):
        taken.append(round(position))
        position += stride
    return sorted(set(taken))


@dataclass(frozen=True)
class Schedule:
    """A discrete diffusion: ``betas`` (S,) float64 and, for a respaced one, ``steps`` (S,) int64 the
    original step index of each of its steps (what the network is told)."""

    betas: torch.Tensor
    steps: torch.Tensor

    @classmethod
    def dit(cls, num_steps: int = NUM_STEPS) -> Schedule:
        """The schedule the official DiT trains with (T = 1000 linear betas)."""
        betas = linear_betas(num_steps)
        return cls(betas, torch.arange(num_steps))

    def respaced(self, count: int) -> Schedule:
        """The process restricted to ``count`` evenly spaced steps: beta'_i = 1 - abar_{s_i} / abar_{s_{i-1}}
        keeps abar at the retained steps, so a sampler that walks them is the same process."""
        keep = torch.tensor(space_timesteps(len(self), count))
        abar = self.alphas_cumprod[keep]
        previous = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        return Schedule(1 - abar / previous, self.steps[keep])

    def __len__(self) -> int:
        return self.betas.shape[0]

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """abar_t, (S,) float64."""
        return torch.cumprod(1 - self.betas, 0)

    @property
    def alphas_cumprod_prev(self) -> torch.Tensor:
        """abar_{t-1} with abar_{-1} = 1, (S,) float64."""
        return torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])

    @property
    def sigmas(self) -> torch.Tensor:
        """EDM noise level of each step, sqrt((1 - abar_t) / abar_t), (S,) float64, increasing."""
        abar = self.alphas_cumprod
        return ((1 - abar) / abar).sqrt()

    @property
    def posterior_variance(self) -> torch.Tensor:
        """beta-tilde_t = beta_t (1 - abar_{t-1}) / (1 - abar_t), the variance of q(x_{t-1} | x_t, x_0), (S,)."""
        return self.betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)

    @property
    def posterior_log_variance_clipped(self) -> torch.Tensor:
        """log beta-tilde_t with step 0's value (0) replaced by step 1's, (S,)."""
        var = self.posterior_variance
        return torch.cat([var[1:2], var[1:]]).log() if len(self) > 1 else var.log()

    def at(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """values[t] (values: (S,) float64, t: (N,) indices into this schedule) as (N, 1, ..., 1) of
        ``like``'s dtype and device, to broadcast over a (N, C, H, W) sample."""
        picked = values.to(like.device)[t.to(like.device)]
        return picked.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise. x0, noise: (N, C, H, W); t: (N,)."""
        abar = self.alphas_cumprod
        return self.at(abar.sqrt(), t, x0) * x0 + self.at((1 - abar).sqrt(), t, x0) * noise

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), written as sqrt(1/abar) x_t - sqrt(1/abar - 1) eps."""
        abar = self.alphas_cumprod
        return self.at((1 / abar).sqrt(), t, x_t) * x_t - self.at((1 / abar - 1).sqrt(), t, x_t) * eps

    def posterior_mean(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Mean of q(x_{t-1} | x_t, x_0): beta_t sqrt(abar_{t-1}) / (1 - abar_t) x_0
        + (1 - abar_{t-1}) sqrt(1 - beta_t) / (1 - abar_t) x_t."""
        abar, prev = self.alphas_cumprod, self.alphas_cumprod_prev
        coef_x0 = self.betas * prev.sqrt() / (1 - abar)
        coef_xt = (1 - prev) * (1 - self.betas).sqrt() / (1 - abar)
        return self.at(coef_x0, t, x_t) * x0 + self.at(coef_xt, t, x_t) * x_t

    def model_log_variance(self, t: torch.Tensor, values: torch.Tensor | None) -> torch.Tensor:
        """log variance of p(x_{t-1} | x_t). ``values`` (N, C, H, W) in [-1, 1]: the network's learned
        interpolation, log var = f log beta_t + (1 - f) log beta-tilde_t (clipped) with f = (v + 1) / 2;
        None: the fixed small variance beta-tilde_t (clipped at step 0), shape (N, 1, 1, 1)."""
        min_log = self.posterior_log_variance_clipped
        if values is None:
            return self.at(min_log, t, torch.empty(t.shape[0], 1, 1, 1, dtype=torch.float32, device=t.device))
        frac = (values + 1) / 2
        return frac * self.at(self.betas.log(), t, values) + (1 - frac) * self.at(min_log, t, values)


def sigma_to_step(sigma: torch.Tensor, sigmas: torch.Tensor, snap: float = 1e-3) -> torch.Tensor:
    """The continuous step index of noise levels ``sigma`` (N,) on the schedule whose levels are
    ``sigmas`` (T,) increasing: linear interpolation of the index in log(sigma) between the two
    neighbouring steps, clamped to [0, T-1]; an index within ``snap`` of an integer is that integer
    (so sigma_t given in float32 gives exactly t). Returns (N,) float32."""
    log_levels = sigmas.log().to(sigma.device)
    log_sigma = sigma.double().log().clamp(log_levels[0], log_levels[-1])
    upper = torch.searchsorted(log_levels, log_sigma).clamp(1, len(sigmas) - 1)
    lo, hi = log_levels[upper - 1], log_levels[upper]
    index = (upper - 1) + (log_sigma - lo) / (hi - lo)
    nearest = index.round()
    index = torch.where((index - nearest).abs() < snap, nearest, index)
    return index.float()
