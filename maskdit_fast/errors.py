"""User errors: bad input found at any time (parsing, start-up, resume, data), reported as one
message that names the problem and what to do, exit status 2, no traceback; printed once under
torchrun. Unexpected errors keep their traceback.

Raise :class:`UserError` (or a subclass: ``ConfigError``, ``LatentFormatError`` ...) with such a
message; command lines built on :class:`ArgumentParser` run their work inside
``with parser.user_errors():``.
"""
from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn


class UserError(ValueError):
    """Bad input; the message says what to do. ``local``: found by this rank alone (e.g. in the data
    it reads), so this rank prints it; other errors every rank finds, and rank 0 prints them."""

    local: bool = False


class NonFiniteLoss(UserError, FloatingPointError):
    """A NaN/inf loss that stops a run; the message names the step, the saved batch and what to try."""


# Also bad input when they reach a command line: a run folder in use or a missing file.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileExistsError, FileNotFoundError, NotADirectoryError)


def _rank() -> int:
    return int(os.environ.get("RANK", 0))


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors (exit status 2) are printed by rank 0 only under torchrun, unless local."""

    def error(self, message: str) -> NoReturn:
        """A command-line error: usage, then the message."""
        if _rank() == 0:
            super().error(message)
        _quiet_exit()

    def fail(self, message: str, local: bool = False) -> NoReturn:
        """A run-time user error: the message alone (the usage is no help there)."""
        if local or _rank() == 0:
            self.exit(2, f"{self.prog}: error: {message}\n")
        _quiet_exit()

    @contextmanager
    def user_errors(self) -> Iterator[None]:
        """Report a user error raised inside as ``prog: error: message`` with exit status 2."""
        try:
            yield
        except USER_ERRORS as err:
            self.fail(str(err), local=getattr(err, "local", False))


def _quiet_exit() -> NoReturn:
    """Another rank than 0: exit 2 without a word, after a moment in which rank 0 prints the same
    error (torchrun stops the other processes as soon as one fails)."""
    time.sleep(1.0)
    raise SystemExit(2)

