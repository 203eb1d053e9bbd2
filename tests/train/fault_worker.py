"""A ``train.py`` process (plain, or one rank under ``torchrun``) with faults injected at chosen moments,
for the fault-tolerance tests. Usage: ``fault_worker.py FAULTS_JSON``; the file holds
``{"argv": [train.py arguments], ...}`` (with ``"command": "dydit"``: ``python -m maskdit_fast.dydit``
arguments) and any of:

- ``"signal": {"at": "step" | "sample" | "checkpoint" | "quality" | "final", "step": k, "name": "SIGUSR1"}``:
  rank 0 sends the signal when step k / the sample grid of step k / the checkpoint of step k / the final
  quality check / DyDiT's final samples start, to torchrun's agent (which passes it on to every worker, as
  under Slurm) or, in a plain launch, to itself; a phase then takes a while, so the signal arrives inside
  it; in step k rank 0 waits until its handler has run. At a checkpoint a second signal follows during
  the save itself.
- ``"signal": {"at": "compile", "name": "SIGUSR1"}``: rank 0 watches for the C++ compiler that
  ``torch.compile`` (inductor on the CPU) runs on a kernel of the first step, and while it runs, signals
  the worker's whole process group, compiler included: it signals torchrun's agent, which passes the
  signal on with ``os.killpg`` (under torchrun only).
- ``"stall": {"rank": r, "step": k, "seconds": s}``: rank r sleeps in the forward pass of step k.
- ``"kill": {"rank": r, "step": k}``: rank r SIGKILLs itself in step k, in the first run of the group only.
- ``"kill_node": {"node": name, "step": k}``: a lost node: the worker whose agent was started with
  ``FAULT_NODE=name`` in its environment SIGKILLs its torchrun agent, then itself, in step k (first run only).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import maskdit_fast.dydit.finetune as finetune
import maskdit_fast.generate as generate_module
import maskdit_fast.train.loop as loop
import maskdit_fast.train.objective as objective
import maskdit_fast.train.preemption as preemption
import maskdit_fast.train.trainer as trainer
from maskdit_fast.cli import train_main
from maskdit_fast.dydit.__main__ import main as dydit_main
from maskdit_fast.train.ema import EMA

RANK = int(os.environ.get("RANK", 0))
UNDER_TORCHRUN = "TORCHELASTIC_RUN_ID" in os.environ


def send(name: str, to_self: bool = False) -> None:
    os.kill(os.getpid() if to_self or not UNDER_TORCHRUN else os.getppid(), signal.Signals[name])


def until_handled(seconds: float = 60) -> None:
    """Wait until this process's stop handler has run (the signal is delivered to a thread of its own,
    and through torchrun's agent it comes later still)."""
    end = time.monotonic() + seconds
    while not (preemption._active and preemption._active[-1].requested) and time.monotonic() < end:
        time.sleep(0.005)


