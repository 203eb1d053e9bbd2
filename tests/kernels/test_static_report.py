"""The static kernel report (benchmarks/kernels/static.py): every kernel compiles for sm_90 and sm_80 with
the specialisation of a real launch at the DiT-XL/2 shapes, and meets the targets of a memory-bound kernel.

The report compiles, so it runs in a subprocess without ``TRITON_INTERPRET`` (the kernel tests set it).
It takes a few minutes on 2 cores with an empty Triton cache (``~/.triton/cache``), well under one warm.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    pytest.importorskip("triton.backends.nvidia")
    out = tmp_path_factory.mktemp("static") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "benchmarks.kernels.static", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_kernel_of_every_op_compiles_for_both_gpus(report):
    from benchmarks.kernels.static import SCENARIOS

    for gpu in ("sm_90", "sm_80"):
        seen = {(r["op"], r["shape"], r["dtypes"], r["phase"]) for r in report["kernels"] if r["gpu"] == gpu}
        assert seen == {(op, shape, dtypes.name, phase) for op, shape, _, dtypes in SCENARIOS
                        for phase in ("fwd", "bwd")}, gpu
    assert all(r["registers"] > 0 and r["load_widths"] and r["store_widths"] for r in report["kernels"])


def test_rows_are_in_a_training_steps_dtypes(report):
    """The adaLN ops read a float32 residual stream and bf16 vectors / branch outputs, and write the
    normalised output in bf16, as under bf16 autocast; the minimum bytes follow those dtypes."""
    from benchmarks.kernels.bench import _bytes

    train = [r for r in report["ops"] if r["dtypes"] == "train" and r["op"] == "layernorm_modulate"]
    assert train and report["dtypes"]["train"] == dict(stream="float32", vectors="bfloat16", branch="bfloat16",
                                                        normed="bfloat16")
    sizes = dict(stream=4, vectors=2, branch=2, normed=2)
    for r in train:
        fwd = _bytes(r["op"], r["dims"], "fwd", sizes)
        assert r["minimum"] == (fwd if r["phase"] == "fwd" else _bytes(r["op"], r["dims"], "fwd+bwd", sizes) - fwd)
        assert r["torch_bytes"] < 0.01 * r["minimum"], r  # no cast of the normalised output outside the kernel


def test_report_meets_the_targets(report):
    """No spills, occupancy, bytes against the minimum, wave fill, vector widths: see ``violations``."""
    from benchmarks.kernels.static import violations

    assert violations(report) == []


def test_violations_are_caught():
    """The checker itself: a spill, low occupancy, extra bytes and a wave tail are each reported."""
    from benchmarks.kernels.static import violations

    good_kernel = dict(kernel="_k", op="op", shape="s", phase="fwd", gpu="sm_90", spills=0, occupancy=0.5,
                       waves=1.0, wave_fill=1.0, programs=100, bytes=100, num_warps=4, registers=40,
                       blocks_per_sm=8)
    good_op = dict(op="op", shape="s", phase="fwd", gpu="sm_90", ratio=1.0)
    assert violations({"kernels": [good_kernel], "ops": [good_op]}) == []
    for change in (dict(spills=2), dict(occupancy=0.25), dict(waves=2.1, wave_fill=0.7)):
        assert len(violations({"kernels": [{**good_kernel, **change}], "ops": [good_op]})) == 1, change
    assert len(violations({"kernels": [good_kernel], "ops": [{**good_op, "ratio": 1.2}]})) == 1
    argued = {**good_kernel, "occupancy": 0.25, "in_flight": 32 * 1024}  # fewer warps, enough bytes in flight
    assert violations({"kernels": [argued], "ops": [good_op]}) == []
    assert len(violations({"kernels": [{**good_kernel, "padding": 1.78}], "ops": [good_op]})) == 1
