"""The one denoiser interface of the package: ``net(x, sigma, class_labels, cfg_scale, ids_keep) -> D``,
the denoised x at noise level sigma (EDM's variables: x = x_0 + sigma * noise), whatever the network was
trained as. :class:`~maskdit_fast.diffusion.edm.EDMPrecond` and
:class:`~maskdit_fast.diffusion.ddpm_precond.DDPMPrecond` implement it around a raw DiT / MaskDiT / DyDiT."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensor

from ..models import DiT


def _is_fake(t: torch.Tensor) -> bool:
    return isinstance(t, FakeTensor) or t.is_meta


class Denoiser(nn.Module):
    """A raw network ``self.model`` (parameter names ``model.*``, as the official releases) behind the
    denoiser interface; subclasses define ``forward`` and :meth:`noise_level`."""

    def __init__(self, model: DiT):
        super().__init__()
        self.model = model

    @property
    def num_classes(self) -> int:
        return self.model.cfg.num_classes

    def noise_level(self, noise_labels: torch.Tensor) -> torch.Tensor:
        """sigma (N,) of the raw network's noise labels (N,) (what its timestep embedder reads)."""
        raise NotImplementedError

    def check_inputs(self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x as float32, sigma as (N,) float32, class_labels as (N,) int64 on x's device (or None);
        a ValueError that names the problem for inputs that do not fit the batch or the model."""
        x = x.float()
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        sigma = sigma.expand(x.shape[0]) if sigma.numel() == 1 else sigma
        if sigma.shape[0] != x.shape[0]:
            raise ValueError(f"sigma has {sigma.shape[0]} values for a batch of {x.shape[0]}")
        if class_labels is not None:
            if self.num_classes == 0:
                raise ValueError("this model is unconditional (num_classes=0); pass class_labels=None")
            class_labels = class_labels.to(device=x.device, dtype=torch.long).reshape(-1)
            if class_labels.shape[0] != x.shape[0]:
                raise ValueError(f"{class_labels.shape[0]} class labels for a batch of {x.shape[0]}")
            # a fake tensor (the memory planner's) has no values to check
            if not _is_fake(class_labels) and (class_labels.min() < 0 or class_labels.max() > self.num_classes):
                raise ValueError(f"class labels must be in [0, {self.num_classes}] ({self.num_classes} = no class)")
        return x, sigma, class_labels
