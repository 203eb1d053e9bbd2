"""Shared setup for the kernel tests.

Without a GPU the Triton kernels run in Triton's interpreter. ``@triton.jit`` picks the
interpreter when the kernel is *defined*, so ``TRITON_INTERPRET`` must be set before the
``kernels`` package is first imported; this file does it, which is enough when the kernel tests
run on their own or first (a root ``tests/conftest.py`` doing the same covers every order).
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Relative error bound per dtype: max |actual - expected| / max |expected| against float64 truth.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device (compiled Triton, not the interpreter)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def triton_backend():
    """Every kernel test runs the Triton path unless it says otherwise."""
    if DEVICE == "cpu" and not os.environ.get("TRITON_INTERPRET"):
        pytest.fail("no CUDA and TRITON_INTERPRET is unset: set it before `kernels` is imported")
    with kernels.backend("triton"):
        yield


@pytest.fixture
def device() -> str:
    """Where the kernel tests run: the GPU when there is one, else the CPU (interpreter)."""
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
