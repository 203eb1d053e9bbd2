"""Making DyDiT networks: a trained DiT / MaskDiT whose blocks become :class:`DyDiTBlock` (the network
classes are in :mod:`maskdit_fast.models.dydit`).

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

from ..config import ModelConfig, RouterConfig
from ..diffusion.denoiser import Denoiser
from ..diffusion.edm import EDMPrecond, build_net
from ..models.dydit import Routing, _Dynamic


def build_dydit(cfg: ModelConfig, router: RouterConfig) -> Denoiser:
    """A DyDiT network (preconditioned) for ``cfg``; weights random, routers all on."""
    return build_net(cfg, router)


def to_dydit(net: Denoiser, router: RouterConfig | None = None) -> Denoiser:
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
    if isinstance(net, EDMPrecond):
        dyn.sigma_data = net.sigma_data
    return dyn.to(device=param.device, dtype=param.dtype).train(net.training)  # .to: buffers made from numpy


def routing_of(net: Denoiser | nn.Module) -> list[Routing]:
    """The decisions of ``net``'s last forward (one :class:`Routing` per dynamic block)."""
    model = net.model if isinstance(net, Denoiser) else net
    return model.routing
