"""Shared setup for the kernel tests.

Without a GPU the Triton kernels run in Triton's interpreter. Triton decides that when it is
imported and when each ``@triton.jit`` function is defined, so ``TRITON_INTERPRET=1`` must be
in the environment before anything imports ``triton``. This file sets it, which is enough when
the kernel tests are collected first; for whole-suite runs where an earlier test folder imports
``kernels`` (hence ``triton``), ``tests/conftest.py`` must set it too.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import kernels  # noqa: E402
from kernels import adaln  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Relative error bound per dtype: max |actual - expected| / max |expected| against float64 truth.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device (compiled Triton, not the interpreter)")


@pytest.fixture(autouse=True)
def triton_backend(request: pytest.FixtureRequest):
    """Every kernel test runs the Triton path unless it says otherwise; ``gpu`` tests need CUDA."""
    if request.node.get_closest_marker("gpu") and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    with kernels.backend("triton"):
        yield


@pytest.fixture
def device() -> str:
    """Where kernels run: the GPU when there is one, else the CPU through Triton's interpreter."""
    if DEVICE == "cpu" and not isinstance(adaln._adaln_fwd_kernel, InterpretedFunction):
        pytest.fail("no CUDA, and triton was imported before TRITON_INTERPRET=1 was set: "
                    "set it in the environment or at the top of tests/conftest.py")
    return DEVICE


@pytest.fixture
def poison(monkeypatch: pytest.MonkeyPatch):
    """Make ``torch.empty``/``torch.empty_like`` return NaN (floats) or -7 (ints) instead of junk.

    A kernel that skips an element of a buffer it allocates then leaves a NaN that the
    comparison catches (masked tails, the last row block, partial-sum slots...).
    """
    empty, empty_like = torch.empty, torch.empty_like

    def _poisoned(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan") if t.is_floating_point() else -7)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poisoned(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poisoned(empty_like(*a, **k)))


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected| / max |expected|`` (absolute when expected is all zeros)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if actual.numel() == 0:
        return 0.0
    diff = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    return diff / scale if scale > 0 else diff


@pytest.fixture
def assert_close():
    """``assert_close(actual, expected, dtype, what)`` with the per-dtype bound in ``TOLERANCE``."""

    def check(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
        err = rel_err(actual, expected)
        assert err <= TOLERANCE[dtype], f"{what}: relative error {err:.3g} > {TOLERANCE[dtype]:g} ({dtype})"

    return check
