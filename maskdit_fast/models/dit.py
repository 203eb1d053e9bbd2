"""The DiT baseline (Peebles & Xie): adaLN-Zero transformer on patch tokens.

``DiT.forward(x, noise_labels, class_labels)`` returns the raw network output F; EDM
preconditioning lives in :mod:`maskdit_fast.diffusion.edm`. The forward is four steps, ``embed``
(tokens + position) -> ``run_blocks`` -> ``decode`` (nothing here; MaskDiT's decoder) -> ``head``
(final layer, unpatchify); MaskDiT and DyDiT override steps, never the whole forward.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import ModelConfig
from .layers import DiTBlock, LabelEmbedder, ModulatedLinear, PatchEmbed, TimestepEmbedder, sincos_pos_embed_2d, unpatchify
from .precision import to_residual


class DiT(nn.Module):
    """DiT on (N, C, H, W) inputs, class-conditional (num_classes > 0) or unconditional."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.in_channels = cfg.in_channels
        self.patch_size = cfg.patch_size
        self.num_patches = (cfg.input_size // cfg.patch_size) ** 2
        self.x_embedder = PatchEmbed(cfg.in_channels, d, cfg.patch_size)
        self.t_embedder = TimestepEmbedder(d, input_scale=cfg.noise_embed_scale)
        self.out_channels = cfg.out_channels
        self.y_embedder = (LabelEmbedder(cfg.num_classes, d, cfg.class_dropout, cfg.null_class == "learned")
                           if cfg.num_classes > 0 else None)
        # Frozen, derived from the config: a buffer that is not saved.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(d, cfg.input_size // cfg.patch_size), persistent=False)
        self.blocks = nn.ModuleList(DiTBlock(d, cfg.num_heads, d, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final_layer = ModulatedLinear(self._build_head(), cfg.patch_size**2 * cfg.out_channels, d)
        self.initialize_weights()

    def _build_head(self) -> int:
        """Builds what sits between the encoder and the final layer; returns the final layer's width."""
        return self.cfg.hidden_size

    def initialize_weights(self) -> None:
        """DiT initialisation: xavier linears, N(0, 0.02) timestep MLP, N(0, class_embed_init_std) class
        table, zeroed adaLN and output layers."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        proj = self.x_embedder.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding.weight, std=self.cfg.class_embed_init_std)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for module in self.modules():
            if isinstance(module, (DiTBlock, ModulatedLinear)):
                nn.init.zeros_(module.adaLN_modulation[-1].weight)
                nn.init.zeros_(module.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def add_class(self, t_emb: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        """The blocks' conditioning from the timestep embedding t_emb (N, D): t_emb + class embedding
        (none for unconditional models; ``class_labels`` None = "no class") -> c: (N, D)."""
        if self.y_embedder is None:
            return t_emb
        if class_labels is None:
            class_labels = torch.full(t_emb.shape[:1], self.cfg.num_classes, dtype=torch.long, device=t_emb.device)
        return t_emb + self.y_embedder(class_labels)

    # ---- the forward, in steps that MaskDiT and DyDiT override ------------------------------
    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        ids_keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (N, C, H, W); noise_labels: (N,); class_labels: (N,) int64 or None;
        ids_keep: (N, K) int64 kept token indices (MaskDiT's masked training) or None -> F: (N, C_out, H, W)
        (C_out = 2C with ``learn_sigma``: eps, then the variance values)."""
        t_emb = self.t_embedder(noise_labels)
        c = self.add_class(t_emb, class_labels)
        tokens = self.embed(x, ids_keep)
        tokens = self.run_blocks(self.blocks, tokens, c, t_emb)
        tokens = self.decode(tokens, c, t_emb, ids_keep)
        return self.head(tokens, c)

    def embed(self, x: torch.Tensor, ids_keep: torch.Tensor | None) -> torch.Tensor:
        """x: (N, C, H, W) -> the residual stream (N, L, D) in the model's dtype (models/precision.py)."""
        if ids_keep is not None:
            raise ValueError("the plain DiT has no decoder and cannot train with masking; "
                             "use model.arch=maskdit or model.mask_ratio=0")
        return to_residual(self.x_embedder(x), self.pos_embed) + self.pos_embed

    def run_blocks(self, blocks: nn.ModuleList, tokens: torch.Tensor, c: torch.Tensor,
                   t_emb: torch.Tensor) -> torch.Tensor:
        """tokens: (N, L, D), c: (N, D) the blocks' conditioning, t_emb: (N, D) the timestep embedding
        alone (DyDiT's width routers read it) -> (N, L, D)."""
        for block in blocks:
            tokens = block(tokens, c)
        return tokens

    def decode(self, tokens: torch.Tensor, c: torch.Tensor, t_emb: torch.Tensor,
               ids_keep: torch.Tensor | None) -> torch.Tensor:
        """What runs between the encoder blocks and the final layer: nothing in DiT (MaskDiT: its decoder)."""
        return tokens

    def head(self, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """tokens: (N, L, D_head) -> F: (N, C_out, H, W): final adaLN layer, then unpatchify."""
        return unpatchify(self.final_layer(tokens, c), self.patch_size, self.out_channels)
