"""The training loop's optimizer (``train.optimizer``): ``adamw``, torch's AdamW, fused on CUDA (``foreach``
elsewhere); or ``apex_fused_adam``, NVIDIA apex's FusedAdam in AdamW mode, which the official MaskDiT
trains with (CUDA only; apex is built from NVIDIA's source, see docs/install.md).

Both take the same hyper-parameters: ``train.lr``, ``betas``, ``weight_decay`` (decoupled), eps
:data:`EPS`, bias correction. Parameter groups carry an ``lr_scale`` (1 when absent); the loop sets every
group's learning rate to ``schedule(step) * lr_scale`` before each step (:func:`set_learning_rate`).

Their states differ: AdamW keeps a ``step`` per parameter, FusedAdam one per group (and no per-parameter
``step``), so a training state of one does not load into the other; ``--resume`` refuses the change.
"""
from __future__ import annotations

import functools
import importlib

import torch

from ..config import ConfigError, TrainConfig

EPS = 1e-8  # the default of torch's AdamW and of apex's FusedAdam, stated so that both take it
APEX_DEVICE_TYPES = ("cuda",)  # apex's multi-tensor kernels update CUDA tensors only
APEX_BUILD = ("git clone https://github.com/NVIDIA/apex && cd apex && "
              "APEX_CPP_EXT=1 APEX_CUDA_EXT=1 pip install -v --no-build-isolation .")


def check_optimizer(train: TrainConfig, device: torch.device) -> None:
    """Raise a :class:`ConfigError` saying what is missing if ``train.optimizer`` cannot run on ``device``
    here (called before data or model are built)."""
    if train.optimizer == "apex_fused_adam":
        _apex_fused_adam(device)


def build_optimizer(param_groups: list[dict], train: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer ``train`` asks for over ``param_groups`` (dicts with ``params`` and optionally
    ``lr_scale``), whose parameters live on ``device``: AdamW or apex's FusedAdam (AdamW mode) with
    ``train.lr``, ``betas``, ``weight_decay`` and eps :data:`EPS`. A missing apex is a ConfigError."""
    groups = [{"lr_scale": 1.0, **g} for g in param_groups]
    if train.optimizer == "apex_fused_adam":
        return _apex_fused_adam(device)(groups, lr=train.lr, betas=tuple(train.betas), eps=EPS,
                                        weight_decay=train.weight_decay, adam_w_mode=True, bias_correction=True)
    fused = device.type == "cuda" and not train.fsdp_cpu_offload
    # foreach elsewhere: torch's CPU default updates tensor by tensor, twice as slow for the same bits
    return torch.optim.AdamW(groups, lr=train.lr, betas=tuple(train.betas), eps=EPS, weight_decay=train.weight_decay,
                             fused=fused, foreach=not fused)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group of ``optimizer`` (made by :func:`build_optimizer`) at ``lr`` times its ``lr_scale``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]


def _apex_fused_adam(device: torch.device) -> type[torch.optim.Optimizer]:
    """apex's FusedAdam class (with torch's ``zero_grad``), or a ConfigError naming what is missing."""
    key = "train.optimizer: apex_fused_adam"
    try:
        importlib.import_module("apex")
    except ImportError as err:
        if err.name != "apex":  # an apex that does not import: not NVIDIA's, or broken
            raise ConfigError(f"{key} needs NVIDIA's apex, but the installed package apex does not import ({err}); "
                              "the PyPI package named apex is an unrelated project: pip uninstall apex, then build "
                              f"NVIDIA's from source: {APEX_BUILD}") from None
        raise ConfigError(f"{key} needs NVIDIA's apex, which is not installed; it is built from NVIDIA's source "
                          f"with its CUDA extensions: {APEX_BUILD} (the PyPI package named apex is an unrelated "
                          "project); or use train.optimizer=adamw") from None
    try:
        fused_adam = importlib.import_module("apex.optimizers").FusedAdam
    except (ImportError, AttributeError):
        raise ConfigError(f"{key} needs NVIDIA's apex, but the installed apex has no apex.optimizers.FusedAdam: it is "
                          "the unrelated PyPI package named apex; pip uninstall apex, then build NVIDIA's from source: "
                          f"{APEX_BUILD}") from None
    try:
        importlib.import_module("amp_C")  # the CUDA extension FusedAdam runs on
    except ImportError:
        raise ConfigError(f"{key}: NVIDIA's apex is installed without its CUDA extensions (a Python-only build), "
                          f"which FusedAdam needs; rebuild it: {APEX_BUILD}") from None
    if device.type not in APEX_DEVICE_TYPES:
        raise ConfigError(f"{key} updates CUDA tensors only, but this run is on the {device.type}; use "
                          "train.optimizer=adamw")
    return _with_torch_zero_grad(fused_adam)


@functools.cache
def _with_torch_zero_grad(fused_adam: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """``fused_adam`` with torch's ``zero_grad(set_to_none=True)``: apex's takes no argument (NVIDIA/apex
    issue 1196), while the loop and ``torch.distributed.checkpoint``'s ``get_state_dict`` of a fresh
    optimizer (every resume) pass ``set_to_none``."""
    class FusedAdamW(fused_adam):
        """apex's FusedAdam with torch's ``zero_grad``."""

        zero_grad = torch.optim.Optimizer.zero_grad

    return FusedAdamW
