"""Fused ops of maskdit_fast: Triton kernels with plain PyTorch references.

Every op dispatches on :func:`get_backend` (``MASKDIT_KERNELS=auto|triton|reference``):
CUDA tensors run Triton under ``auto``, everything else the reference in ``kernels.reference``.
"""
from ._backend import BACKENDS, backend, get_backend, set_backend, use_triton
from .adaln import gated_residual, gated_residual_layernorm_modulate, layernorm_modulate, residual_layernorm_modulate
from .attention import attention, attention_backend, available_attention_backends, set_attention_backend
from .tokens import gather_tokens, scatter_tokens

__all__ = [
    "BACKENDS", "backend", "get_backend", "set_backend", "use_triton",
    "layernorm_modulate", "residual_layernorm_modulate", "gated_residual", "gated_residual_layernorm_modulate",
    "gather_tokens", "scatter_tokens",
    "attention", "attention_backend", "available_attention_backends", "set_attention_backend",
]
