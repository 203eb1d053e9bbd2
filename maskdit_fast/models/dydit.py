"""DyDiT networks (Zhao et al., ICLR 2025): DiT / MaskDiT whose blocks are :class:`DyDiTBlock` s.

The classes override DiT's forward steps only (``embed``: every token; ``run_blocks``: the blocks get
the timestep embedding that drives their width routers; ``head``: records the decisions). After
every forward, ``model.routing`` holds the decisions of the dynamic blocks, in order
(:class:`Routing` objects), which the FLOPs counter and the fine-tune losses read. Converting a
trained network and building a preconditioned one: :mod:`maskdit_fast.dydit.model`.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig, RouterConfig
from .dit import DiT
from .dydit_block import MODES, DyDiTBlock, Routing
from .maskdit import MaskDiT


class _Dynamic:
    """What DyDiT adds to DiT / MaskDiT: router bookkeeping and the timestep-aware conditioning."""

    router_cfg: RouterConfig
    routing: list[Routing]

    def _make_dynamic(self, router: RouterConfig) -> None:
        self.router_cfg = router
        t_dim = self.cfg.hidden_size
        self.blocks = nn.ModuleList(DyDiTBlock.from_block(b, t_dim, router) for b in self.blocks)
        if isinstance(self, MaskDiT) and router.decoder:
            self.decoder_blocks = nn.ModuleList(DyDiTBlock.from_block(b, t_dim, router) for b in self.decoder_blocks)
        self.routing = []

    def initialize_weights(self) -> None:
        super().initialize_weights()  # DiT's init zeroes every Linear's bias: put the routers back to "all on"
        for block in self.dynamic_blocks():
            block.reset_routers()

    def dynamic_blocks(self) -> list[DyDiTBlock]:
        return [m for m in self.modules() if isinstance(m, DyDiTBlock)]

    def set_mode(self, mode: str) -> None:
        """``auto`` (masked in training, fast in eval), ``masked`` or ``fast`` for every block."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        for block in self.dynamic_blocks():
            block.mode = mode

    # ---- DiT's forward steps, with dynamic blocks ---------------------------------------------
    def embed(self, x: torch.Tensor, ids_keep: torch.Tensor | None) -> torch.Tensor:
        if ids_keep is not None:
            raise ValueError("DyDiT runs on every token (MaskDiT's unmasked path); ids_keep must be None")
        return super().embed(x, None)

    def run_blocks(self, blocks: nn.ModuleList, tokens: torch.Tensor, c: torch.Tensor,
                   t_emb: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            tokens = block(tokens, c, t_emb) if isinstance(block, DyDiTBlock) else block(tokens, c)
        return tokens

    def head(self, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        self.routing = [b.routing for b in self.dynamic_blocks()]  # every block has run: record its decisions
        return super().head(tokens, c)


class DyDiT(_Dynamic, DiT):
    """DiT with TDW/SDT routers in every block."""

    def __init__(self, cfg: ModelConfig, router: RouterConfig):
        super().__init__(cfg)
        self._make_dynamic(router)


class DyMaskDiT(_Dynamic, MaskDiT):
    """MaskDiT (full-token path) with routers in the encoder blocks and, optionally, the decoder's."""

    def __init__(self, cfg: ModelConfig, router: RouterConfig):
        super().__init__(cfg)
        self._make_dynamic(router)
