"""Errors that mean bad input (a run directory in use, a missing file, a broken latent folder): the
command lines print their message, which says what to do, and exit with status 2, no traceback."""
from __future__ import annotations

from .data.latents import LatentFormatError

USER_ERRORS = (FileExistsError, FileNotFoundError, LatentFormatError)
