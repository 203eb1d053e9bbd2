"""DyDiT routers: which attention heads / MLP channel groups a block uses at a timestep (TDW), and
which tokens go through its MLP (SDT).

Every router outputs logits; a decision is "on" when ``sigmoid(logit) > 0.5``, i.e. ``logit > 0``.
In training the decision is a Gumbel-sigmoid sample with a straight-through gradient (the forward
value is exactly 0 or 1, the backward is the relaxed sigmoid's); at inference it is the plain
threshold. Weights that read the input start at zero and biases at a large positive value, so a
freshly converted model has every head, group and token on: it computes the base model's function.
"""
from __future__ import annotations

import torch
from torch import nn


def gumbel_sigmoid(logits: torch.Tensor, temperature: float, hard: bool = True) -> torch.Tensor:
    """Relaxed Bernoulli sample of ``sigmoid(logits)``: sigmoid((logits + g1 - g2) / temperature) with
    g1, g2 ~ Gumbel(0, 1) (their difference is logistic noise). With ``hard`` the forward value is
    thresholded at 0.5 and the gradient is the relaxed sample's (straight-through)."""
    u = torch.rand_like(logits).clamp_(1e-6, 1 - 1e-6)
    soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / temperature)
    if not hard:
        return soft
    return (soft > 0.5).to(soft.dtype) + (soft - soft.detach())  # exactly 0/1 forward (x - x == 0)


def decide(logits: torch.Tensor, training: bool, temperature: float) -> torch.Tensor:
    """0/1 decisions (float, same shape as ``logits``): Gumbel straight-through in training, else
    ``logits > 0`` (sigmoid > 0.5)."""
    if training:
        return gumbel_sigmoid(logits.float(), temperature).to(logits.dtype)
    return (logits > 0).to(logits.dtype)


class WidthRouter(nn.Module):
    """TDW: timestep embedding (N, cond_dim) -> logits (N, groups), one per head or MLP channel group."""

    def __init__(self, cond_dim: int, groups: int, bias: float = 15.0):
        super().__init__()
        self.bias_init = bias
        self.linear = nn.Linear(cond_dim, groups)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.linear.weight)
        nn.init.constant_(self.linear.bias, self.bias_init)

    def forward(self, t_emb: torch.Tensor) -> torch.Tensor:
        return self.linear(t_emb)


class TokenRouter(nn.Module):
    """SDT: tokens (N, L, D) -> logits (N, L): Linear(D, D/ratio) -> ReLU -> Linear(D/ratio, 1)."""

    def __init__(self, dim: int, ratio: int = 16, bias: float = 35.0):
        super().__init__()
        self.bias_init = bias
        hidden = max(1, dim // ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.fc1.weight)
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.weight)  # starts input-independent: every token on
        nn.init.constant_(self.fc2.bias, self.bias_init)

    @property
    def hidden(self) -> int:
        return self.fc1.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x))).squeeze(-1)
