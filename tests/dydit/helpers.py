"""Tiny DiT / MaskDiT networks with every weight non-trivial (the DiT init zeroes adaLN and the
output layer, which would make every block the identity) and routers with mixed decisions."""
from __future__ import annotations

import torch

from maskdit_fast.diffusion.edm import build_net
from maskdit_fast.diffusion.edm import EDMPrecond
from maskdit_fast.dydit import RouterConfig, to_dydit
from tests.helpers import tiny_model_config


def random_base(arch: str = "dit", **changes) -> EDMPrecond:
    """A tiny preconditioned network (eval mode) whose weights are all perturbed."""
    cfg = tiny_model_config(arch=arch, mask_ratio=0.0, **changes)
    net = build_net(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return net.eval()


def scramble_routers(net: EDMPrecond, scale: float = 2.0, token_bias: float = 0.0) -> None:
    """Random router weights: heads, groups and tokens switch on and off across blocks and samples."""
    with torch.no_grad():
        for block in net.model.dynamic_blocks():
            for router in (block.head_router, block.group_router):
                if router is not None:
                    router.linear.weight.normal_(0, scale / router.linear.in_features ** 0.5)
                    router.linear.bias.normal_(0, 1.0)
            if block.token_router is not None:
                block.token_router.fc2.weight.normal_(0, scale)
                block.token_router.fc2.bias.fill_(token_bias)


def random_dydit(arch: str = "dit", router: RouterConfig | None = None, **changes) -> EDMPrecond:
    net = to_dydit(random_base(arch, **changes), router or RouterConfig())
    scramble_routers(net)
    return net


def inputs(n: int = 4, sigma=0.7, num_classes: int = 10, seed: int = 0):
    """(x, sigma (N,), labels (N,) with one "no class")."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 32, 32, generator=g)
    sigma = torch.as_tensor(sigma, dtype=torch.float32).expand(n).clone() if torch.as_tensor(sigma).ndim == 0 \
        else torch.as_tensor(sigma, dtype=torch.float32)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    labels[-1] = num_classes
    return x, sigma, labels
