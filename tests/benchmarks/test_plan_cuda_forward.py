"""benchmarks/plan_cuda_forward.py: on a CPU build of torch it says what it needs; its CPU side counts
the saved tensors of a forward pass as the planner's tracker counts the forward's activations."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.plan_cuda_forward import forward_saved

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.backends.cuda.is_built(), reason="the refusal is that of a CPU build of torch")
def test_a_cpu_build_is_refused_with_what_is_needed():
    done = subprocess.run([sys.executable, "-m", "benchmarks.plan_cuda_forward"], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 2 and "needs a CUDA build of torch" in done.stderr and "Traceback" not in done.stderr


def test_saved_tensors_are_the_forward_activations():
    for arch in ("maskdit", "dit"):
        cpu = forward_saved("S/8", arch, 4, "cpu")
        # what autograd saves is what the forward pass still holds, but for the loss terms it returns
        assert cpu["saved_bytes"] == pytest.approx(cpu["activation_bytes"], rel=0.02), cpu
