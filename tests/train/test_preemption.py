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
import threading
import time
from pathlib import Path

import torch

from maskdit_fast.storage import latest_training_state, load_training_state
from maskdit_fast.train.preemption import PREEMPTED_EXIT, stop_signals
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


def test_signal_during_the_first_compile_stops_after_that_step_and_resumes_bit_for_bit(tmp_path, monkeypatch):
    """train.compile=true under torchrun (one process): SIGUSR1 reaches the worker's process group while the
    C++ compiler that inductor runs for the first step is compiling (torchrun signals the group, as Slurm
    does). The step still ends, its state is saved, the worker exits 75; --resume then ends bit-identical
    to an uninterrupted compiled run. The inductor cache starts empty, so that the first step really
    compiles: about 60 s of CPU, most of it that compile (kept: the compile is what is under test)."""
    monkeypatch.setattr(sys.modules[__name__], "TORCHRUN", [*TORCHRUN[:-1], "1"])  # --nproc_per_node 1
    monkeypatch.setitem(ENV, "TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    compiled = ["--eval-samples", "0", "train.compile=true", "train.sample_every=1000"]
    out = tmp_path / "run"
    code, text = run(out, {"signal": {"at": "compile", "name": "SIGUSR1"}}, True, *compiled)
    assert "fault_worker: SIGUSR1 sent to the process group while cc1plus" in text, text[-4000:]
    assert "stopped after step 1, its training state is saved" in text, text[-4000:]
    assert f"fault_worker: rank 0 exits with status {PREEMPTED_EXIT}" in text
    assert steps_saved(out) == [1]

    code, text = run(out, {}, True, "--resume", *compiled)
    assert code == 0 and steps_saved(out) == [1, 4, 6], text[-4000:]
    straight = tmp_path / "straight"
    code, text = run(straight, {}, True, *compiled)
    assert code == 0, text[-4000:]
    assert_same_training_state(straight, out, 6)


def test_processes_started_under_the_handlers_do_not_get_the_stop_signals():
    """torchrun and Slurm signal the whole process group: a child (a compiler, a data worker) must live on
    while the run saves; the run itself still gets the signal."""
    assert threading.current_thread() is threading.main_thread()  # else no handler: the signal would end pytest
    child_code = [sys.executable, "-c", "import time; time.sleep(0.5)"]
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    with stop_signals(["SIGUSR1"]) as stop:
        child = subprocess.Popen(child_code)
        os.kill(child.pid, signal.SIGUSR1)  # what os.killpg does to it
        os.kill(os.getpid(), signal.SIGUSR1)
        assert child.wait(30) == 0
        deadline = time.monotonic() + 10
        while not stop.requested and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stop.received == signal.SIGUSR1
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
    child = subprocess.Popen(child_code)  # afterwards a child gets it again
    os.kill(child.pid, signal.SIGUSR1)
    assert child.wait(30) == -signal.SIGUSR1


def test_the_stop_signals_are_configurable(tmp_path):
    """train.preempt_signals names the signals that stop the run; [] leaves every signal its default action."""
    code, text = run(tmp_path / "hup", {"signal": {"at": "step", "step": 2, "name": "SIGHUP"}}, False,
                     "--eval-samples", "0", "train.preempt_signals=[SIGHUP]")
    assert code == PREEMPTED_EXIT and "preempted (SIGHUP): stopped after step 2" in text, text[-4000:]
    assert steps_saved(tmp_path / "hup") == [2]

    code, text = run(tmp_path / "none", {"signal": {"at": "step", "step": 2, "name": "SIGUSR1"}}, False,
                     "--eval-samples", "0", "train.preempt_signals=[]")
    assert code == -signal.SIGUSR1 and "preempted" not in text, text[-4000:]
    assert not (tmp_path / "none" / "checkpoints").exists()

    code, text = run(tmp_path / "kill", {}, False, "train.preempt_signals=[SIGKILL]")
    assert code == 2 and "train.preempt_signals: 'SIGKILL' is not a signal a process can catch" in text, text[-4000:]
