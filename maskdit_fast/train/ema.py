"""Exponential moving average of the model's parameters."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .parallel import local


class EMA:
    """A frozen copy of ``model`` updated as ``ema = decay * ema + (1 - decay) * param``.

    With ``warmup`` the decay ramps up as min(decay, (1 + step) / (10 + step)), which makes the
    average useful early in short runs. Under FSDP the copy is sharded like the model
    (:func:`maskdit_fast.train.parallel.parallelize`), and the update works on the local shards:
    no gather, the same arithmetic as unsharded.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False, average: nn.Module | None = None):
        """``average``: the copy to keep, when built already (the memory planner's fake tensors cannot be
        deep-copied); else a deep copy of ``model``."""
        self.decay = decay
        self.warmup = warmup
        self.model = (copy.deepcopy(model) if average is None else average).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Move towards ``model``'s parameters (same structure and sharding as the copy)."""
        ema_params = [local(p) for p in self.model.parameters()]
        params = [local(p.detach()) for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - self.decay_at(step))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
