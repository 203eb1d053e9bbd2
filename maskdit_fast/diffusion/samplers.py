"""EDM deterministic samplers (Heun's 2nd order and Euler) with classifier-free guidance."""
from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def edm_time_steps(
    num_steps: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """EDM noise levels sigma_0 = sigma_max > ... > sigma_{n-1} = sigma_min, then 0.

    Returns (num_steps + 1,) float64.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    denom = max(num_steps - 1, 1)
    t = (sigma_max ** (1 / rho) + i / denom * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64, device=device)])


@torch.no_grad()
def edm_sample(
    denoise: Denoiser,
    noise: torch.Tensor,
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    solver: str = "heun",
    progress: bool = False,
) -> torch.Tensor:
    """Integrate the probability-flow ODE from ``noise * sigma_max`` to sigma = 0.

    denoise(x (N, ...) float32, sigma (N,) float32) -> denoised x; noise: (N, ...) standard normal.
    The state is kept in float64 as in EDM. Heun adds a correction at every step but the last
    (2*num_steps - 1 evaluations); Euler uses one evaluation per step. Returns float32.
    """
    if solver not in ("heun", "euler"):
        raise ValueError(f"solver must be 'heun' or 'euler', got {solver!r}")
    t_steps = edm_time_steps(num_steps, sigma_min, sigma_max, rho, noise.device)
    n = noise.shape[0]

    def slope(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        denoised = denoise(x.float(), t.float().expand(n)).double()
        return (x - denoised) / t

    x = noise.double() * t_steps[0]
    for i in tqdm(range(num_steps), desc="sampling", disable=not progress, leave=False):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        d_cur = slope(x, t_cur)
        x_next = x + (t_next - t_cur) * d_cur
        if solver == "heun" and i < num_steps - 1:
            x_next = x + (t_next - t_cur) * 0.5 * (d_cur + slope(x_next, t_next))
        x = x_next
    return x.float()
