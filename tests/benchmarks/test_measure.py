"""FLOP counting (both conventions), the residual-stream probe, peak memory and timing helpers."""
from __future__ import annotations

import pytest
import torch

from benchmarks.configs import ModelSpec
from benchmarks.measure import PeakMemory, count_flops, matmul_peak_tflops, residual_stream_dtype, time_calls
from maskdit_fast.config import LossConfig
from maskdit_fast.diffusion.edm import build_net
from maskdit_fast.diffusion.loss import edm_loss
from maskdit_fast.models.layers import DiTBlock

# Forward "Gflops" per image in the DiT paper (Peebles & Xie; fvcore counts a multiply-add as one FLOP).
DIT_PAPER_GMACS = {"S/2": 6.06, "XL/2": 118.64}


def dit_macs(width: int, depth: int, tokens: int, patch_values: int, mlp_ratio: float = 4.0) -> int:
    """Forward MACs of one image through this package's DiT, written out layer by layer:
    patch embedding, timestep MLP (256 frequencies), per block adaLN (6D outputs), qkv, QK^T, AV,
    projection and MLP, then the final layer's adaLN (2D) and linear. patch_values = C * p^2."""
    d, L, m = width, tokens, int(mlp_ratio * width)
    block = d * 6 * d + L * d * 3 * d + 2 * L * L * d + L * d * d + 2 * L * d * m
    return L * patch_values * d + 256 * d + d * d + depth * block + d * 2 * d + L * d * patch_values


@pytest.mark.parametrize("model", sorted(DIT_PAPER_GMACS))
def test_dit_forward_macs_match_the_dit_paper(model):
    flops = count_flops(ModelSpec.parse(model).config("dit", 0.0), 0.0)
    assert flops.forward / 2 / 1e9 == pytest.approx(DIT_PAPER_GMACS[model], rel=3e-3)
    assert flops.train / flops.forward == pytest.approx(3.0, rel=1e-3)


def test_dit_xl2_figures_in_both_conventions():
    """DiT-XL/2 at 256 px (32x32x4 latents, 256 tokens): the counter equals the layer-by-layer sum,
    118.617 GMACs = the DiT paper's 118.6 "Gflops", and 2 x that in the MFU convention."""
    flops = count_flops(ModelSpec.parse("XL/2").config("dit", 0.0), 0.0)
    macs = dit_macs(1152, 28, 256, 4 * 2 * 2)
    assert flops.dit_paper == macs == 118_616_702_976
    assert flops.forward == 2 * macs
    assert round(flops.dit_paper / 1e9, 1) == 118.6


def test_the_residual_stream_dtype_is_read_from_the_blocks():
    torch.manual_seed(0)
    cfg = ModelSpec.parse("tiny/2").config("maskdit", 0.5)
    net = build_net(cfg)
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    assert residual_stream_dtype(net, lambda: edm_loss(net, x, y, 0.5, LossConfig(), cfg)) == "float32"
    assert not net.model.blocks[0]._forward_hooks  # the probe's hooks are gone

    block = DiTBlock(16, 2, 16)
    tokens, c = torch.randn(2, 5, 16), torch.randn(2, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the same autocast, two residual streams: both seen
        assert residual_stream_dtype(block, lambda: block(tokens.bfloat16(), c)) == "bfloat16"
        assert "float32" in residual_stream_dtype(block, lambda: block(tokens, c))
    with pytest.raises(ValueError, match="no DiTBlock"):
        residual_stream_dtype(torch.nn.Linear(2, 2), lambda: None)


def test_cpu_peak_memory_sees_a_large_allocation():
    memory = PeakMemory(torch.device("cpu"))
    memory.reset()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    allocated, reserved = memory.read()
    del block
    assert 0.06 < allocated < 1 and reserved >= allocated


def test_time_calls_and_matmul_peak():
    calls = []
    times = time_calls(lambda: calls.append(1), torch.device("cpu"), warmup=2, reps=3)
    assert len(calls) == 5 and len(times) == 3 and min(times) >= 0
    assert matmul_peak_tflops(torch.device("cpu"), "fp32", 64, reps=2) > 0
