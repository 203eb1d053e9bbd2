"""Which implementation runs (kernels/_backend.py): auto -> Triton on CUDA only; env var and override."""
from __future__ import annotations

import pytest
import torch

import kernels
from kernels import adaln, tokens


def test_auto_uses_reference_on_cpu_and_triton_on_cuda(monkeypatch):
    monkeypatch.delenv("MASKDIT_KERNELS", raising=False)
    with kernels.backend("auto"):
        assert not kernels.use_triton(torch.zeros(1))
        if torch.cuda.is_available():
            assert kernels.use_triton(torch.zeros(1, device="cuda"))


@pytest.mark.parametrize("name, expected", [("reference", False), ("triton", True), ("auto", False)])
def test_env_var_selects_backend(monkeypatch, name, expected):
    monkeypatch.setenv("MASKDIT_KERNELS", name)
    kernels.set_backend(None)  # fall back to the environment
    try:
        assert kernels.get_backend() == name
        assert kernels.use_triton(torch.zeros(1)) is expected
    finally:
        kernels.set_backend("triton")  # what the autouse fixture restores anyway


def test_bad_backend_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError):
        kernels.set_backend("cuda")
    monkeypatch.setenv("MASKDIT_KERNELS", "fast")
    with kernels.backend(None):
        with pytest.raises(ValueError, match="MASKDIT_KERNELS"):
            kernels.get_backend()


class _Forbidden:
    def __call__(self, *args, **kwargs):
        raise AssertionError("the Triton op ran under the reference backend")


def test_reference_backend_never_calls_the_ops(monkeypatch):
    for module, name in ((adaln, "_layernorm_modulate_op"), (adaln, "_gated_residual_op"), (adaln, "_fused_op"),
                         (tokens, "_gather_op"), (tokens, "_scatter_op")):
        monkeypatch.setattr(module, name, _Forbidden())
    x, y = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    v = torch.randn(2, 8)
    ids = torch.tensor([[0, 2], [3, 1]])
    with kernels.backend("reference"):
        kernels.layernorm_modulate(x, v, v)
        kernels.gated_residual(x, v, y)
        kernels.gated_residual_layernorm_modulate(x, v, y, v, v)
        kernels.scatter_tokens(kernels.gather_tokens(x, ids), ids, 4, v[0])
