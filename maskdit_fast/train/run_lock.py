"""One owner per run folder: ``RUN/.lock`` holds an exclusive ``flock`` of the run's rank 0 for as
long as the run lives, and says who that is (host, PID, start time).

The kernel drops the lock when its process dies, however it dies: a lock file that names a holder
but is not locked was left by a crashed or killed run, and the next run takes it over, saying so.
A live holder is named in the error. (On NFS, ``flock`` goes through the server's byte-range locks:
keep run folders on a filesystem that supports them.)
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

import torch.distributed as dist

from ..errors import UserError

log = logging.getLogger(__name__)
LOCK_NAME = ".lock"


class RunLock:
    """The lock of the run folder ``out_dir``, released on leaving the ``with`` block. A run calls
    :meth:`acquire` at its start (taken if the folder exists) and again once its inputs check out,
    with ``create=True`` (the folder is made then, not before: a rejected start leaves nothing)."""

    def __init__(self, out_dir: Path, is_main: bool):
        self.path = Path(out_dir) / LOCK_NAME
        self.is_main = is_main
        self.fd: int | None = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self, create: bool = False) -> bool:
        """Collective under torchrun: rank 0 takes the lock (once; ``create``: making the folder) and
        every rank raises the same UserError when it cannot. Returns whether rank 0 holds it."""
        problem = None
        if self.is_main and self.fd is None:
            if self.path.parent.exists() and not self.path.parent.is_dir():
                problem = f"--out {self.path.parent} is a file; name a folder"
            elif create or self.path.parent.is_dir():
                self.path.parent.mkdir(parents=True, exist_ok=True)
                problem = self._take()
        shared = [problem, self.fd is not None]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(shared, src=0)
        if shared[0] is not None:
            raise UserError(shared[0])
        return shared[1]

    def _take(self) -> str | None:
        """Rank 0: take the lock; the reason it cannot, or None."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.read(fd, 4096))
            os.close(fd)
            return (f"{self.path.parent} is in use by another live run ({holder}); wait for it to end or stop it, "
                    "or choose another --out")
        previous = os.read(fd, 4096)
        if previous.strip():
            log.warning("%s: taking over the lock of a run that ended without releasing it (%s): it crashed or "
                        "was killed", self.path.parent, _describe(previous))
        mine = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(mine).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return None

    def release(self) -> None:
        """Empty the lock file (a clean end) and drop the lock."""
        if self.fd is None:
            return
        os.ftruncate(self.fd, 0)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def _describe(raw: bytes) -> str:
    try:
        holder = json.loads(raw)
        return f"host {holder['host']}, PID {holder['pid']}, since {holder['since']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
