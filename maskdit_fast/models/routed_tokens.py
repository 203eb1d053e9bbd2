"""SDT token packing: the tokens that need the MLP, packed across the whole batch, and back.

The batch is viewed as one sequence of N*L tokens and ``ids`` (T,) lists the active ones, so
samples with different numbers of active tokens pack into one (T, D) matrix with no padding.

Packing is the package's token op ``kernels.gather_tokens`` on that one-sequence view (Triton on
CUDA, ``index_select`` on a CPU). Unpacking adds ``gate * y`` back at the active rows with one
``index_add`` (a copy of x plus T rows): ``kernels.scatter_tokens`` + ``kernels.gated_residual``
would compute the same but make two more full passes over the (N*L, D) activations, which on a
CPU costs a noticeable share of the MLP work the packing saves.
"""
from __future__ import annotations

import torch

import kernels


def pack(h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """h: (N, L, D); ids: (T,) int64 in [0, N*L), unique -> (T, D) = h.view(N*L, D)[ids]."""
    n, length, dim = h.shape
    return kernels.gather_tokens(h.reshape(1, n * length, dim), ids[None])[0]


def gated_unpack_add(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x: (N, L, D); gate: (N, D); y: (T, D) results of the packed tokens ``ids`` ->
    (N, L, D) = x + gate[n] * y at the active tokens, x elsewhere (a new tensor)."""
    n, length, dim = x.shape
    gates = gate.index_select(0, torch.div(ids, length, rounding_mode="floor"))  # each row's sample's gate
    # ids are unique, so each active row gets exactly one addition: x + gate * y, as in the masked formulation.
    return x.reshape(n * length, dim).index_add(0, ids, (gates * y).to(x.dtype)).view(n, length, dim)
