"""Attention dispatch: flash-attn (FA3 on Hopper, else FA2) > xformers > PyTorch SDPA.

The chosen backend is visible through :func:`attention_backend` and forceable for A/B runs with
``MASKDIT_ATTENTION=flash3|flash2|xformers|sdpa|reference`` or :func:`set_attention_backend`.
flash-attn and xformers only take fp16/bf16 CUDA tensors; other inputs fall back to SDPA.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os

import torch
import torch.nn.functional as F

from . import reference

ATTENTION_BACKENDS = ("auto", "flash3", "flash2", "xformers", "sdpa", "reference")
_log = logging.getLogger(__name__)
_override: str | None = None


@functools.cache
def _module(name: str):
    try:
        return importlib.import_module(name)
    except Exception:  # not installed, or built for another torch/CUDA
        return None


def available_attention_backends() -> list[str]:
    """Backends importable in this environment (``sdpa`` and ``reference`` always are)."""
    found = []
    if _module("flash_attn_interface") is not None:
        found.append("flash3")
    if _module("flash_attn") is not None:
        found.append("flash2")
    if _module("xformers.ops") is not None:
        found.append("xformers")
    return found + ["sdpa", "reference"]


def set_attention_backend(name: str | None) -> None:
    """Force an attention backend (``None`` goes back to ``$MASKDIT_ATTENTION`` / auto)."""
    global _override
    if name is not None and name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of {ATTENTION_BACKENDS}")
    _override = name


def _requested() -> str:
    name = _override or os.environ.get("MASKDIT_ATTENTION", "auto").strip().lower() or "auto"
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"MASKDIT_ATTENTION={name!r} is not one of {ATTENTION_BACKENDS}")
    return name


def attention_backend(q: torch.Tensor | None = None) -> str:
    """The backend :func:`attention` uses for ``q`` (or for a bf16 CUDA tensor when ``q`` is None)."""
    name = _requested()
    fused_ok = q is None or (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16))
    if name == "auto":
        if not fused_ok:
            return "sdpa"
        available = available_attention_backends()
        hopper = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
        for candidate in (("flash3",) if hopper else ()) + ("flash2", "xformers"):
            if candidate in available:
                return candidate
        return "sdpa"
    if name in ("flash3", "flash2", "xformers"):
        if name not in available_attention_backends():
            raise RuntimeError(f"attention backend {name!r} was forced but its package is not importable; "
                               f"available: {available_attention_backends()}")
        if not fused_ok:
            return "sdpa"
    return name


_logged: set[str] = set()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention, scale ``head_dim ** -0.5``, no mask.

    q, k, v: (N, L, H, Dh) -> (N, L, H, Dh).
    """
    name = attention_backend(q)
    if name not in _logged:
        _logged.add(name)
        _log.info("attention backend: %s", name)
    if name == "flash3":
        out = _module("flash_attn_interface").flash_attn_func(q, k, v)
        return out[0] if isinstance(out, tuple) else out
    if name == "flash2":
        return _module("flash_attn").flash_attn_func(q, k, v)
    if name == "xformers":
        return _module("xformers.ops").memory_efficient_attention(q, k, v)
    if name == "reference":
        return reference.attention(q, k, v)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)
