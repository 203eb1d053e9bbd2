"""Writing files so that a crash never leaves a half-written one, and a full disk is said plainly
(the bottom layer: imports only :mod:`maskdit_fast.errors`)."""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

PARTIAL = ".partial"  # suffix of the temporaries of atomic writes (a new run removes those it finds)
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO}  # the storage's fault, not the program's


def disk_error(err: BaseException) -> OSError | None:
    """The OSError of a full disk, an exceeded quota or an I/O error in ``err`` or its causes
    (DCP wraps them), or None."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in DISK_ERRNOS:
            return err
        failures = getattr(err, "failures", None)  # torch.distributed.checkpoint's CheckpointException
        if isinstance(failures, dict):
            for failure in failures.values():
                found = disk_error(failure[0] if isinstance(failure, tuple) else failure)
                if found is not None:
                    return found
        err = err.__cause__ or err.__context__
    return None


def free_bytes(path: Path) -> int:
    """Free space of the filesystem holding ``path`` (or its nearest existing parent), in bytes."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def size_text(n: int) -> str:
    """``n`` bytes for a person: 512 B, 1.36 MiB, 12.05 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def disk_full(path: Path, err: OSError, needed: int | None) -> UserError:
    """The user error of a write to ``path`` that failed for lack of space (or an I/O error), naming
    the free space and, when known, the space the write needs (at least ``needed`` bytes: its tensors)."""
    need = f"; it needs at least {size_text(needed)}" if needed else ""
    return UserError(f"cannot write {path}: {os.strerror(err.errno)} ({size_text(free_bytes(path))} free there{need}); "
                     "the previous files are intact: free space (or fix the disk) and run again with --resume")


@contextmanager
def disk_errors(folder: Path) -> Iterator[None]:
    """Raise a full disk or an I/O error from inside (a write other than :func:`atomic_write`'s: a
    log line, an image) as :func:`disk_full`'s UserError, naming the file, else ``folder``. Local to
    the rank that met it."""
    try:
        yield
    except OSError as err:
        full = disk_error(err)
        if full is None:
            raise
        error = disk_full(Path(full.filename or folder), full, None)
        error.local = True
        raise error from None


def atomic_write(path: Path, write: Callable[[Path], object], needed: int | None = None) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: a crash never leaves a half-written file.
    A full disk or an I/O error removes the temporary and raises :func:`disk_full`'s UserError
    (``needed``: the bytes the file takes, for its message)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PARTIAL, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; the file is the user's like any other
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        full = disk_error(err)
        if full is not None:
            raise disk_full(path, full, needed) from None
        raise


def current_umask() -> int:
    """The process's umask (read by setting it, then restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
