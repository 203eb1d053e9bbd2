"""Stable Diffusion's VAE (diffusers ``AutoencoderKL``) for latent-space models."""
from __future__ import annotations

import torch

LATENT_SCALE = 0.18215


def load_vae(name_or_path: str, device: torch.device | str = "cpu"):
    """``AutoencoderKL`` from a hub id (e.g. ``stabilityai/sd-vae-ft-ema``) or a local folder."""
    try:
        from diffusers.models import AutoencoderKL
    except ImportError as err:
        raise RuntimeError("latent models need diffusers to decode: pip install 'maskdit_fast[vae]'") from err
    try:
        return AutoencoderKL.from_pretrained(name_or_path).to(device).eval().requires_grad_(False)
    except Exception as err:
        raise RuntimeError(f"could not load the VAE weights {name_or_path!r} ({type(err).__name__}: {err}). "
                           "Without internet access, download them elsewhere and pass the local folder "
                           "with --vae PATH") from err


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, scale: float = LATENT_SCALE, batch_size: int = 16) -> torch.Tensor:
    """latents: (N, 4, h, w) -> images (N, 3, 8h, 8w) float in [-1, 1] on CPU."""
    device = next(vae.parameters()).device
    out = [vae.decode(chunk.to(device) / scale).sample.clamp(-1, 1).cpu() for chunk in latents.split(batch_size)]
    return torch.cat(out)
