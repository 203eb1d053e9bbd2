"""The training loop's optimizer: torch's AdamW, fused on CUDA (``foreach`` elsewhere).

Parameter groups carry an ``lr_scale`` (1 when absent); the loop sets every group's learning rate to
``schedule(step) * lr_scale`` before each step (:func:`set_learning_rate`).
"""
from __future__ import annotations

import torch

from ..config import TrainConfig

EPS = 1e-8  # torch AdamW's default, stated so that every optimizer takes the same value


def build_optimizer(param_groups: list[dict], train: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer ``train`` asks for over ``param_groups`` (dicts with ``params`` and optionally
    ``lr_scale``), whose parameters live on ``device``: AdamW with ``train.lr``, ``betas``, ``weight_decay``
    and eps :data:`EPS`."""
    groups = [{"lr_scale": 1.0, **g} for g in param_groups]
    fused = device.type == "cuda" and not train.fsdp_cpu_offload
    # foreach elsewhere: torch's CPU default updates tensor by tensor, twice as slow for the same bits
    return torch.optim.AdamW(groups, lr=train.lr, betas=tuple(train.betas), eps=EPS, weight_decay=train.weight_decay,
                             fused=fused, foreach=not fused)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group of ``optimizer`` (made by :func:`build_optimizer`) at ``lr`` times its ``lr_scale``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
