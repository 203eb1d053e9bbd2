"""The one precision policy of every architecture (DiT, MaskDiT masked and unmasked, DyDiT).

Under autocast (``train.precision=bf16|fp16``, sampling's bf16) the matmuls and attention compute in
the autocast dtype, while the **residual stream** (the tokens that go from block to block) stays in
the model's own parameter dtype, float32: the token embedding is cast to the dtype of the frozen
position embedding before the two are added (:meth:`maskdit_fast.models.DiT.embed`), and MaskDiT's
decoder input likewise. The adaLN kernels read and write the stream in that dtype and do their maths
in float32 whatever the storage.

Why (docs/precision.md): the official DiT and MaskDiT add a frozen float32 ``pos_embed`` parameter to
the patch embedding, so under autocast their residual stream is float32 too; a bf16 stream rounds
every gated update to 8 bits of mantissa, 28+ times per forward; and the price, the stream's bytes
doubled in the memory-bound elementwise kernels, is small next to the matmuls at DiT-XL/2 shapes.
"""
from __future__ import annotations

import contextlib

import torch

RESIDUAL_DTYPE = torch.float32  # the residual stream's dtype of a float32 model, under any autocast
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_COMPUTE = {"bf16": "bf16 autocast", "fp16": "fp16 autocast + grad scaler", "fp32": "fp32"}


def precision_policy(precision: str) -> str:
    """One line for a benchmark row or a log: what ``precision`` (``bf16`` | ``fp16`` | ``fp32``)
    computes in, and the residual stream's dtype (the same for every architecture)."""
    if precision not in _COMPUTE:
        raise ValueError(f"precision must be one of {sorted(_COMPUTE)}, got {precision!r}")
    if precision == "fp32":
        return "fp32 everywhere"
    return f"{_COMPUTE[precision]} for matmuls and attention; fp32 residual stream, norms and modulation"


def to_residual(tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """tokens: (N, L, D) from an autocast layer -> the residual stream's dtype, that of ``like`` (a
    frozen position embedding or another model-owned tensor, float32 unless the model was cast)."""
    return tokens.to(like.dtype)


def normed_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype a LayerNorm+modulate output should be written in for the Linear that reads it: the
    autocast dtype when autocast is on for x's device (the Linear's cast is then a no-op), else None
    (x's own dtype)."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on CUDA, ``fp32`` elsewhere (training and sampling alike); others are kept."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast to ``precision`` (bf16 | fp16) on ``device``; a no-op context for fp32."""
    if precision in AUTOCAST_DTYPES:
        return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])
    return contextlib.nullcontext()
