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
