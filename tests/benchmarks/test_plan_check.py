"""benchmarks/plan_check.py: the plan next to the same steps run for real (here on the CPU, where the
real tensors' storages are the measurement), and its step in gpu_validation.sh's smoke phase."""
from __future__ import annotations

import pytest

from benchmarks.plan_check import TINY, check
from tests.benchmarks.test_gpu_validation import run


def test_the_plan_equals_the_real_steps_on_the_cpu():
    rows = check("S/2", [2, 4], "cpu", TINY)
    assert [(r["arch"], r["batch"]) for r in rows] == [("dit", 2), ("dit", 4), ("maskdit", 2), ("maskdit", 4)]
    for r in rows:
        assert r["measured"] == r["tracked_real"]  # no CUDA: the tracker on real tensors is the measurement
        assert r["measured_over_planned"] == pytest.approx(1.0, abs=0.01), r
        assert r["plan"]["device"] == "cpu" and r["real"]["measured"] is None
    assert rows[1]["planned"] > rows[0]["planned"]  # a larger batch holds more


def test_the_smoke_phase_runs_it_and_quotes_its_rows(tmp_path):
    done = run("smoke", tmp_path, "plan")
    assert done.returncode == 0, done.stderr
    summary = (tmp_path / "out" / "summary-smoke.md").read_text()
    assert "| plan | 0 |" in summary
    assert "| dit | 32 |" in summary and "| maskdit | 64 |" in summary  # the headlines: the table's rows
