"""Two gloo processes under real torchrun: a worker SIGKILLed mid-run is restarted by
``--max-restarts`` and the group resumes by itself, bit for bit; a rank that stops answering ends the
run within train.collective_timeout_s with one message naming the rank and the step, and --resume then
completes the run bit for bit. Results are read from files and logs (gloo may abort at process exit)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from maskdit_fast.train.watchdog import STALLED_EXIT, describe_stall
from tests.train.test_preemption import TORCHRUN, assert_same_training_state, run, steps_saved

TIMEOUT = ["train.collective_timeout_s=3"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted run on two processes."""
    out = tmp_path_factory.mktemp("faults") / "straight"
    code, text = run(out, {}, True, "--eval-samples", "0")
    assert steps_saved(out) == [4, 6], text[-4000:]
    return out


def test_killed_worker_is_restarted_and_resumes_by_itself(tmp_path, monkeypatch, straight):
    monkeypatch.setattr("tests.train.test_preemption.TORCHRUN", [*TORCHRUN, "--max-restarts", "1"])
    out = tmp_path / "restarted"
    code, text = run(out, {"kill": {"rank": 1, "step": 5}}, True, "--eval-samples", "0")  # after the state of step 4
    assert code == 0, text[-4000:]
    assert "restarted by torchrun (restart 1): resuming from the newest training state" in text, text[-4000:]
    assert "resumed from" in text and "step-0000004 at step 4" in text
    assert_same_training_state(straight, out, 6)


def test_stalled_rank_stops_the_run_naming_it_then_resume_completes(tmp_path, straight):
    out = tmp_path / "stalled"
    began = time.monotonic()
    code, text = run(out, {"stall": {"rank": 1, "step": 5, "seconds": 600}}, True, "--eval-samples", "0", *TIMEOUT,
                     timeout=120)
    took = time.monotonic() - began
    assert f"exitcode  : {STALLED_EXIT}" in text or "exit status 124" in text, text[-4000:]
    assert text.count("rank 1 stopped answering in step 5 (forward pass") == 1, text[-4000:]
    assert "the other ranks waited for it in step 5 (forward pass)" in text  # DDP's buffer broadcast
    assert took < 90, f"the stall took {took:.0f} s to end the run"  # start-up included; the stall itself ~3 s
    assert steps_saved(out) == [4]

    code, text = run(out, {}, True, "--resume", "--eval-samples", "0", *TIMEOUT)
    assert steps_saved(out) == [4, 6], text[-4000:]
    assert_same_training_state(straight, out, 6)


def test_stall_report_names_ranks_behind_or_silent():
    mark = {"step": 7, "phase": "backward pass", "idle_s": 3.2, "where": "x.py:1 in f"}
    marks = {0: {**mark, "seq": 20}, 1: {**mark, "seq": 19, "phase": "forward pass"}, 3: {**mark, "seq": 20}}
    message, culprits = describe_stall(marks, 4, 3)
    assert culprits == [1, 2]
    assert "rank 1 stopped answering in step 7 (forward pass" in message
    assert "rank 2 did not answer at all" in message
    # at the same point: the rank not waiting in torch's communication is the one to blame
    message, culprits = describe_stall({0: {**mark, "seq": 5, "waiting": True}, 1: {**mark, "seq": 5}}, 2, 3)
    assert culprits == [1] and "rank 1 stopped answering in step 7" in message
    message, culprits = describe_stall({0: {**mark, "seq": 5}, 1: {**mark, "seq": 5}}, 2, 3)
    assert culprits == [] and "every rank waited longer than train.collective_timeout_s=3 s in step 7" in message
