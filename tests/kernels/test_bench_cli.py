"""The kernel microbenchmark CLI (benchmarks/kernels/bench.py) runs in its tiny mode and reports every field."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIELDS = {"op", "shape", "dims", "mode", "bytes", "triton_ms", "eager_ms", "compiled_ms", "triton_gbps",
          "vs_eager", "vs_compiled", "of_copy"}


def test_tiny_mode_reports_every_op_mode_and_ratio(tmp_path):
    out = tmp_path / "bench.json"
    ops = ["gated_residual_layernorm_modulate", "scatter_tokens"]
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.kernels.bench", "--tiny", "--reps", "1", "--ops", ",".join(ops),
         "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "device-to-device copy" in proc.stdout and "vs compile" in proc.stdout
    report = json.loads(out.read_text())
    assert report["tiny"] is True and report["copy_gbps"] > 0
    results = report["results"]
    assert {(r["op"], r["mode"]) for r in results} == {(op, mode) for op in ops for mode in ("fwd", "fwd+bwd")}
    for r in results:
        assert set(r) == FIELDS
        assert r["bytes"] > 0 and min(r["triton_ms"], r["eager_ms"], r["compiled_ms"]) > 0
        assert abs(r["vs_eager"] - r["eager_ms"] / r["triton_ms"]) < 1e-9 * r["vs_eager"] + 1e-12
