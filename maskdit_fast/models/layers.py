"""Building blocks shared by DiT, MaskDiT and DyDiT: embedders, sin-cos position embeddings,
the adaLN-Zero DiT block and the final layer.

Semantics follow the official MaskDiT/DiT release (see the converter): LayerNorm without
affine (eps 1e-6), adaLN chunks (shift, scale, gate) x (attention, MLP), fused qkv laid out
as (3, heads, head_dim), GELU(tanh) MLP with ratio 4.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

from .precision import normed_dtype


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (the MAE recipe).

    For token (row h, column w) the first dim/2 channels encode w and the last dim/2 encode h;
    each half is [sin(pos*omega), cos(pos*omega)], omega_k = 10000^(-k/(dim/4)).
    Returns (grid_size**2, dim) float32, tokens in row-major order.
    """
    if dim % 4:
        raise ValueError(f"position embedding width must be a multiple of 4, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64),
                             indexing="ij")

    def encode(pos: np.ndarray) -> np.ndarray:
        angles = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return torch.from_numpy(np.concatenate([encode(cols), encode(rows)], axis=1)).float()


class TimestepEmbedder(nn.Module):
    """Scalar noise level -> (N, D): 256 sinusoidal frequencies (cos first) of ``input_scale * t``, then MLP.

    Always computed in float32 (small differences in c_noise matter). EDM's c_noise = ln(sigma)/4 spans
    only about [-2, 1], so most frequencies barely move; ``input_scale`` > 1 spreads it (1 = official).
    """

    def __init__(self, hidden_size: int, frequency_dim: int = 256, max_period: float = 10000.0,
                 input_scale: float = 1.0):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.max_period = max_period
        self.input_scale = input_scale
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t: (N,) -> (N, D)."""
        half = self.frequency_dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = (t.float() * self.input_scale)[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        with torch.autocast(device_type=t.device.type, enabled=False):
            return self.mlp(emb)


class LabelEmbedder(nn.Module):
    """Class index -> (N, D); index ``num_classes`` is "no class".

    The no-class embedding is exactly zero (the official MaskDiT's bias-free Linear on one-hot
    labels with an all-zero null label), or with ``learned_null`` a learned last table row (the
    official DiT's table of ``num_classes + 1`` rows). During training labels are dropped (set to
    the null index) with probability ``dropout``.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout: float, learned_null: bool = False):
        super().__init__()
        self.num_classes = num_classes
        self.dropout = dropout
        self.learned_null = learned_null
        self.embedding = nn.Embedding(num_classes + int(learned_null), hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """labels: (N,) int64 in [0, num_classes] -> (N, D)."""
        if self.training and self.dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.dropout
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        if self.learned_null:
            return self.embedding(labels)
        keep = labels < self.num_classes
        return self.embedding(labels.clamp(max=self.num_classes - 1)) * keep.unsqueeze(-1).to(self.embedding.weight.dtype)


class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, L, D) with a strided convolution, L = (H/p)*(W/p).

    The convolution runs channels-last, so the tokens come out contiguous (N, L, D), the layout the
    token kernels and the blocks read, with no copy (NCHW output would be a transposed view).
    """

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.proj(x.contiguous(memory_format=torch.channels_last))
        return out.flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection laid out as (3, heads, head_dim)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, heads: torch.Tensor | None = None) -> torch.Tensor:
        """x: (N, L, D); heads: (N, H) per-head output weights (DyDiT's 0/1 decisions) or None -> (N, L, D)."""
        return self.proj(attend(self.qkv(x), self.num_heads, heads))


def attend(qkv: torch.Tensor, num_heads: int, heads: torch.Tensor | None = None) -> torch.Tensor:
    """qkv: (N, L, 3 * H * Dh), laid out (3, H, Dh) -> attention output (N, L, H * Dh), head h scaled by
    ``heads[:, h]`` when given. DyDiT's sliced attention calls it with the rows of its active heads."""
    n, length, width = qkv.shape
    q, k, v = qkv.view(n, length, 3, num_heads, width // (3 * num_heads)).unbind(2)
    out = kernels.attention(q, k, v)
    if heads is not None:
        out = out * heads.to(out.dtype)[:, None, :, None]
    return out.reshape(n, length, -1)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """The MLP's activation: GELU, tanh approximation (as the official release)."""
    return F.gelu(x, approximate="tanh")


class Mlp(nn.Module):
    """Linear -> GELU(tanh) -> Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        """x: (N, L, D); groups: (N, G) weights of G equal channel groups of the hidden layer (DyDiT's
        0/1 decisions) or None -> (N, L, D)."""
        hidden = gelu(self.fc1(x))
        if groups is not None:
            n, length, width = hidden.shape
            hidden = (hidden.view(n, length, groups.shape[1], -1) * groups.to(hidden.dtype)[:, None, :, None]
                      ).view(n, length, width)
        return self.fc2(hidden)


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block of width ``dim`` conditioned on ``c`` of width ``cond_dim``.

    LN+modulate -> attention -> gated residual -> LN+modulate -> MLP -> gated residual; the middle
    "gated residual, then LN+modulate" pair is one fused op. The two halves are steps
    (:meth:`attention_step`, :meth:`mlp_step`) that DyDiT's block runs with its own attention / MLP.
    """

    def __init__(self, dim: int, num_heads: int, cond_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.attn = Attention(dim, num_heads)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x: (N, L, D), c: (N, cond_dim) -> (N, L, D)."""
        mod = self.modulation(c)
        x, h = self.attention_step(x, mod, self.attn)
        return self.mlp_step(x, h, mod, self.mlp)

    def modulation(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """c: (N, cond_dim) -> (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp), each (N, D)."""
        return self.adaLN_modulation(c).chunk(6, dim=-1)

    @staticmethod
    def attention_step(x: torch.Tensor, mod: tuple[torch.Tensor, ...], attention) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N, L, D) -> (x + gate_msa * attention(LN+mod(x)), LN+mod of that for the MLP), both (N, L, D)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, _ = mod
        # x's two gradients summed in-kernel; h in the dtype the qkv Linear reads
        x, h = kernels.residual_layernorm_modulate(x, shift_msa, scale_msa, out_dtype=normed_dtype(x))
        return kernels.gated_residual_layernorm_modulate(x, gate_msa, attention(h), shift_mlp, scale_mlp,
                                                         out_dtype=normed_dtype(x))

    @staticmethod
    def mlp_step(x: torch.Tensor, h: torch.Tensor, mod: tuple[torch.Tensor, ...], mlp) -> torch.Tensor:
        """x, h: (N, L, D) (residual stream, modulated MLP input) -> x + gate_mlp * mlp(h): (N, L, D)."""
        return kernels.gated_residual(x, mod[5], mlp(h))


class ModulatedLinear(nn.Module):
    """adaLN LayerNorm+modulate followed by a Linear: the final layer and MaskDiT's decoder input."""

    def __init__(self, dim: int, out_dim: int, cond_dim: int):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x: (N, L, D), c: (N, cond_dim) -> (N, L, out_dim)."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(kernels.layernorm_modulate(x, shift, scale, out_dtype=normed_dtype(x)))


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C), tokens row-major, each patch laid out (p, q, c)."""
    n, c, h, w = x.shape
    p = patch_size
    x = x.reshape(n, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """(N, L, p*p*C) -> (N, C, H, W): the inverse of :func:`patchify` (square images)."""
    n, length, _ = x.shape
    side = math.isqrt(length)
    p = patch_size
    x = x.reshape(n, side, side, p, p, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(n, channels, side * p, side * p)
