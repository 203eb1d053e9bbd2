"""The bundled MNIST subset: 10,000 real digits shipped inside the package (see data/README.md)."""
from __future__ import annotations

from importlib import resources

import numpy as np
import torch

MNIST_FILE = "mnist10k.npz"
MNIST_SHA256 = "f1a23f2fb1a1c97bb00a811807ddd50a888dbcdcdead94147993273c22ee3f37"


def load_mnist_uint8() -> tuple[np.ndarray, np.ndarray]:
    """The raw digits: images (10000, 28, 28) uint8 (255 = ink), labels (10000,) uint8."""
    with resources.files("maskdit_fast.data").joinpath(MNIST_FILE).open("rb") as f:
        data = np.load(f)
        return data["images"], data["labels"]


def load_mnist(device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Digits ready for training: images (10000, 1, 32, 32) float32 in [-1, 1] (28x28 zero-padded
    by 2 pixels to 32x32), labels (10000,) int64."""
    images, labels = load_mnist_uint8()
    x = torch.from_numpy(images).float().div(127.5).sub(1.0)
    x = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0).unsqueeze(1)
    return x.to(device), torch.from_numpy(labels.astype(np.int64)).to(device)
