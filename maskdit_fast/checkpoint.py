"""Sampling checkpoints: one safetensors file of EMA weights with the model config in its metadata.

``load_checkpoint(path)`` returns an :class:`EDMPrecond` in eval mode, ready for
``net(x, sigma, class_labels=None, cfg_scale=None)``. It also reads a training state
(``checkpoints/step-*.pt``), taking its EMA weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig, config_to_dict, model_config_from_dict
from .diffusion.edm import EDMPrecond
from .models import build_model
from .train.state import atomic_write, load_training_state

FORMAT = "maskdit_fast/edm-precond-v1"


def build_net(cfg: ModelConfig) -> EDMPrecond:
    """A freshly initialised preconditioned network for ``cfg``."""
    return EDMPrecond(build_model(cfg), cfg.sigma_data)


def save_safetensors(path: str | Path, state: dict[str, torch.Tensor], cfg: ModelConfig, extra: dict | None = None) -> None:
    """Write ``state`` (an EDMPrecond state dict) with the model config as metadata, atomically."""
    metadata = {"format": FORMAT, "model_config": json.dumps(config_to_dict(cfg))}
    metadata.update({k: json.dumps(v) for k, v in (extra or {}).items()})
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], ModelConfig, dict[str, str]]:
    """(state dict, model config, raw metadata) of a file written by :func:`save_safetensors`."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path} is not a maskdit_fast checkpoint (metadata format={metadata.get('format')!r}); "
                             "official MaskDiT .pt files must be converted first: "
                             "python -m maskdit_fast.convert official-maskdit IN.pt OUT.safetensors")
        state = {k: f.get_tensor(k) for k in f.keys()}
    return state, model_config_from_dict(json.loads(metadata["model_config"])), metadata


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> EDMPrecond:
    """The EMA network of a safetensors checkpoint or training state, in eval mode on ``device``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        state, cfg, _ = read_safetensors(path)
    else:
        training = load_training_state(path)
        state, cfg = training["ema"], model_config_from_dict(training["config"]["model"])
    net = build_net(cfg)
    net.load_state_dict(state)
    return net.to(device).eval().requires_grad_(False)
