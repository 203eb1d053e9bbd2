"""MaskDiT (Zheng et al., TMLR 2024): a DiT encoder on the kept tokens and a light decoder on all.

Training passes ``ids_keep`` (from :func:`maskdit_fast.models.masking.random_masking`): the
encoder sees only those tokens, the decoder input layer maps them to the decoder width, the
learned mask token fills the other positions, and the decoder blocks run on the whole sequence.
Without ``ids_keep`` (unmasked fine-tune, sampling) the encoder sees every token.

The training step top to bottom: :meth:`DiT.forward` (conditioning, then the steps) ->
:meth:`MaskDiT.embed` (patch embed, ``kernels.gather_tokens`` of the kept tokens + position) ->
the encoder :class:`~.layers.DiTBlock` s (``kernels.layernorm_modulate``, attention,
``kernels.gated_residual_layernorm_modulate``, MLP, ``kernels.gated_residual``) -> :meth:`MaskDiT.decode`
(decoder input layer, ``kernels.scatter_tokens`` with the mask token + decoder position, decoder
blocks) -> :meth:`DiT.head`; the loss is :func:`maskdit_fast.diffusion.loss.edm_loss`.
"""
from __future__ import annotations

import torch
import torch.nn as nn

import kernels

from .dit import DiT
from .layers import DiTBlock, ModulatedLinear, sincos_pos_embed_2d
from .precision import to_residual


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

    def embed(self, x: torch.Tensor, ids_keep: torch.Tensor | None) -> torch.Tensor:
        """x: (N, C, H, W) -> the encoder's tokens (+ position): (N, K, D) the kept ones, (N, L, D) all
        when ``ids_keep`` is None (unmasked fine-tune, sampling); in the model's dtype."""
        tokens = to_residual(self.x_embedder(x), self.pos_embed)
        if ids_keep is None:
            return tokens + self.pos_embed
        return kernels.gather_tokens(tokens, ids_keep, self.pos_embed)

    def decode(self, tokens: torch.Tensor, c: torch.Tensor, t_emb: torch.Tensor,
               ids_keep: torch.Tensor | None) -> torch.Tensor:
        """Encoder output (N, K or L, D) -> decoder input layer -> all L positions, the masked ones
        filled with the mask token (+ decoder position) -> decoder blocks -> (N, L, D_dec)."""
        tokens = to_residual(self.decoder_layer(tokens, c), self.decoder_pos_embed)
        if ids_keep is None:
            tokens = tokens + self.decoder_pos_embed
        else:
            fill = self.mask_token.view(-1).to(tokens.dtype)
            tokens = kernels.scatter_tokens(tokens, ids_keep, self.num_patches, fill, self.decoder_pos_embed)
        return self.run_blocks(self.decoder_blocks, tokens, c, t_emb)
