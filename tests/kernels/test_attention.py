"""Attention dispatch (kernels/attention.py): backend choice, forcing, and agreement with the reference."""
from __future__ import annotations

import pytest
import torch

import kernels
from kernels import attention as attention_module
from kernels import reference


@pytest.fixture(autouse=True)
def default_attention(monkeypatch):
    monkeypatch.delenv("MASKDIT_ATTENTION", raising=False)
    kernels.set_attention_backend(None)
    yield
    kernels.set_attention_backend(None)


def _qkv(dtype=torch.float32, device="cpu", shape=(2, 10, 3, 16)):
    return [torch.randn(shape, dtype=dtype, device=device) for _ in range(3)]


def test_cpu_and_float32_fall_back_to_sdpa():
    q, _, _ = _qkv()
    assert kernels.attention_backend(q) == "sdpa"
    assert {"sdpa", "reference"} <= set(kernels.available_attention_backends())


@pytest.mark.parametrize("name", ["sdpa", "reference", "auto"])
def test_matches_reference_on_cpu(name, monkeypatch):
    monkeypatch.setenv("MASKDIT_ATTENTION", name)
    q, k, v = _qkv()
    expected = reference.attention(*(t.double() for t in (q, k, v)))
    out = kernels.attention(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_forcing_a_missing_package_fails_loudly():
    missing = [b for b in ("flash3", "flash2", "xformers") if b not in kernels.available_attention_backends()]
    if not missing:
        pytest.skip("every fused attention package is installed")
    kernels.set_attention_backend(missing[0])
    with pytest.raises(RuntimeError, match="not importable"):
        kernels.attention_backend()


def test_unknown_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError):
        kernels.set_attention_backend("flash4")
    monkeypatch.setenv("MASKDIT_ATTENTION", "flash4")
    with pytest.raises(ValueError, match="MASKDIT_ATTENTION"):
        kernels.attention_backend()


def test_override_wins_over_env(monkeypatch):
    monkeypatch.setenv("MASKDIT_ATTENTION", "sdpa")
    kernels.set_attention_backend("reference")
    assert kernels.attention_backend(_qkv()[0]) == "reference"
    kernels.set_attention_backend(None)
    assert kernels.attention_backend(_qkv()[0]) == "sdpa"


def test_gradients_flow():
    q, k, v = (t.requires_grad_() for t in _qkv())
    kernels.attention(q, k, v).square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    reference.attention(q, k, v).square().sum().backward()
    for g, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(g, t.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_available_backend_matches_reference_on_gpu(dtype):
    q, k, v = _qkv(dtype, "cuda", (4, 256, 16, 72))
    expected = reference.attention(q, k, v).float()
    for name in kernels.available_attention_backends():
        kernels.set_attention_backend(name)
        out = kernels.attention(q, k, v)
        assert attention_module.attention_backend(q) in (name, "sdpa")
        err = (out.float() - expected).abs().max() / expected.abs().max()
        assert err <= 1e-2, (name, err.item())
