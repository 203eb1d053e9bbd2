"""A DDPM (eps-prediction) network behind the package's EDM denoiser interface.

The official DiT predicts eps from x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps at step index t.
In EDM's variables x = x_t / sqrt(abar_t) = x_0 + sigma_t eps with sigma_t = sqrt((1 - abar_t) / abar_t),
so the denoised image is

    D(x; sigma_t) = x - sigma_t * eps,   eps = first C channels of F(x / sqrt(1 + sigma_t^2), t, y)

(1 / sqrt(1 + sigma_t^2) = sqrt(abar_t)). This holds exactly for the 1000 training steps. For a sigma
between two steps the network is told a fractional step index, interpolated linearly in log(sigma)
between the neighbouring steps (DiT's timestep embedding is a smooth function of t, and the scaling
1 / sqrt(1 + sigma^2) is exact for any sigma); sigmas outside [sigma_0, sigma_999] = [0.0100, 157.4]
use the end steps' index (0 or 999) with their own exact scaling. An index within 1e-3 of an integer
is taken as that integer, so sigma_t given in float32 selects exactly step t. So the EDM samplers, the
benchmarks, eval and DyDiT take DiT checkpoints as they are.

``predict`` gives the DDPM view (eps and the learned-variance values at an integer step) that the
DDPM / DDIM samplers use.
"""
from __future__ import annotations

import torch

from ..models import DiT
from .ddpm import Schedule, sigma_to_step
from .denoiser import Denoiser

GUIDANCE = ("standard", "dit")


class DDPMPrecond(Denoiser):
    """D(x; sigma) = x - sigma * eps(x / sqrt(1 + sigma^2), t(sigma)) for a DDPM-trained DiT / MaskDiT.

    The raw network is ``self.model`` (parameter names ``model.*``, as for :class:`EDMPrecond`); it
    outputs (N, C, H, W) eps, or (N, 2C, H, W) eps and variance values with ``learn_sigma``.
    """

    def __init__(self, model: DiT, schedule: Schedule | None = None):
        super().__init__(model)
        self.schedule = schedule or Schedule.dit()
        # The step levels in float64 on the CPU (not a buffer: a module-wide dtype cast must not round them).
        self.sigmas = self.schedule.sigmas

    def noise_level(self, noise_labels: torch.Tensor) -> torch.Tensor:
        """sigma (N,) of the raw network's step indices (N,) (fractional ones: the interpolation in log sigma)."""
        t = noise_labels.detach().double().cpu().clamp(0, len(self.sigmas) - 1)
        lower = t.floor().long().clamp(max=len(self.sigmas) - 2)
        log_sigmas = self.sigmas.log()
        return (log_sigmas[lower] + (t - lower) * (log_sigmas[lower + 1] - log_sigmas[lower])).exp().float()

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
        cfg_scale: float | None = None,
        ids_keep: torch.Tensor | None = None,
        guidance: str = "standard",
        raw: bool = False,
    ) -> torch.Tensor:
        """Denoised x. x: (N, C, H, W); sigma: scalar or (N,); class_labels: (N,) int64 or None;
        cfg_scale: guidance scale (None or 1 = off); guidance: ``standard`` (every eps channel) or
        ``dit`` (the official DiT's: the first 3 output channels); ids_keep: (N, K) or None
        -> (N, C, H, W) float32. ``raw``: the network's output instead, eps and the variance values
        (N, C_out, H, W) (the DDPM loss calls it so, through the forward that DDP wraps)."""
        x, sigma, class_labels = self.check_inputs(x, sigma, class_labels)
        s = sigma.view(-1, 1, 1, 1)
        t = sigma_to_step(sigma, self.sigmas)
        eps, values = self.predict(x / (1 + s**2).sqrt(), t, class_labels, cfg_scale, guidance, ids_keep)
        if raw:
            return eps if values is None else torch.cat([eps, values], dim=1)
        return x - s * eps

    def predict(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        cfg_scale: float | None = None,
        guidance: str = "standard",
        ids_keep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The DDPM view: x_t (N, C, H, W) at step indices t (N,) of the 1000-step schedule (float
        values allowed) -> (eps (N, C, H, W), variance values (N, C, H, W) in [-1, 1] or None
        without ``learn_sigma``), float32.

        Guidance runs the conditional and the no-class rows in one batch. ``standard`` combines every
        eps channel, uncond + s (cond - uncond); ``dit`` does as the official DiT's
        ``forward_with_cfg``: only output channels 0..2 are combined (for 4-channel latents: three
        of the four eps channels), every other channel is the conditional output. The variance
        values are always the conditional ones."""
        if guidance not in GUIDANCE:
            raise ValueError(f"guidance must be one of {GUIDANCE}, got {guidance!r}")
        c = self.model.cfg.in_channels
        t = t.to(device=x_t.device, dtype=torch.float32).reshape(-1).expand(x_t.shape[0])
        guided = cfg_scale is not None and cfg_scale != 1.0 and self.num_classes > 0
        if not guided:
            out = self.model(x_t.float(), t, class_labels, ids_keep).float()
        else:
            if ids_keep is not None:
                raise ValueError("guidance is for sampling; it cannot be combined with masking")
            null = torch.full((x_t.shape[0],), self.num_classes, dtype=torch.long, device=x_t.device)
            cond = class_labels if class_labels is not None else null
            both = self.model(torch.cat([x_t.float()] * 2), torch.cat([t, t]), torch.cat([cond, null])).float()
            out, uncond = both.chunk(2)
            k = c if guidance == "standard" else 3
            out = torch.cat([uncond[:, :k] + cfg_scale * (out[:, :k] - uncond[:, :k]), out[:, k:]], dim=1)
        return out[:, :c], (out[:, c:] if out.shape[1] > c else None)
