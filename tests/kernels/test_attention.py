"""Attention dispatch (kernels/attention.py): backend choice, forcing, and agreement with the reference."""
from __future__ import annotations

import importlib

import pytest
import torch

import kernels
from kernels import reference

# The module (kernels.attention is also the name of the function the package exports).
attention_module = importlib.import_module("kernels.attention")


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


class _FakeFlash:
    """Stands in for flash_attn_interface / flash_attn: records calls, refuses head dims not in ``takes``."""

    def __init__(self, takes=None):
        self.takes, self.calls = takes, []

    def flash_attn_func(self, q, k, v):
        self.calls.append(q.shape[-1])
        if self.takes is not None and q.shape[-1] not in self.takes:
            raise RuntimeError("FlashAttention forward only supports head dimension at most 256 and 64, 128, 256")
        return q


@pytest.fixture
def hopper_with(monkeypatch):
    """A Hopper GPU whose importable attention packages are the given fakes (flash-attn is not installed here)."""

    def install(modules: dict):
        monkeypatch.setattr(attention_module, "_module", lambda name: modules.get(name))
        monkeypatch.setattr(attention_module, "_PROBE_DEVICE", "cpu")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
        attention_module._flash3_takes.cache_clear()

    yield install
    attention_module._flash3_takes.cache_clear()


def test_old_flash3_is_skipped_for_head_dims_it_refuses(hopper_with, caplog):
    """A pre-2024 FA3 build takes 64/128/256 only: DiT-XL's 72 and 32 go to FA2, probed once each."""
    fa3, fa2 = _FakeFlash(takes={64, 128, 256}), _FakeFlash()
    hopper_with({"flash_attn_interface": fa3, "flash_attn": fa2})
    with caplog.at_level("WARNING"):
        assert kernels.attention_backend(head_dim=72) == "flash2"
        assert kernels.attention_backend(head_dim=72) == "flash2"
        assert kernels.attention_backend(head_dim=128) == "flash3"
        choice = kernels.attention_backend(head_dim=32)
    assert choice == "flash2" and choice.padded_head_dim == 32
    assert fa3.calls == [72, 128, 32]  # one probe per head dim
    assert sum("refuses head dim" in r.message for r in caplog.records) == 2


def test_current_flash3_pads_the_head_dim(hopper_with):
    hopper_with({"flash_attn_interface": _FakeFlash(), "flash_attn": _FakeFlash()})
    choice = kernels.attention_backend(head_dim=72)
    assert choice == "flash3" and (choice.head_dim, choice.padded_head_dim) == (72, 96)
    assert kernels.attention_backend(head_dim=32).padded_head_dim == 64
    assert "computed at 96" in repr(choice)


def test_refused_flash3_without_flash2_falls_back_to_sdpa(hopper_with):
    hopper_with({"flash_attn_interface": _FakeFlash(takes={64, 128, 256})})
    choice = kernels.attention_backend(head_dim=72)
    assert choice == "sdpa" and choice.padded_head_dim == 72


def test_padded_head_dims_of_each_backend():
    assert attention_module.AttentionBackend("flash2", 72).padded_head_dim == 96
    assert attention_module.AttentionBackend("sdpa", 33).padded_head_dim == 40
    assert attention_module.AttentionBackend("reference", 72).padded_head_dim == 72
    assert attention_module.AttentionBackend("xformers", 72).padded_head_dim is None
    assert kernels.attention_backend().head_dim is None
