"""Which implementation of the fused ops runs: ``triton``, ``reference`` or ``auto``.

``auto`` (the default) runs Triton on CUDA tensors and the PyTorch reference elsewhere.
``MASKDIT_KERNELS`` sets the process-wide default; :func:`set_backend` (or the
``model.kernels`` config key) overrides it, e.g. for A/B benchmarks.

Without Triton (macOS, Windows, not installed) ``auto`` runs the references everywhere and says so
once (a log line naming how to get the kernels); ``triton`` raises :class:`TritonUnavailable`.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch

from ._triton import IMPORT_ERROR, INSTALL_HINT, TritonUnavailable

BACKENDS = ("auto", "triton", "reference")
_override: str | None = None
_noticed = False


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


def triton_available() -> bool:
    """Whether Triton imports in this environment (the kernels can run)."""
    return IMPORT_ERROR is None


def check_backend() -> str:
    """The backend in force, checked against this environment: without Triton ``triton`` raises
    :class:`TritonUnavailable` and ``auto`` logs, once per process, that the references run."""
    global _noticed
    name = get_backend()
    if IMPORT_ERROR is None or name == "reference":
        return name
    if name == "triton":
        raise TritonUnavailable(f"the kernel backend is triton (model.kernels or MASKDIT_KERNELS), but Triton does "
                                f"not import ({IMPORT_ERROR}): {INSTALL_HINT}, or use model.kernels=auto to run "
                                "the PyTorch references")
    if not _noticed:
        _noticed = True
        logging.getLogger("kernels").warning(
            "Triton does not import (%s): the fused ops run as their PyTorch references; for the Triton kernels, "
            "%s", IMPORT_ERROR, INSTALL_HINT)
    return name


def use_triton(x: torch.Tensor) -> bool:
    """Whether an op on ``x`` should run its Triton kernel (never without Triton: see :func:`check_backend`)."""
    name = check_backend()
    if name == "auto":
        return x.is_cuda and IMPORT_ERROR is None
    return name == "triton"
