"""EDM preconditioning (Karras et al. 2022) around a raw DiT / MaskDiT / DyDiT network, and ``build_net``
(the denoiser for a config: EDM's, or :class:`~maskdit_fast.diffusion.ddpm_precond.DDPMPrecond` for
DDPM-trained networks)."""
from __future__ import annotations

import torch

import kernels

from ..config import ConfigError, ModelConfig, RouterConfig
from ..models import DiT, build_model
from ..models.dydit import DyDiT, DyMaskDiT
from .ddpm_precond import DDPMPrecond
from .denoiser import Denoiser


class EDMPrecond(Denoiser):
    """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise), with classifier-free guidance.

    The raw network is ``self.model`` so that parameter names carry the official ``model.`` prefix.
    """

    def __init__(self, model: DiT, sigma_data: float = 0.5):
        super().__init__(model)
        self.sigma_data = sigma_data

    def noise_level(self, noise_labels: torch.Tensor) -> torch.Tensor:
        """sigma (N,) of the raw network's noise labels c_noise = ln(sigma) / 4 (N,)."""
        return (noise_labels.float() * 4).exp()

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
        cfg_scale: float | None = None,
        ids_keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Denoised x.

        x: (N, C, H, W); sigma: scalar, (N,) or (N, 1, 1, 1); class_labels: (N,) int64 class indices
        (``num_classes`` = no class) or None; cfg_scale: guidance scale (None or 1 = off);
        ids_keep: (N, K) kept tokens for masked training -> (N, C, H, W) float32.
        """
        x, sigma, class_labels = self.check_inputs(x, sigma, class_labels)
        s = sigma.view(-1, 1, 1, 1)
        sd2 = self.sigma_data**2
        c_skip = sd2 / (s**2 + sd2)
        c_out = s * self.sigma_data / (s**2 + sd2).sqrt()
        c_in = 1 / (s**2 + sd2).sqrt()
        c_noise = sigma.log() / 4
        guided = cfg_scale is not None and cfg_scale != 1.0 and self.num_classes > 0
        if guided:
            if ids_keep is not None:
                raise ValueError("guidance is for sampling; it cannot be combined with masking")
            null = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            cond = class_labels if class_labels is not None else null
            out = self.model(torch.cat([c_in * x] * 2), torch.cat([c_noise] * 2), torch.cat([cond, null]))
            out_cond, out_uncond = out.float().chunk(2)
            out = out_uncond + cfg_scale * (out_cond - out_uncond)
        else:
            out = self.model(c_in * x, c_noise, class_labels, ids_keep).float()
        return c_skip * x + c_out * out


def check_kernels() -> None:
    """The kernel backend in force, checked before any work: forced Triton kernels (``model.kernels=triton``
    or ``MASKDIT_KERNELS=triton``) where Triton does not import are a :class:`~maskdit_fast.config.ConfigError`;
    under ``auto`` without Triton, the one notice that the PyTorch references run."""
    try:
        kernels.check_backend()
    except kernels.TritonUnavailable as err:
        raise ConfigError(str(err)) from None


def build_net(cfg: ModelConfig, router: RouterConfig | None = None) -> Denoiser:
    """A freshly initialised network for ``cfg`` behind the EDM denoiser interface: DiT / MaskDiT, or
    with ``router`` the DyDiT version of it (weights random, routers all on); an :class:`EDMPrecond`,
    or for ``model.diffusion=ddpm`` a :class:`~maskdit_fast.diffusion.ddpm_precond.DDPMPrecond`. Checks the
    kernel backend first (:func:`check_kernels`)."""
    check_kernels()
    model = build_model(cfg) if router is None else (DyMaskDiT if cfg.arch == "maskdit" else DyDiT)(cfg, router)
    if cfg.diffusion == "ddpm":
        return DDPMPrecond(model)
    return EDMPrecond(model, cfg.sigma_data)
