"""Turning a trained network into images: per-sample seeded noise, batched EDM sampling, PNG grids
and ``.npz`` batches in the layout of ADM's evaluation suite (``arr_0``: uint8 NHWC)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .config import SampleConfig
from .diffusion.edm import EDMPrecond
from .diffusion.samplers import edm_sample


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


@torch.no_grad()
def generate(
    net: EDMPrecond,
    seeds: list[int],
    labels: torch.Tensor | None,
    sample_cfg: SampleConfig,
    batch_size: int = 64,
    progress: bool = False,
) -> torch.Tensor:
    """Sample one image per seed. labels: (len(seeds),) int64 or None -> (N, C, H, W) float32 on CPU
    (model space: pixels in [-1, 1] or latents)."""
    cfg = net.model.cfg
    device = next(net.parameters()).device
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    out = []
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start:start + batch_size]
        y = None if labels is None else labels[start:start + len(chunk)].to(device)
        noise = seeded_noise(chunk, shape, device)
        x = edm_sample(lambda x, s: net(x, s, y, cfg_scale=sample_cfg.cfg_scale), noise,
                       num_steps=sample_cfg.num_steps, sigma_min=sample_cfg.sigma_min,
                       sigma_max=sample_cfg.sigma_max, rho=sample_cfg.rho, solver=sample_cfg.solver,
                       progress=progress)
        out.append(x.cpu())
    return torch.cat(out)


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
