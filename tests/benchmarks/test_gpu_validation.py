"""benchmarks/gpu_validation.sh on a CPU: its smoke phase runs a chosen step, records it in the
summary and packs the results; a rerun of another step keeps the first one's."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_validation.sh"


def run(phase: str, tmp_path: Path, only: str | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(tmp_path / "out"), "GPU_VALIDATION_WORK": str(tmp_path / "work"),
           "PYTHON": sys.executable}
    if only is not None:
        env["ONLY"] = only
    return subprocess.run(["bash", str(SCRIPT), phase], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def test_smoke_steps_are_recorded_packed_and_kept_across_reruns(tmp_path):
    first = run("smoke", tmp_path, "profile")
    assert first.returncode == 0, first.stderr
    second = run("smoke", tmp_path, "env")
    assert second.returncode == 0, second.stderr
    summary = (tmp_path / "out" / "summary-smoke.md").read_text()
    assert "| profile | 0 |" in summary and "| env | 0 |" in summary
    assert "| report |" not in summary  # not asked for
    with tarfile.open(tmp_path / "out" / "results-smoke.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"smoke/profile-tiny.json", "smoke/profile-tiny.md", "smoke/env.log"} <= names


def test_unknown_phase_is_refused():
    proc = subprocess.run(["bash", str(SCRIPT), "everything"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage" in proc.stderr
