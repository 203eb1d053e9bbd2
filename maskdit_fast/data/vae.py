"""Stable Diffusion's VAE (diffusers ``AutoencoderKL``) for latent-space models: loading, encoding
images to posteriors (``prepare``, ``data.source=images``) and decoding samples."""
from __future__ import annotations

from pathlib import Path

import torch

LATENT_SCALE = 0.18215


def load_vae(name_or_path: str, device: torch.device | str = "cpu"):
    """``AutoencoderKL`` from a hub id (e.g. ``stabilityai/sd-vae-ft-ema``) or a local folder."""
    try:
        from diffusers.models import AutoencoderKL
    except ImportError as err:
        raise RuntimeError("latent models need diffusers to encode and decode: pip install 'maskdit_fast[vae]'") from err
    try:
        return AutoencoderKL.from_pretrained(name_or_path).to(device).eval().requires_grad_(False)
    except Exception as err:
        raise RuntimeError(f"could not load the VAE weights {name_or_path!r} ({type(err).__name__}: {err}). "
                           "Without internet access, download them elsewhere and pass the local folder "
                           "with --vae PATH") from err


def vae_downsampling(vae) -> int:
    """Image side / latent side of an ``AutoencoderKL`` (8 for Stable Diffusion's)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def vae_scale(vae) -> float:
    """The VAE's latent ``scaling_factor`` (0.18215 for Stable Diffusion's)."""
    return float(getattr(vae.config, "scaling_factor", LATENT_SCALE) or LATENT_SCALE)


@torch.no_grad()
def encode_posterior(vae, images: torch.Tensor, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """images (n, H, W, 3) uint8 (any device) -> posterior ``mean``, ``logvar`` (n, C, H/f, W/f)
    float32 on the VAE's device (``logvar`` clamped to [-30, 20] by diffusers), encoded in the VAE's
    dtype in chunks of ``batch_size``, outside any autocast region."""
    param = next(vae.parameters())
    means, logvars = [], []
    with torch.autocast(param.device.type, enabled=False):
        for chunk in images.split(batch_size):
            x = chunk.to(param.device, non_blocking=True).permute(0, 3, 1, 2).to(param.dtype).div(127.5).sub(1.0)
            dist = vae.encode(x).latent_dist
            means.append(dist.mean.float())
            logvars.append(dist.logvar.float())
    return torch.cat(means), torch.cat(logvars)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, scale: float = LATENT_SCALE, batch_size: int = 16) -> torch.Tensor:
    """latents: (N, 4, h, w) -> images (N, 3, 8h, 8w) float in [-1, 1] on CPU."""
    device = next(vae.parameters()).device
    out = [vae.decode(chunk.to(device) / scale).sample.clamp(-1, 1).cpu() for chunk in latents.split(batch_size)]
    return torch.cat(out)


def random_vae(kind: str, path: Path) -> Path:
    """Save a randomly initialised AutoencoderKL under ``path`` and return ``path``: ``tiny`` (8
    channels wide, for tests) or ``sd`` (Stable Diffusion's architecture: 4 blocks of 128/256/512/512
    channels, 2 layers each, for timing). Both have SD's 8x downsampling and 4 latent channels; no
    download, seeded (the global RNG is left as it was)."""
    from diffusers import AutoencoderKL
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if kind == "tiny":
            vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4,
                                norm_num_groups=4, sample_size=32)
        else:
            vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                                norm_num_groups=32, sample_size=256)
    vae.save_pretrained(path)
    return path
