"""Fixtures of tests/eval: a tiny randomly initialised feature extractor that stands in for Inception-v3
(the MNIST classifier fixtures live in tests/conftest.py)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F



class TinyExtractor(nn.Module):
    """A random 2-layer CNN with the `FeatureExtractor` interface: pool (B, 16), spatial (B, 32), logits (B, 10)."""

    name = "tiny-random-test"

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 10)
        for parameter in self.parameters():
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.3

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images.float() / 127.5 - 1  # (B, 3, H, W)
        h1 = F.relu(self.conv1(x))  # (B, 8, H/2, W/2)
        h2 = F.relu(self.conv2(h1))  # (B, 16, H/4, W/4)
        pool = h2.mean(dim=(2, 3))
        spatial = F.adaptive_avg_pool2d(h1[:, :2], 4).flatten(1)  # (B, 2 * 4 * 4)
        return {"pool": pool, "spatial": spatial, "logits": self.fc(pool)}


@pytest.fixture
def tiny_extractor() -> TinyExtractor:
    return TinyExtractor()
