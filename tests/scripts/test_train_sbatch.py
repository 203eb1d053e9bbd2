"""scripts/train.sbatch run by bash as Slurm would run it, with ``srun`` and ``scontrol`` stubbed on PATH:
the stub srun runs its command line (one node: a real torchrun with one process of train.py), the stub
scontrol names the node and records what it is asked. The script's own logic runs for real: SIGUSR1 to
it (what ``#SBATCH --signal=B:USR1@120`` sends) reaches the training worker, which saves and stops,
and the script requeues the job; the requeued job resumes and finishes bit-identical to an
uninterrupted run, and requeues nothing; a failing run is not requeued."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import TINY_RUN
from tests.train.test_preemption import ENV, assert_same_training_state, finish, steps_saved
from tests.train.test_two_nodes import free_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "train.sbatch"
JOB_ID = "4242"
STUBS = {
    # srun runs the command on each node and passes the signals it gets on to it (srun(1), SIGNALS); here
    # one node: it becomes the command, which so gets them
    "srun": 'exec "$@"\n',
    "scontrol": 'echo "$*" >> "$SCONTROL_LOG"\nif [ "$1 $2" = "show hostnames" ]; then echo 127.0.0.1; fi\n',
    # the real torchrun, of the Python that runs the tests
    "torchrun": f'exec "{sys.executable}" -m torch.distributed.run "$@"\n',
}
STEPS = 100


def stub_path(folder: Path) -> str:
    folder.mkdir()
    for name, body in STUBS.items():
        (folder / name).write_text(f"#!/usr/bin/env bash\n{body}")
        (folder / name).chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


def sbatch(tmp_path: Path, *args: str, signal_after_step: int | None = None, **variables: str) -> tuple[int, str]:
    """``bash scripts/train.sbatch ARGS`` as job JOB_ID, with the environment ``variables`` added; with
    ``signal_after_step``, SIGUSR1 to the script once training has logged that step. Returns its exit status
    and output."""
    n = len(list(tmp_path.glob("job-*.log")))
    log = tmp_path / f"job-{n}.log"
    env = {**ENV, "PATH": stub_path(tmp_path / f"bin-{n}"), "SCONTROL_LOG": str(tmp_path / "scontrol.log"),
           "SLURM_JOB_ID": JOB_ID, "SLURM_JOB_NAME": "maskdit", "SLURM_JOB_NODELIST": "node001", "SLURM_NNODES": "1",
           "SLURM_GPUS_ON_NODE": "1", "RUN": str(tmp_path / "run"), "PORT": str(free_port()), **variables}
    for key in ("PET_SIGNALS_TO_HANDLE", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"):  # the script sets them itself
        env.pop(key)
    with log.open("w") as sink:
        proc = subprocess.Popen(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
    if signal_after_step is not None:
        metrics, deadline = tmp_path / "run" / "metrics.jsonl", time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline and (
                not metrics.exists() or len(metrics.read_text().splitlines()) < signal_after_step):
            time.sleep(0.02)
        proc.send_signal(signal.SIGUSR1)
    return finish(proc, log)


def requeues(tmp_path: Path) -> int:
    log = tmp_path / "scontrol.log"
    return log.read_text().splitlines().count(f"requeue {JOB_ID}") if log.exists() else 0


def test_the_script_asks_slurm_for_the_signal_and_requeue():
    directives = [line for line in SCRIPT.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --signal=B:USR1@120" in directives and "#SBATCH --requeue" in directives


def test_preempted_job_is_requeued_and_the_requeued_job_finishes_bit_for_bit(tmp_path):
    args = ["--no-progress", "--eval-samples", "0", *TINY_RUN, f"train.max_steps={STEPS}", "train.log_every=1",
            "train.ckpt_every=1000"]
    code, text = sbatch(tmp_path, *args, signal_after_step=1)
    assert code == 0, text[-4000:]
    assert "preempted (SIGUSR1): stopped after step" in text, text[-4000:]  # the worker got it, through torchrun
    assert f"requeueing job {JOB_ID}" in text and requeues(tmp_path) == 1
    stopped = steps_saved(tmp_path / "run")
    assert len(stopped) == 1 and stopped[0] < STEPS

    code, text = sbatch(tmp_path, *args)  # the requeued job, not signalled
    assert code == 0 and f"resumed from {tmp_path / 'run' / 'checkpoints'}" in text, text[-4000:]
    assert requeues(tmp_path) == 1 and steps_saved(tmp_path / "run")[-1] == STEPS

    straight = subprocess.run([sys.executable, "train.py", "--out", str(tmp_path / "straight"), *args], cwd=ROOT,
                              env=ENV, capture_output=True, text=True)  # train.py alone, never stopped
    assert straight.returncode == 0, straight.stderr[-4000:]
    assert_same_training_state(tmp_path / "straight", tmp_path / "run", STEPS)


def test_failed_job_is_not_requeued(tmp_path):
    code, text = sbatch(tmp_path, "--no-progress", *TINY_RUN, "train.max_steps=-1", MAX_RESTARTS="0")
    assert code != 0 and "train.max_steps" in text, text[-4000:]
    assert requeues(tmp_path) == 0 and "requeueing" not in text
