"""A stalled rank: a run of several processes fails, naming the rank and the step, when one of them
stops answering, instead of every other rank waiting in a collective forever (docs/fault-tolerance.md).

The training loop marks its progress (:meth:`Watchdog.mark`: the step and the phase it enters, a
plain assignment, no I/O and no collective). A thread of each rank checks the mark; when it has not
moved for ``train.collective_timeout_s``, the rank is stuck: it posts its mark to the process
group's store, waits a moment for every other rank's, and the lowest rank that is not behind prints
one message naming the ranks that are behind (or did not answer at all) and the step. Every rank
then exits with :data:`STALLED_EXIT` (torchrun stops the group, or restarts it with
``--max-restarts``; a restarted group resumes from its newest training state). The process group's
own timeout (:func:`maskdit_fast.dist.init_distributed`) is a little longer: a backstop, for waits
outside the loop.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import torch.distributed as dist

from ..dist import Dist

STALLED_EXIT = 124  # as timeout(1): a rank stopped answering for train.collective_timeout_s
# where a rank that waits for the others is: collectives, DDP's buffer broadcast, the backward pass's all-reduce
WAITING_IN = ("/torch/distributed/", "/torch/nn/parallel/", "/torch/autograd/")


def _main_thread_location() -> tuple[str, bool]:
    """Where the main thread's Python code is (innermost frame), and whether that is inside torch's
    communication (waiting for the other ranks), for the report."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    if frame is None:
        return "unknown", False
    code = frame.f_code
    path = Path(code.co_filename).as_posix()
    return f"{Path(path).name}:{frame.f_lineno} in {code.co_name}", any(part in path for part in WAITING_IN)


class Watchdog:
    """Stops the run when this rank makes no progress for ``timeout_s`` (only with several processes)."""

    def __init__(self, env: Dist, timeout_s: float):
        self.env, self.timeout_s = env, timeout_s
        self.active = env.world_size > 1 and dist.is_initialized()
        self._seq = 0
        self._mark = (0, 0, "starting", time.monotonic())  # step, sequence number, phase, since
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="maskdit-watchdog", daemon=True)

    def __enter__(self) -> "Watchdog":
        if self.active:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def mark(self, step: int, phase: str) -> None:
        """The main thread enters ``phase`` of ``step`` (every rank makes the same marks in the same order)."""
        self._seq += 1
        self._mark = (step, self._seq, phase, time.monotonic())

    def _watch(self) -> None:
        poll = min(1.0, self.timeout_s / 10)
        while not self._stop.wait(poll):
            if time.monotonic() - self._mark[3] >= self.timeout_s:
                self._report_and_exit()

    def _report_and_exit(self) -> None:
        step, seq, phase, since = self._mark
        rank, world = self.env.rank, self.env.world_size
        store = dist.PrefixStore("maskdit/stalled/", dist.distributed_c10d._get_default_store())
        where, waiting = _main_thread_location()
        mine = {"step": step, "seq": seq, "phase": phase, "idle_s": time.monotonic() - since, "where": where,
                "waiting": waiting}
        keys = [str(r) for r in range(world)]
        marks = {}
        try:
            store.set(str(rank), json.dumps(mine))
            deadline = time.monotonic() + min(10.0, max(2.0, self.timeout_s / 2))  # for the others' marks
            while time.monotonic() < deadline and not store.check(keys):
                time.sleep(0.1)
            marks = {int(k): json.loads(store.get(k)) for k in keys if store.check([k])}
        except Exception:  # the store is gone with its host: report what this rank knows
            marks = {rank: mine}
        message, culprits = describe_stall(marks, world, self.timeout_s)
        reporter = min((r for r in range(world) if r not in culprits), default=rank)
        if rank == reporter:
            sys.stderr.write(f"error: {message}\n")
            sys.stderr.flush()
        else:
            time.sleep(1.0)  # the reporting rank prints before torchrun stops the group
        os._exit(STALLED_EXIT)


def describe_stall(marks: dict[int, dict], world_size: int, timeout_s: float) -> tuple[str, list[int]]:
    """The message for a stall from each answering rank's mark (``step``, ``seq``, ``phase``,
    ``idle_s``, ``where``, ``waiting``), and the ranks to blame: those that did not answer, those behind
    the rest, or else, of ranks at the same point, those not waiting in torch's communication while
    another one is."""
    missing = [r for r in range(world_size) if r not in marks]
    top = max(m["seq"] for m in marks.values())
    behind = sorted(r for r, m in marks.items() if m["seq"] < top)
    if not behind and any(m.get("waiting") for m in marks.values()):
        behind = sorted(r for r, m in marks.items() if not m.get("waiting"))
    waiters = [m for r, m in marks.items() if r not in behind]
    ahead = next((m for m in waiters if m.get("waiting")), waiters[0] if waiters else marks[min(marks)])
    parts = [f"rank {r} stopped answering in step {marks[r]['step']} ({marks[r]['phase']}, no progress for "
             f"{marks[r]['idle_s']:.0f} s, at {marks[r]['where']})" for r in behind]
    parts += [f"rank {r} did not answer at all (its process is frozen or gone)" for r in missing]
    culprits = sorted(behind + missing)
    waited = (f"the other ranks waited for it in step {ahead['step']} ({ahead['phase']}) longer than "
              f"train.collective_timeout_s={timeout_s:g} s")
    if not culprits:
        parts = [f"every rank waited longer than train.collective_timeout_s={timeout_s:g} s in step {ahead['step']} "
                 f"({ahead['phase']}): a collective inside it did not complete ("
                 + "; ".join(f"rank {r} at {m['where']}" for r, m in sorted(marks.items())) + ")"]
        waited = ""
    text = "; ".join(parts) + (f"; {waited}" if waited else "")
    return (f"{text}: the run stops (exit status {STALLED_EXIT}); continue it with --resume once the node is "
            "healthy (raise train.collective_timeout_s if a phase legitimately takes longer)"), culprits
