"""The two layouts that generated samples come in, and conversions between them.

- uint8 (N, H, W, C) arrays: ADM's evaluation-suite layout, stored under `arr_0` in an `.npz`.
- float (N, C, H, W) tensors in [-1, 1]: what the diffusion models produce and consume.

The rule is by dtype: uint8 data is always NHWC, floating-point data is always NCHW in [-1, 1].
Quantisation follows EDM/ADM: `uint8 = clip(x * 127.5 + 128, 0, 255)` (round to nearest).
"""

from pathlib import Path

import numpy as np
import torch

from ..generate import ImageBatch, check_channels, to_uint8_nhwc

__all__ = ["ImageBatch", "load_npz_images", "to_float_nchw", "to_uint8_nhwc"]


def to_float_nchw(images: ImageBatch) -> torch.Tensor:
    """Return `images` as a float32 (N, C, H, W) tensor in [-1, 1] (on its device if it was a tensor).

    Args:
        images: uint8 (N, H, W, C), or float (N, C, H, W) in [-1, 1] (numpy or torch).
    """
    tensor = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
    if tensor.dtype == torch.uint8:
        check_channels(tensor.shape, channel_axis=3)
        return tensor.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if not tensor.is_floating_point():
        raise TypeError(f"expected uint8 or floating-point images, got {tensor.dtype}")
    check_channels(tensor.shape, channel_axis=1)
    return tensor.float()


def load_npz_images(path: str | Path) -> np.ndarray:
    """Load the uint8 (N, H, W, C) images stored under `arr_0` in an ADM-style `.npz` batch."""
    with np.load(path) as data:
        if "arr_0" not in data:
            raise KeyError(f"{path} has no 'arr_0' image array (keys: {sorted(data.keys())})")
        images = data["arr_0"]
    if images.dtype != np.uint8:
        raise TypeError(f"{path}: 'arr_0' must be uint8 (N, H, W, C), got {images.dtype}")
    check_channels(images.shape, channel_axis=3)
    return images
