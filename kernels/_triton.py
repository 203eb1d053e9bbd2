"""Triton, where it imports: Linux x86_64 and aarch64 have wheels (``pip install -e .`` brings them);
macOS, Windows or an environment without it run every op as its PyTorch reference.

The kernel modules take ``triton``, ``tl`` and the :func:`jit` decorator from here, so that they import
with or without Triton; without it ``triton`` and ``tl`` are None and :func:`jit` leaves a stand-in that
names the missing package if anything launches it (the dispatch in :mod:`kernels._backend` never does).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

try:
    import triton
    import triton.language as tl
    IMPORT_ERROR: str | None = None
except ImportError as err:  # not installed, or installed but broken (e.g. a wheel for another Python)
    triton = tl = None
    IMPORT_ERROR = f"{type(err).__name__}: {err}"

INSTALL_HINT = "pip install triton (wheels for Linux x86_64 and aarch64)"


class TritonUnavailable(ImportError):
    """The Triton kernels were asked for, but Triton does not import here."""


class _Unavailable:
    """What :func:`jit` gives without Triton: a kernel that cannot be launched."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__

    def __getitem__(self, grid: Any) -> Callable:
        raise TritonUnavailable(f"the Triton kernel {self.__name__} cannot run: Triton does not import "
                                f"({IMPORT_ERROR}); {INSTALL_HINT}")


def jit(fn: Callable | None = None, **options: Any) -> Any:
    """``triton.jit`` (bare or with options such as ``do_not_specialize``), or :class:`_Unavailable`."""
    if triton is not None:
        return triton.jit(fn, **options) if fn is not None else triton.jit(**options)
    return _Unavailable(fn) if fn is not None else _Unavailable
