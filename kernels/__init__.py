"""Fused ops of maskdit_fast: Triton kernels with plain PyTorch references.

Every op dispatches on :func:`get_backend` (``MASKDIT_KERNELS=auto|triton|reference``):
CUDA tensors run Triton under ``auto``, everything else the reference in ``kernels.reference``.
Without Triton (macOS, Windows, not installed) every op runs its reference: see :func:`check_backend`.
"""
from ._backend import BACKENDS, backend, check_backend, get_backend, set_backend, triton_available, use_triton
from ._triton import TritonUnavailable
from .adaln import gated_residual, gated_residual_layernorm_modulate, layernorm_modulate, residual_layernorm_modulate
from .attention import attention, attention_backend, available_attention_backends, set_attention_backend
from .tokens import gather_tokens, scatter_tokens

__all__ = [
    "BACKENDS", "TritonUnavailable", "backend", "check_backend", "get_backend", "set_backend", "triton_available",
    "use_triton",
    "layernorm_modulate", "residual_layernorm_modulate", "gated_residual", "gated_residual_layernorm_modulate",
    "gather_tokens", "scatter_tokens",
    "attention", "attention_backend", "available_attention_backends", "set_attention_backend",
]
