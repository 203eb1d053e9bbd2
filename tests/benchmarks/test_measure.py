"""FLOP counting, peak memory and timing helpers of the benchmarks."""
from __future__ import annotations

import pytest
import torch

from benchmarks.configs import ModelSpec
from benchmarks.measure import PeakMemory, count_flops, matmul_peak_tflops, time_calls

# Forward GFLOPs per image in the DiT paper (Peebles & Xie, table 4; fvcore counts a MAC as one FLOP).
DIT_PAPER_GMACS = {"S/2": 6.06, "XL/2": 118.64}


@pytest.mark.parametrize("model", sorted(DIT_PAPER_GMACS))
def test_dit_forward_macs_match_the_dit_paper(model):
    flops = count_flops(ModelSpec.parse(model).config("dit", 0.0), 0.0)
    assert flops.forward / 2 / 1e9 == pytest.approx(DIT_PAPER_GMACS[model], rel=3e-3)
    assert flops.train / flops.forward == pytest.approx(3.0, rel=1e-3)


def test_masking_cuts_the_encoder_flops():
    """Hiding half the tokens halves the encoder's linear FLOPs and quarters its attention FLOPs."""
    spec = ModelSpec.parse("S/2")
    unmasked, masked = (count_flops(spec.config("maskdit", r), r) for r in (0.0, 0.5))
    encoder = count_flops(spec.config("dit", 0.0), 0.0).forward  # (plus the small embedder and final layer)
    assert 0.5 * encoder < unmasked.forward - masked.forward < 0.75 * encoder


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
