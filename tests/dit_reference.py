"""Test helpers for official DiT checkpoints (facebookresearch/DiT), written from the maths and from
the official parameter names and shapes (facts), independently of the package:

- :func:`official_dit_state`: a random state dict in the official layout (what ``torch.save`` of
  ``DiT.state_dict()`` holds), with the learned "no class" row and ``learn_sigma`` outputs;
- :func:`official_dit_forward`: the official network's forward from those raw tensors;
- :func:`dit_alphas_cumprod`: abar_t of DiT's linear schedule (betas 1e-4 .. 0.02, 1000 steps).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def dit_alphas_cumprod() -> torch.Tensor:
    """abar_t for t = 0..999, float64."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    return torch.from_numpy(np.cumprod(1.0 - betas))


def sincos_2d(dim: int, side: int) -> np.ndarray:
    """MAE 2-D sin-cos table (side*side, dim): first half the column index, second the row; each half
    [sin(pos w_k), cos(pos w_k)] with w_k = 10000^(-k / (dim/4))."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter) / quarter)
    rows, cols = np.divmod(np.arange(side * side), side)

    def half(pos):
        angle = pos[:, None] * omega[None]
        return np.concatenate([np.sin(angle), np.cos(angle)], axis=1)

    return np.concatenate([half(cols.astype(np.float64)), half(rows.astype(np.float64))], axis=1)


def official_dit_state(width: int, depth: int, patch: int, input_size: int, channels: int, num_classes: int,
                       learn_sigma: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float32 weights under the official DiT parameter names and shapes."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return torch.randn(*shape, generator=g) / math.sqrt(shape[-1] if len(shape) == 2 else math.prod(shape[1:]))

    def b(n):
        return 0.1 * torch.randn(n, generator=g)

    d, out = width, patch * patch * channels * (2 if learn_sigma else 1)
    side = input_size // patch
    sd = {"pos_embed": torch.from_numpy(sincos_2d(d, side)).float().unsqueeze(0),
          "x_embedder.proj.weight": w(d, channels, patch, patch), "x_embedder.proj.bias": b(d),
          "t_embedder.mlp.0.weight": w(d, 256), "t_embedder.mlp.0.bias": b(d),
          "t_embedder.mlp.2.weight": w(d, d), "t_embedder.mlp.2.bias": b(d),
          "y_embedder.embedding_table.weight": torch.randn(num_classes + 1, d, generator=g)}
    for i in range(depth):
        p = f"blocks.{i}."
        sd |= {p + "attn.qkv.weight": w(3 * d, d), p + "attn.qkv.bias": b(3 * d),
               p + "attn.proj.weight": w(d, d), p + "attn.proj.bias": b(d),
               p + "mlp.fc1.weight": w(4 * d, d), p + "mlp.fc1.bias": b(4 * d),
               p + "mlp.fc2.weight": w(d, 4 * d), p + "mlp.fc2.bias": b(d),
               p + "adaLN_modulation.1.weight": w(6 * d, d), p + "adaLN_modulation.1.bias": b(6 * d)}
    sd |= {"final_layer.linear.weight": w(out, d), "final_layer.linear.bias": b(out),
           "final_layer.adaLN_modulation.1.weight": w(2 * d, d), "final_layer.adaLN_modulation.1.bias": b(2 * d)}
    return sd


def official_dit_forward(sd: dict[str, torch.Tensor], heads: int, x: torch.Tensor, t: torch.Tensor,
                         y: torch.Tensor) -> torch.Tensor:
    """The official DiT's output (N, C_out, H, W) for x_t (N, C, H, W), step indices t (N,) and class
    indices y (N,) (num_classes = the learned no-class row), eval mode."""
    d = sd["x_embedder.proj.weight"].shape[0]
    patch = sd["x_embedder.proj.weight"].shape[2]
    lin = lambda v, name: F.linear(v, sd[name + ".weight"], sd[name + ".bias"])  # noqa: E731
    tokens = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch)
    tokens = tokens.flatten(2).transpose(1, 2) + sd["pos_embed"]
    freqs = torch.exp(-math.log(10000.0) * torch.arange(128, dtype=torch.float32) / 128)
    angle = t.float()[:, None] * freqs[None]
    temb = lin(F.silu(lin(torch.cat([angle.cos(), angle.sin()], dim=1), "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = F.silu(temb + sd["y_embedder.embedding_table.weight"][y])

    def norm(v):
        return F.layer_norm(v, (d,), eps=1e-6)

    n, length = tokens.shape[:2]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        p = f"blocks.{i}."
        sh1, sc1, g1, sh2, sc2, g2 = lin(c, p + "adaLN_modulation.1")[:, None].chunk(6, dim=-1)
        q, k, v = lin(norm(tokens) * (1 + sc1) + sh1, p + "attn.qkv").view(n, length, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
        attn = (weights @ v).transpose(1, 2).reshape(n, length, d)
        tokens = tokens + g1 * lin(attn, p + "attn.proj")
        hidden = F.gelu(lin(norm(tokens) * (1 + sc2) + sh2, p + "mlp.fc1"), approximate="tanh")
        tokens = tokens + g2 * lin(hidden, p + "mlp.fc2")
    shift, scale = lin(c, "final_layer.adaLN_modulation.1")[:, None].chunk(2, dim=-1)
    out = lin(norm(tokens) * (1 + scale) + shift, "final_layer.linear")
    side = math.isqrt(length)
    channels = out.shape[-1] // (patch * patch)
    out = out.view(n, side, side, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)
    return out.reshape(n, channels, side * patch, side * patch)
