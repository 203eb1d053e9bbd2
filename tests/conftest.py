"""Test-session setup shared by every folder."""
from __future__ import annotations

import os

import torch

# Triton picks its interpreter when first imported: without a GPU, set it before anything imports
# triton so that tests/kernels can force the Triton kernels on CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def mnist_cache(tmp_path_factory: pytest.TempPathFactory):
    """A per-session cache directory for the MNIST classifier weights."""
    return tmp_path_factory.mktemp("maskdit_cache")


@pytest.fixture(scope="session")
def mnist_classifier(mnist_cache):
    """The package's MNIST classifier, trained once per test session (about half a minute)."""
    from maskdit_fast.eval.mnist_classifier import get_mnist_classifier

    return get_mnist_classifier(mnist_cache, progress=False)
