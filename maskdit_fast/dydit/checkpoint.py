"""DyDiT checkpoints: the package's safetensors format plus a ``dydit`` metadata entry (the router
config). ``maskdit_fast.checkpoint.load_checkpoint`` recognises the entry and rebuilds the dynamic
network, so ``sample.py``, ``python -m maskdit_fast.eval generate`` and ``load_checkpoint`` take
DyDiT files as they are; :func:`load_dydit` is the same with a check that the file is one.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..checkpoint import load_checkpoint, read_safetensors_file, save_safetensors
from ..config import ModelConfig, RouterConfig
from ..diffusion.edm import EDMPrecond


def save_dydit(path: str | Path, state: dict[str, torch.Tensor], cfg: ModelConfig, router: RouterConfig,
               extra: dict | None = None) -> None:
    """Write a DyDiT network's state dict with its model and router configs (atomic)."""
    save_safetensors(path, state, cfg, {"dydit": dataclasses.asdict(router), **(extra or {})})


def is_dydit(path: str | Path) -> bool:
    """True if ``path`` is a safetensors checkpoint written by :func:`save_dydit`."""
    if Path(path).suffix != ".safetensors" or not Path(path).is_file():
        return False
    return "dydit" in read_safetensors_file(path, tensors=False)[0]


def load_dydit(path: str | Path, device: torch.device | str = "cpu") -> EDMPrecond:
    """The DyDiT network of a checkpoint written by :func:`save_dydit`, in eval mode (fast path)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not is_dydit(path):
        raise ValueError(f"{path} is not a DyDiT checkpoint (no 'dydit' metadata); convert a base model with "
                         "maskdit_fast.dydit.to_dydit or fine-tune it: python -m maskdit_fast.dydit finetune")
    return load_checkpoint(path, device)
