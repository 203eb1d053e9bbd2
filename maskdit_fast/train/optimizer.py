"""The optimizer of every training run (the loop and the memory planner build it here)."""
from __future__ import annotations

import torch

from ..config import TrainConfig


def build_optimizer(param_groups: list[dict], train: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over ``param_groups`` with ``train``'s hyper-parameters, as fast as ``device`` allows:
    fused on CUDA (unless the states live on the CPU: ``train.fsdp_cpu_offload``), foreach elsewhere
    (torch's CPU default updates tensor by tensor, twice as slow for the same bits)."""
    fused = device.type == "cuda" and not train.fsdp_cpu_offload
    return torch.optim.AdamW(param_groups, lr=train.lr, betas=tuple(train.betas), weight_decay=train.weight_decay,
                             fused=fused, foreach=not fused)
