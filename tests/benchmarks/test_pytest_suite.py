"""``pytest benchmarks/ --benchmark-only`` runs (tiny CPU mode) and reports the derived numbers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_only_run_reports_throughput_memory_mfu_and_ratios(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/", "--benchmark-only", "-q", "-p", "no:cacheprovider",
         "--bench-device", "cpu", "--bench-variants", "mask50+kernels", "--bench-sample-variants", "maskdit",
         f"--benchmark-json={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "maskdit_fast throughput" in proc.stdout
    cases = {b["name"]: b["extra_info"] for b in json.loads(out.read_text())["benchmarks"]}
    # dit+kernels: the same-policy baseline of mask50+kernels, added and measured before it
    assert set(cases) == {"test_train_step[tiny/2-b2-dit]", "test_train_step[tiny/2-b2-dit+kernels]",
                          "test_train_step[tiny/2-b2-mask50+kernels]",
                          *(f"test_sampler[tiny/2-{v}-cfg{c}]" for v in ("dit", "maskdit") for c in ("1", "1.5"))}
    baseline = cases["test_train_step[tiny/2-b2-dit+kernels]"]
    masked = cases["test_train_step[tiny/2-b2-mask50+kernels]"]
    for info in (baseline, masked):
        assert info["images_per_s"] > 0 and 0 < info["mfu"] and info["peak_reserved_gib"] > 0
        assert info["fwd_macs_per_image"] * 2 == info["fwd_flops_per_image"]
        assert info["residual_dtype"] == "float32" and info["autocast"] == "off"
    assert "speedup_vs_baseline" not in baseline
    assert masked["speedup_vs_baseline"] == masked["images_per_s"] / baseline["images_per_s"]
    assert masked["fwd_flops_per_image"] < baseline["fwd_flops_per_image"]
    sampled = cases["test_sampler[tiny/2-maskdit-cfg1.5]"]
    guided_dit = cases["test_sampler[tiny/2-dit-cfg1.5]"]
    assert sampled["speedup_vs_baseline"] == sampled["images_per_s"] / guided_dit["images_per_s"]
