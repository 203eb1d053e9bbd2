"""Attention dispatch: flash-attn (FA3 on Hopper, else FA2) > xformers > PyTorch SDPA.

The chosen backend is visible through :func:`attention_backend` (with the head dim its kernels pad
to) and forceable for A/B runs with ``MASKDIT_ATTENTION=flash3|flash2|xformers|sdpa|reference`` or
:func:`set_attention_backend`. flash-attn and xformers only take fp16/bf16 CUDA tensors; other
inputs fall back to SDPA. FA3 is taken only for head dims its build accepts: builds before late
2024 refuse anything but 64/128/256 (DiT-XL has 72 in the encoder, 32 in the decoder), later ones
pad 72 to 96 and 32 to 64. Each head dim is probed once with a tiny call; a refusal falls back to
FA2 (else xformers, else SDPA) with a one-line notice.
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
_FA3_HEAD_DIMS = (64, 96, 128, 192, 256)
_PROBE_DEVICE = "cuda"  # the kernels current FA3 builds compile; others are padded up


class AttentionBackend(str):
    """A backend name (compares equal to it) that also says the head dim its kernels run at.

    ``head_dim``: the model's (None when unknown); ``padded_head_dim``: what the kernels compute
    with (None when unknown, e.g. xformers' choice).
    """

    head_dim: int | None
    padded_head_dim: int | None

    def __new__(cls, name: str, head_dim: int | None = None) -> AttentionBackend:
        self = super().__new__(cls, name)
        self.head_dim = head_dim
        self.padded_head_dim = None if head_dim is None else _padded(name, head_dim)
        return self

    def __repr__(self) -> str:
        if self.head_dim is None:
            return str(self)
        return f"{self} (head dim {self.head_dim}, computed at {self.padded_head_dim})"


def _padded(name: str, head_dim: int) -> int | None:
    if name == "flash3":
        return next((d for d in _FA3_HEAD_DIMS if d >= head_dim), None)
    if name == "flash2":  # FA2 instantiates multiples of 32 up to 192, then 256
        return -(-head_dim // 32) * 32 if head_dim <= 192 else 256
    if name == "sdpa":  # PyTorch pads the head dim of its fused kernels to a multiple of 8
        return -(-head_dim // 8) * 8
    if name == "reference":
        return head_dim
    return None


@functools.cache
def _flash3_takes(head_dim: int) -> bool:
    """Probe once per head dim whether the installed FA3 runs it (a 1 x 128 x 1 x head_dim bf16 call)."""
    q = torch.zeros(1, 128, 1, head_dim, dtype=torch.bfloat16, device=_PROBE_DEVICE)
    try:
        _module("flash_attn_interface").flash_attn_func(q, q, q)
    except Exception as err:  # an unsupported head dim raises from the extension
        _log.warning("flash-attn 3 refuses head dim %d (%s): using the next attention backend", head_dim,
                     str(err).splitlines()[0] if str(err) else type(err).__name__)
        return False
    return True


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


def attention_backend(q: torch.Tensor | None = None, head_dim: int | None = None) -> AttentionBackend:
    """The backend :func:`attention` uses for ``q`` (N, L, H, Dh) (or for a bf16 CUDA tensor of head
    dim ``head_dim`` when ``q`` is None), with the head dim it computes at."""
    head_dim = q.shape[-1] if q is not None else head_dim
    return AttentionBackend(_choose(q, head_dim), head_dim)


def _choose(q: torch.Tensor | None, head_dim: int | None) -> str:
    name = _requested()
    fused_ok = q is None or (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16))
    if name == "auto":
        if not fused_ok:
            return "sdpa"
        available = available_attention_backends()
        hopper = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
        for candidate in (("flash3",) if hopper else ()) + ("flash2", "xformers"):
            if candidate in available and (candidate != "flash3" or head_dim is None or _flash3_takes(head_dim)):
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
    if repr(name) not in _logged:
        _logged.add(repr(name))
        _log.info("attention backend: %r", name)
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
