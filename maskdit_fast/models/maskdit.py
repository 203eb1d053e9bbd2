"""MaskDiT (Zheng et al., TMLR 2024): a DiT encoder on the kept tokens and a light decoder on all.

Training passes ``ids_keep`` (from :func:`maskdit_fast.models.masking.random_masking`): the
encoder sees only those tokens, the decoder input layer maps them to the decoder width, the
learned mask token fills the other positions, and the decoder blocks run on the whole sequence.
Without ``ids_keep`` (unmasked fine-tune, sampling) the encoder sees every token.
"""
from __future__ import annotations

import torch
import torch.nn as nn

import kernels

from .dit import DiT
from .layers import DiTBlock, ModulatedLinear, sincos_pos_embed_2d, unpatchify


class MaskDiT(DiT):
    """DiT encoder + decoder (``decoder_depth`` blocks of ``decoder_hidden_size``)."""

    def _build_head(self) -> int:
        cfg = self.cfg
        dd = cfg.decoder_hidden_size
        self.decoder_layer = ModulatedLinear(cfg.hidden_size, dd, cfg.hidden_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_2d(dd, cfg.input_size // cfg.patch_size),
                             persistent=False)
        self.decoder_blocks = nn.ModuleList(
            DiTBlock(dd, cfg.decoder_num_heads, cfg.hidden_size, cfg.mlp_ratio) for _ in range(cfg.decoder_depth))
        return dd

    def initialize_weights(self) -> None:
        super().initialize_weights()
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        ids_keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (N, C, H, W); noise_labels: (N,); class_labels: (N,) int64 or None;
        ids_keep: (N, K) int64 kept token indices or None (all tokens) -> F: (N, C, H, W)."""
        c = self.condition(noise_labels, class_labels)
        tokens = self.x_embedder(x)
        pos = self.pos_embed.to(tokens.dtype)
        tokens = tokens + pos if ids_keep is None else kernels.gather_tokens(tokens, ids_keep, pos)
        for block in self.blocks:
            tokens = block(tokens, c)
        tokens = self.decoder_layer(tokens, c)
        dec_pos = self.decoder_pos_embed.to(tokens.dtype)
        if ids_keep is None:
            tokens = tokens + dec_pos
        else:
            fill = self.mask_token.view(-1).to(tokens.dtype)
            tokens = kernels.scatter_tokens(tokens, ids_keep, self.num_patches, fill, dec_pos)
        for block in self.decoder_blocks:
            tokens = block(tokens, c)
        return unpatchify(self.final_layer(tokens, c), self.patch_size, self.in_channels)
