"""The MaskDiT / DiT training objective, as the training loop and the memory planner call it."""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..config import Config
from ..diffusion.ddpm_loss import ddpm_loss
from ..diffusion.loss import edm_loss
from .loop import LossFn, MicroBatch


def maskdit_objective(cfg: Config, mask_ratio: Callable[[int], float]) -> LossFn:
    """The MaskDiT / DiT objective for the loop: EDM DSM on kept patches + MAE on masked ones, with
    ``mask_ratio(step)`` of the tokens masked; with ``model.diffusion=ddpm`` DiT's loss (eps MSE + the
    learned variance's bound term) in place of DSM."""
    diffusion_loss = ddpm_loss if cfg.model.diffusion == "ddpm" else edm_loss

    def loss_fn(net: torch.nn.Module, batch: MicroBatch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        terms = diffusion_loss(net, batch.images, batch.labels, mask_ratio(step), cfg.loss, cfg.model)
        return terms.loss.mean(), {"dsm": terms.dsm.mean(), "mae": terms.mae.mean()}

    return loss_fn
