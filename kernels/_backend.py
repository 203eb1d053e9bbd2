"""Which implementation of the fused ops runs: ``triton``, ``reference`` or ``auto``.

``auto`` (the default) runs Triton on CUDA tensors and the PyTorch reference elsewhere.
``MASKDIT_KERNELS`` sets the process-wide default; :func:`set_backend` (or the
``model.kernels`` config key) overrides it, e.g. for A/B benchmarks.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "triton", "reference")
_override: str | None = None


def _check(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}={name!r} is not a kernel backend; use one of {BACKENDS}")
    return name


def get_backend() -> str:
    """The backend in force: the last :func:`set_backend`, else ``$MASKDIT_KERNELS``, else ``auto``."""
    if _override is not None:
        return _override
    return _check(os.environ.get("MASKDIT_KERNELS", "auto").strip().lower() or "auto", "MASKDIT_KERNELS")


def set_backend(name: str | None) -> None:
    """Force a backend for this process (``None`` goes back to ``$MASKDIT_KERNELS``)."""
    global _override
    _override = None if name is None else _check(name, "kernel backend")


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Context manager form of :func:`set_backend`."""
    previous = _override
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def use_triton(x: torch.Tensor) -> bool:
    """Whether an op on ``x`` should run its Triton kernel."""
    name = get_backend()
    if name == "auto":
        return x.is_cuda
    return name == "triton"