def long_phase(seconds: float = 5) -> None:
    """A phase that takes a while and, like sampling, returns to Python often: a stop signal's handler
    runs there (in the main thread, which the signal itself is not delivered to)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.01)


def descendants(pid: int) -> list[int]:
    """The processes that ``pid`` (any of its threads) started, and theirs."""
    found = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(c) for c in children.read_text().split()]
        except OSError:  # the thread has ended
            continue
    return found + [d for c in found for d in descendants(c)]


def running_compiler() -> int | None:
    """The pid of a C++ compiler (``cc1plus``, under g++) that this process runs on a kernel's source, if
    one runs (inductor's kernels are ``*.main.cpp``; the compilations that probe the CPU's vector
    instructions come first)."""
    for pid in descendants(os.getpid()):
        try:
            proc = Path(f"/proc/{pid}")
            if (proc / "comm").read_text().strip() == "cc1plus" and b".main.cpp" in (proc / "cmdline").read_bytes():
                return pid
        except OSError:
            continue
    return None


def signal_during_compile(name: str) -> None:
    if not UNDER_TORCHRUN:
        raise RuntimeError("run it under torchrun, whose agent signals the worker's process group")

    def watch() -> None:
        while (pid := running_compiler()) is None:
            time.sleep(0.005)
        send(name)  # to torchrun's agent, which passes it on with os.killpg
        print(f"fault_worker: {name} sent to the process group while cc1plus (pid {pid}) compiled", flush=True)

    threading.Thread(target=watch, daemon=True).start()


def signal_at(at: str, step: int, name: str) -> None:
    if RANK != 0:
        return
    if at == "compile":
        signal_during_compile(name)
    elif at == "step":
        real_prepare = loop.prepare_micro_batch

        def prepare(cfg, data, current, j, *args, **kwargs):
            if current + 1 == step and j == 0:
                send(name)
                until_handled()  # so it arrives in this step, before the all-reduce that carries it
            return real_prepare(cfg, data, current, j, *args, **kwargs)

        loop.prepare_micro_batch = prepare
    elif at == "sample":
        real_grid = trainer.write_sample_grid

        def grid(cfg, ema_net, path, progress=False):
            if path.name == f"step-{step:07d}.png":
                send(name)
                long_phase()  # a long sampling: the signal arrives meanwhile and cuts it short
            return real_grid(cfg, ema_net, path, progress)

        trainer.write_sample_grid = grid
    elif at == "checkpoint":
        real_save = loop.save_training_state

        def save(run_dir, current, *args, **kwargs):
            if current == step:
                send(name)
                time.sleep(1)  # the signal arrives while the state is being written
                threading.Timer(0.01, send, (name, True)).start()  # and a second one during the writes
            return real_save(run_dir, current, *args, **kwargs)

        loop.save_training_state = save
    elif at == "quality":
        real_generate = generate_module.generate

        def generate(*args, **kwargs):
            send(name)
            long_phase()
            return real_generate(*args, **kwargs)

        generate_module.generate = generate
    elif at == "final":
        real_final = finetune.write_sample_grid

        def final(*args, **kwargs):
            send(name)
            long_phase()
            return real_final(*args, **kwargs)

        finetune.write_sample_grid = final


def stall(rank: int, step: int, seconds: float) -> None:
    if RANK != rank:
        return
    real_loss, calls = objective.edm_loss, [0]

    def loss(*args, **kwargs):
        calls[0] += 1  # one micro-batch per step and process in these tests: call k is step k
        if calls[0] == step:
            time.sleep(seconds)
        return real_loss(*args, **kwargs)

    objective.edm_loss = loss


def kill(rank: int, step: int) -> None:
    if RANK != rank or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0:
        return
    real_update = EMA.update

    def update(self, model, current: int) -> None:
        if current + 1 == step:
            os.kill(os.getpid(), signal.SIGKILL)
        real_update(self, model, current)

    EMA.update = update


def kill_node(node: str, step: int) -> None:
    if os.environ.get("FAULT_NODE") != node or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0:
        return
    real_update = EMA.update

    def update(self, model, current: int) -> None:
        if current + 1 == step:
            os.kill(os.getppid(), signal.SIGKILL)  # the agent: no restart, no goodbye to the rendezvous
            os.kill(os.getpid(), signal.SIGKILL)
        real_update(self, model, current)

    EMA.update = update


def main(faults_file: str) -> int:
    faults = json.loads(open(faults_file).read())
    if "signal" in faults:
        signal_at(faults["signal"]["at"], faults["signal"].get("step", 0), faults["signal"]["name"])
    if "stall" in faults:
        stall(**faults["stall"])
    if "kill" in faults:
        kill(**faults["kill"])
    if "kill_node" in faults:
        kill_node(**faults["kill_node"])
    status = (dydit_main if faults.get("command") == "dydit" else train_main)(faults["argv"])
    print(f"fault_worker: rank {RANK} exits with status {status}", flush=True)  # torchrun, signalled, does not say
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
