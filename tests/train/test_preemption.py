"""Preemption: train.py (one process, and two gloo processes under torchrun) signalled during a sample
grid, during a checkpoint (a second signal during the save), at a seeded random moment and during the
final quality check; each time resumed with --resume; the final model, EMA and optimizer equal those
of an uninterrupted run bit for bit. Results are read from the files the runs write (gloo may abort at
process exit)."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from maskdit_fast.storage import latest_training_state, load_training_state
from maskdit_fast.train.preemption import PREEMPTED_EXIT
from tests.helpers import TINY_RUN

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("fault_worker.py")
RUN = [*TINY_RUN, "train.sample_every=2", "train.ckpt_every=4", "train.keep_last=0"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
       # torchrun passes SIGUSR1 on to its workers (as Slurm's --signal=USR1 needs) and gives them time to save
       "PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "120"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def start(out: Path, faults: dict, torchrun: bool, *args: str) -> tuple[subprocess.Popen, Path]:
    """train.py (through the fault worker) into ``out``; returns the process and its log file."""
    n = len(list(out.parent.glob(f"{out.name}-*.json")))
    spec, log = out.parent / f"{out.name}-{n}.json", out.parent / f"{out.name}-{n}.log"
    overrides = [*RUN, "parallel=ddp"] if torchrun else RUN
    spec.write_text(json.dumps({"argv": ["--out", str(out), "--no-progress", *args, *overrides], **faults}))
    command = [*TORCHRUN, str(WORKER), str(spec)] if torchrun else [sys.executable, str(WORKER), str(spec)]
    with log.open("w") as sink:
        return subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=sink, stderr=subprocess.STDOUT), log


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> tuple[int, str]:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"no end within {timeout} s:\n{log.read_text()[-4000:]}")
    return proc.returncode, log.read_text()


def run(out: Path, faults: dict, torchrun: bool, *args: str, timeout: float = 300) -> tuple[int, str]:
    return finish(*start(out, faults, torchrun, *args), timeout=timeout)


def signal_at_random(out: Path, torchrun: bool, seed: int) -> tuple[int, str]:
    """Resume ``out`` and signal it (torchrun's agent, or the process) a seeded random time into training."""
    proc, log = start(out, {}, torchrun, "--resume", "--eval-samples", "0")
    deadline = time.monotonic() + 200
    while "resumed from" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(random.Random(seed).uniform(0.0, 1.5))
    if proc.poll() is None:
        proc.send_signal(signal.SIGUSR1)
    return finish(proc, log)


def steps_saved(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))


def assert_same_training_state(a_dir: Path, b_dir: Path, step: int) -> None:
    a, b = (load_training_state(latest_training_state(d)) for d in (a_dir, b_dir))
    assert a["step"] == b["step"] == step
    for part in ("model", "ema"):
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), f"{part}.{name} differs"
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for name, moments in a["optimizer"]["state"].items():
        for key, value in moments.items():
            assert torch.equal(value, b["optimizer"]["state"][name][key]), f"optimizer {name}.{key} differs"


def preempt_and_resume(d: Path, torchrun: bool, seed: int) -> Path:
    """The run ``d/run`` signalled during the grid of step 2, during the checkpoint of step 4 and at a
    random moment, resumed until it ends; returns it."""
    out = d / "run"
    code, text = run(out, {"signal": {"at": "sample", "step": 2, "name": "SIGTERM"}}, torchrun, "--eval-samples", "0")
    assert "stopped after step 2, its training state is saved" in text, text[-4000:]
    if not torchrun:  # (torchrun itself exits 1 when a signal stops it)
        assert code == PREEMPTED_EXIT, text[-4000:]
    assert steps_saved(out) == [2] and not (out / "samples" / "step-0000002.png").exists()  # the grid was cut short

    code, text = run(out, {"signal": {"at": "checkpoint", "step": 4, "name": "SIGUSR1"}}, torchrun, "--resume",
                     "--eval-samples", "0")
    assert "stopped after step 4" in text and steps_saved(out) == [2, 4], text[-4000:]
    assert text.count("stopped after step") == 1  # said once (rank 0), a second signal during the save changed nothing

    for attempt in range(4):  # a random moment: during a step, a grid, a checkpoint, or after the end
        code, text = signal_at_random(out, torchrun, seed + attempt)
        if steps_saved(out)[-1] == 6:
            break
        assert "stopped after step" in text, text[-4000:]
    else:
        code, text = run(out, {}, torchrun, "--resume", "--eval-samples", "0")
    assert steps_saved(out)[-1] == 6, text[-4000:]
    return out


def test_one_process_preempted_anywhere_resumes_bit_for_bit(tmp_path):
    code, text = run(tmp_path / "straight", {}, False, "--eval-samples", "0")
    assert code == 0, text[-4000:]
    out = preempt_and_resume(tmp_path, torchrun=False, seed=1)
    assert_same_training_state(tmp_path / "straight", out, 6)

    # the final quality check cut short: the state is already saved, nothing is written again
    before = {p: p.stat().st_mtime_ns for p in (out / "checkpoints").rglob("*")}
    code, text = run(out, {"signal": {"at": "quality", "name": "SIGUSR1"}}, False, "--resume", "--eval-samples", "20")
    assert code == PREEMPTED_EXIT and "during the quality check" in text, text[-4000:]
    assert not (out / "mnist_quality.json").exists()
    assert {p: p.stat().st_mtime_ns for p in (out / "checkpoints").rglob("*")} == before
    assert_same_training_state(tmp_path / "straight", out, 6)


def test_two_processes_preempted_anywhere_resume_bit_for_bit(tmp_path):
    straight = tmp_path / "straight"
    code, text = run(straight, {}, True, "--eval-samples", "0")
    assert steps_saved(straight) == [4, 6], text[-4000:]
    out = preempt_and_resume(tmp_path, torchrun=True, seed=2)
    assert_same_training_state(straight, out, 6)
