"""Turning a trained network into images: per-sample seeded noise, batched EDM / DDPM / DDIM sampling, uint8
images, PNG grids and ``.npz`` batches in the layout of ADM's evaluation suite (``arr_0``: uint8 NHWC).

Image layouts (the rule is by dtype): uint8 data is always (N, H, W, C), floating-point data is always
(N, C, H, W) in [-1, 1]. Quantisation follows EDM/ADM: ``uint8 = clip(x * 127.5 + 128, 0, 255)``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .checkpoint import load_checkpoint, sample_settings
from .config import Config, SampleConfig
from .diffusion.ddpm_precond import DDPMPrecond
from .diffusion.ddpm_samplers import ddim_sample, ddpm_sample, eps_model
from .diffusion.denoiser import Denoiser
from .diffusion.samplers import edm_sample
from .models.precision import autocast_for

log = logging.getLogger(__name__)
ImageBatch = np.ndarray | torch.Tensor


def seeded_noise(seeds: list[int], shape: tuple[int, ...], device: torch.device | str) -> torch.Tensor:
    """(len(seeds), *shape) standard normal noise, sample i drawn from its own generator seeded
    ``seeds[i]``, so an image depends on its seed only (not on the batch size or the GPU count)."""
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(noise).to(device)


def seed_labels(seeds: list[int], num_classes: int, class_index: int | None = None) -> torch.Tensor | None:
    """Class of each seed's image: ``class_index`` for all, else ``seed % num_classes`` (so consecutive
    seeds are class-balanced and an image depends on its seed only); None for unconditional models."""
    if num_classes == 0:
        if class_index is not None:
            raise ValueError("this model is unconditional (num_classes=0); it takes no class")
        return None
    if class_index is not None:
        if not 0 <= class_index < num_classes:
            raise ValueError(f"class {class_index} is out of range: the model has classes 0..{num_classes - 1}")
        return torch.full((len(seeds),), class_index, dtype=torch.long)
    return torch.tensor(seeds, dtype=torch.long) % num_classes


@dataclass
class Sampling:
    """A checkpoint ready to sample: its network (eval mode, on the device), the sampler settings (the
    checkpoint's, with the caller's overrides), the VAE that decodes a latent model (None for pixel
    models) and the latent scale."""

    net: Denoiser
    sample: SampleConfig
    vae: str | None
    latent_scale: float


def open_for_sampling(ckpt: str | Path, device: torch.device, steps: int | None = None,
                      cfg_scale: float | None = None, solver: str | None = None, vae: str | None = None,
                      guidance: str | None = None) -> Sampling:
    """The one place that merges a checkpoint's sampler settings with a command line's (``sample.py`` and
    ``python -m maskdit_fast.eval generate``). Raises FileNotFoundError / ValueError (ConfigError
    included) with a message that says what to do."""
    net = load_checkpoint(ckpt, device)
    stored, ckpt_vae, latent_scale = sample_settings(ckpt)
    overrides = {k: v for k, v in (("num_steps", steps), ("cfg_scale", cfg_scale), ("solver", solver),
                                   ("guidance", guidance)) if v is not None}
    sample_cfg = SampleConfig(**{**stored, **overrides})
    if sample_cfg.guidance == "dit" and net.model.cfg.diffusion != "ddpm":
        raise ValueError("--guidance dit (the official DiT's three guided channels) is for DDPM-trained "
                         "checkpoints such as converted official DiTs; use --guidance standard")
    channels = net.model.cfg.in_channels
    latent = channels not in (1, 3)  # images come from the VAE that made the latents
    vae = (vae or ckpt_vae) if latent else None
    if latent and not vae:
        raise ValueError(f"{ckpt} is a {channels}-channel latent model and names no VAE: pass --vae (an "
                         "AutoencoderKL hub id such as stabilityai/sd-vae-ft-ema, or a local folder)")
    return Sampling(net, sample_cfg, vae, latent_scale)


@torch.no_grad()
def generate(
    net: Denoiser,
    seeds: list[int],
    labels: torch.Tensor | None,
    sample_cfg: SampleConfig,
    batch_size: int = 64,
    progress: bool = False,
    precision: str = "fp32",
) -> torch.Tensor:
    """Sample one image per seed. labels: (len(seeds),) int64 or None -> (N, C, H, W) float32 on CPU
    (model space: pixels in [-1, 1] or latents). ``precision``: the network's autocast (bf16 | fp32),
    resolved by :func:`maskdit_fast.models.precision.resolve_precision` from the callers' ``auto``."""
    cfg = net.model.cfg
    device = next(net.parameters()).device
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    out = []
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start:start + batch_size]
        y = None if labels is None else labels[start:start + len(chunk)].to(device)
        with autocast_for(precision, device):
            if sample_cfg.solver in ("ddpm", "ddim"):
                x = _sample_ddpm(net, chunk, shape, y, sample_cfg, device, progress)
            else:
                guidance = {} if sample_cfg.guidance == "standard" else {"guidance": sample_cfg.guidance}
                if guidance and not isinstance(net, DDPMPrecond):
                    raise ValueError("sample.guidance=dit (the official DiT's three guided channels) is for "
                                     "DDPM-trained checkpoints; use guidance=standard")
                x = edm_sample(lambda x, s: net(x, s, y, cfg_scale=sample_cfg.cfg_scale, **guidance),
                               seeded_noise(chunk, shape, device), num_steps=sample_cfg.num_steps,
                               sigma_min=sample_cfg.sigma_min, sigma_max=sample_cfg.sigma_max, rho=sample_cfg.rho,
                               solver=sample_cfg.solver, progress=progress)
        out.append(x.float().cpu())
    return torch.cat(out)


