"""DyDiT networks: a trained DiT / MaskDiT whose blocks become :class:`DyDiTBlock`.

``to_dydit(net, router_cfg)`` converts an EDM-preconditioned DiT or MaskDiT of this package: the
weights are copied, the routers are added "all on", so the result computes exactly the base
model's function until it is fine-tuned. MaskDiT runs its full-token (unmasked) path; its decoder
blocks get routers too unless ``router_cfg.decoder`` is false.

After every forward, ``model.routing`` holds the decisions of the dynamic blocks, in order
(:class:`Routing` objects), which the FLOPs counter and the fine-tune losses read.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..diffusion.edm import EDMPrecond
from ..models import DiT, MaskDiT
from .block import MODES, DyDiTBlock, Routing
from .config import RouterConfig


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


def build_dydit(cfg: ModelConfig, router: RouterConfig) -> EDMPrecond:
    """A DyDiT network (preconditioned) for ``cfg``; weights random, routers all on."""
    cls = DyMaskDiT if cfg.arch == "maskdit" else DyDiT
    return EDMPrecond(cls(cfg, router), cfg.sigma_data)


def to_dydit(net: EDMPrecond, router: RouterConfig | None = None) -> EDMPrecond:
    """Convert a trained (preconditioned) DiT / MaskDiT into a DyDiT with every router on.

    The returned network holds copies of ``net``'s weights (``net`` is untouched), on its device,
    in its train/eval mode.
    """
    router = router or RouterConfig()
    base = net.model
    if isinstance(base, _Dynamic):
        raise TypeError("this network is already a DyDiT")
    param = next(base.parameters())
    # Built where the weights live (seconds saved per XL model on a GPU); building draws random
    # weights, so the caller's RNG on that device is kept as it was.
    with torch.random.fork_rng(devices=[param.device] if param.device.type == "cuda" else []), param.device:
        dyn = build_dydit(base.cfg, router)
    missing, unexpected = dyn.model.load_state_dict(base.state_dict(), strict=False)
    if unexpected or any("_router." not in k for k in missing):
        raise RuntimeError(f"weights do not match the DyDiT network: missing {missing}, unexpected {unexpected}")
    dyn.sigma_data = net.sigma_data
    return dyn.to(device=param.device, dtype=param.dtype).train(net.training)  # .to: buffers made from numpy


def routing_of(net: EDMPrecond | nn.Module) -> list[Routing]:
    """The decisions of ``net``'s last forward (one :class:`Routing` per dynamic block)."""
    model = net.model if isinstance(net, EDMPrecond) else net
    return model.routing
