"""User errors under torchrun (2 CPU processes): every rank stops with exit status 2 and the message
is printed once, without a traceback from our processes."""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import TINY_RUN

ROOT = Path(__file__).resolve().parents[2]


def torchrun_train(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "train.py"), "--no-progress", "--eval-samples", "0", *TINY_RUN, "parallel=ddp",
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    return done.stdout + done.stderr


def assert_once_without_traceback(output: str, message: str) -> None:
    assert output.count(message) == 1, output
    assert "maskdit_fast/" not in output, output  # no traceback line through our code


def test_indivisible_global_batch_is_reported_once(tmp_path):
    output = torchrun_train("--out", str(tmp_path / "run"), "train.global_batch=7")
    assert_once_without_traceback(output, "train.global_batch: 7 is not divisible by the 2 processes")
    assert not (tmp_path / "run").exists()


def test_a_live_lock_stops_every_rank_with_one_message(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lock = os.open(run / ".lock", os.O_RDWR | os.O_CREAT)
    os.write(lock, json.dumps({"host": "node7", "pid": 4242, "since": "today"}).encode())
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        output = torchrun_train("--out", str(run))
    finally:
        os.close(lock)
    assert_once_without_traceback(output, "in use by another live run (host node7, PID 4242")