def _sample_ddpm(net: Denoiser, seeds: list[int], shape: tuple[int, ...], labels: torch.Tensor | None,
                 sample_cfg: SampleConfig, device: torch.device, progress: bool) -> torch.Tensor:
    """DDPM / DDIM sampling of one batch; each image's starting and per-step noise come from its own
    seed's generator, so an image depends on its seed only."""
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def draw(_step: int = 0) -> torch.Tensor:
        return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)

    model = eps_model(net, labels, sample_cfg.cfg_scale, sample_cfg.guidance)
    if sample_cfg.solver == "ddpm":
        return ddpm_sample(model, draw(), sample_cfg.num_steps, draw, progress=progress)
    return ddim_sample(model, draw(), sample_cfg.num_steps, sample_cfg.ddim_eta, draw, progress=progress)


def to_uint8_nhwc(images: ImageBatch) -> np.ndarray:
    """Return `images` as a uint8 (N, H, W, C) numpy array (C = 1 or 3).

    Args:
        images: uint8 (N, H, W, C), or float (N, C, H, W) in [-1, 1] (numpy or torch, any device).
    """
    array = images.detach().cpu() if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
    if array.dtype == torch.uint8:
        check_channels(array.shape, channel_axis=3)
        return array.numpy()
    if not array.is_floating_point():
        raise TypeError(f"expected uint8 or floating-point images, got {array.dtype}")
    check_channels(array.shape, channel_axis=1)
    quantised = (array.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    return quantised.permute(0, 2, 3, 1).contiguous().numpy()


def check_channels(shape: tuple[int, ...], channel_axis: int) -> None:
    """Refuse a shape that is not 4-D with 1 or 3 channels on ``channel_axis``."""
    if len(shape) != 4 or shape[channel_axis] not in (1, 3):
        layout = "(N, H, W, C)" if channel_axis == 3 else "(N, C, H, W)"
        raise ValueError(f"expected images of shape {layout} with C in (1, 3), got {tuple(shape)}")


def make_grid(images: np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """(N, H, W, C) uint8 images -> one (rows * (H + pad) + pad, nrow * (W + pad) + pad, C) uint8
    grid on a white background, ``nrow`` images per row (default: a square)."""
    n, h, w, c = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = img
    return grid


def save_grid(images: np.ndarray, path: str | Path, nrow: int | None = None, pad: int = 2) -> None:
    """Write (N, H, W, C) uint8 images as one PNG grid with ``nrow`` images per row."""
    grid = make_grid(images, nrow, pad)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)


def save_npz(path: str | Path, images: np.ndarray, labels: torch.Tensor | None) -> None:
    """ADM evaluator layout: ``arr_0`` (N, H, W, C) uint8, plus ``labels`` (N,) when conditional."""
    arrays = {"arr_0": images}
    if labels is not None:
        arrays["labels"] = labels.numpy()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def write_sample_grid(cfg: Config, ema_net: Denoiser, path: Path, progress: bool = False) -> bool:
    """A grid of EMA samples, one row per class (up to 10 classes), fixed seeds; True if written.
    Latent models need ``data.vae`` to decode them; without it nothing is sampled."""
    m = cfg.model
    if not cfg.data.vae and m.in_channels not in (1, 3):
        log.info("no sample grid at %s: set data.vae to decode the model's %d-channel latents", path.name, m.in_channels)
        return False
    per_row = cfg.sample.grid_per_class
    rows = min(m.num_classes, 10) if m.num_classes else 8
    classes = None
    if m.num_classes:
        chosen = torch.linspace(0, m.num_classes - 1, rows).round().long()
        classes = chosen.repeat_interleave(per_row)
    seeds = list(range(rows * per_row))
    images = generate(ema_net, seeds, classes, cfg.sample, progress=progress)
    if cfg.data.vae:
        from .data.vae import decode_latents, load_vae
        try:
            vae = load_vae(cfg.data.vae, next(ema_net.parameters()).device)
        except RuntimeError as err:  # e.g. a hub id on an offline node: not worth stopping the run for
            log.warning("no sample grid at %s: %s", path.name, err)
            return False
        images = decode_latents(vae, images, cfg.data.latent_scale)
    save_grid(to_uint8_nhwc(images), path, nrow=per_row)
    return True
