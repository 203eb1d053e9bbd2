"""Models: the DiT baseline, MaskDiT, and their shared layers."""
from __future__ import annotations

from ..config import DIT_SIZES, ModelConfig
from .dit import DiT
from .maskdit import MaskDiT
from .masking import mask_from_ids, num_kept, random_masking
from .precision import RESIDUAL_DTYPE, precision_policy


def build_model(cfg: ModelConfig) -> DiT:
    """The raw network (no preconditioning) described by ``cfg``."""
    return MaskDiT(cfg) if cfg.arch == "maskdit" else DiT(cfg)


__all__ = [
    "DIT_SIZES", "RESIDUAL_DTYPE", "DiT", "MaskDiT", "build_model", "mask_from_ids", "num_kept", "precision_policy",
    "random_masking",
]
