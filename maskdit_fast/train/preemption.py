"""Preemption and restarts: a stop signal saves one training state and exits; a run restarted by
torchrun resumes by itself (docs/fault-tolerance.md).

A signal of ``train.preempt_signals`` (SIGTERM, SIGUSR1 by default: what Slurm sends, with
``--signal=USR1@120``, before it ends a job) only sets a flag. The training loop reduces the flag
with the loss all-reduce that every step already does, so all ranks agree on it at the same step;
each finishes that optimizer step, the training state of the step is written (atomically), and
:class:`Preempted` ends the run; the command lines exit with :data:`PREEMPTED_EXIT`. A long phase
that runs outside the steps (the sample grid, the final quality check, DyDiT's final samples)
runs inside :meth:`StopSignals.interruptible`: there the signal also raises, so the phase is cut
short instead of delaying the save past the grace period. Further signals during the save only set
the flag again.

torchrun signals a worker's whole process group (``os.killpg``), Slurm every process of a job step,
so the processes the worker starts get the signal too, and those that do not handle it die of it: the
C++ compiler that ``torch.compile`` runs (the first step then failed with a compile error instead of
saving; tests/train/test_preemption.py), and likewise Triton's ptxas and inductor's compile workers.
A child inherits the signal mask of the thread that starts it; so while the handlers are installed the
stop signals are blocked in the main thread (and in every thread started from it), and one thread,
started before, keeps them unblocked: the kernel delivers the signal to it, and Python runs the handler
in the main thread as always. The children never see it (it stays pending, blocked, until they exit).
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist

from ..storage import latest_training_state

log = logging.getLogger(__name__)

PREEMPTED_EXIT = 75  # EX_TEMPFAIL (sysexits.h): stopped by a signal, the state is saved; run again with --resume
DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1")


class Preempted(BaseException):
    """A stop signal ended the run (not an error: a BaseException, so that no ``except Exception`` on
    the way swallows it). ``step``: the step whose training state is saved (None when none was
    written, e.g. when the signal cut the final quality check short)."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


def signal_numbers(names: list[str] | tuple[str, ...]) -> list[signal.Signals]:
    """``["SIGTERM", "USR1"]`` -> signals; a ValueError naming a name that is not a catchable signal."""
    found = []
    for name in names:
        full = name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}"
        sig = getattr(signal.Signals, full, None)
        if sig is None or sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ValueError(f"{name!r} is not a signal a process can catch (e.g. SIGTERM, SIGUSR1, SIGINT)")
        found.append(sig)
    return found


class StopSignals:
    """Handlers that turn the signals ``names`` into a stop request (installed only in the main thread;
    elsewhere nothing is installed and no stop is ever requested)."""

    def __init__(self, names: list[str] | tuple[str, ...]):
        self.signals = signal_numbers(names)
        self.received: signal.Signals | None = None  # the first stop signal
        self._raising = False
        self._previous: dict[signal.Signals, object] = {}
        self._receiver: threading.Thread | None = None  # the one thread the stop signals are delivered to
        self._release = threading.Event()
        self._mask: set[signal.Signals] = set()  # the main thread's signal mask before install()

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)
            log.warning("%s received: the run stops after the current step, once its training state is saved",
                        self.received.name)
        if self._raising:
            self._raising = False  # raise once; a second signal while the phase unwinds only sets the flag
            raise Preempted(f"{signal.Signals(signum).name} received")

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        if self.signals:  # see the module's docstring: children started from now on do not get them
            self._receiver = threading.Thread(target=self._receive, name="stop-signals", daemon=True)
            self._receiver.start()
            self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, self.signals)

    def _receive(self) -> None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.signals)  # also if this process started with them blocked
        self._release.wait()

    def restore(self) -> None:
        if self._receiver is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
            self._release.set()
            self._receiver.join()
            self._receiver = None
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """A phase a stop signal cuts short: :class:`Preempted` is raised inside it when the signal
        arrives, or at once when one has arrived already."""
        if self.requested:
            raise Preempted(f"{self.received.name} received")
        self._raising = True
        try:
            yield
        finally:
            self._raising = False

    def cut_short(self, phase) -> bool:
        """Run ``phase()`` inside :meth:`interruptible`; True if a stop signal cut it short (or it did not start)."""
        try:
            with self.interruptible():
                phase()
        except Preempted:
            return True
        return False


_active: list[StopSignals] = []


@contextmanager
def stop_signals(names: list[str] | tuple[str, ...]) -> Iterator[StopSignals]:
    """The process's stop handlers for the block: installed here, or the ones an enclosing block
    installed (a command line installs them around training and its final quality check)."""
    if _active:
        yield _active[-1]
        return
    handlers = StopSignals(names)
    handlers.install()
    _active.append(handlers)
    try:
        yield handlers
    finally:
        _active.pop()
        handlers.restore()


def restart_count() -> int:
    """How often torchrun has restarted this worker group (``TORCHELASTIC_RESTART_COUNT``; 0 otherwise)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0) or 0)


def resume_after_restart(out_dir: Path, resume: bool) -> bool:
    """Collective under torchrun: whether to resume ``out_dir``. True with ``resume``; also when torchrun
    restarted the workers (``--max-restarts``) and the run folder holds a training state, so that a
    restarted group continues from its newest state without a person passing ``--resume``."""
    if resume or restart_count() == 0:
        return resume
    found = [latest_training_state(out_dir) is not None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(found, src=0)  # rank 0's view of the shared folder decides for all
    if found[0]:
        log.warning("restarted by torchrun (restart %d): resuming from the newest training state in %s",
                    restart_count(), out_dir)
    return found[0]
