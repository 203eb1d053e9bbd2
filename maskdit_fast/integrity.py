"""Checksums that loading verifies, so that a damaged file is named instead of loaded.

- A folder (a training state ``checkpoints/step-*``) carries ``manifest.json``: the size and sha256
  of every other file in it, written last, atomically, before the folder is committed. The digests
  of files written through a :class:`DigestingStream` are computed while they are written (in
  parallel with the write), so the manifest costs no second pass over a large state.
- A safetensors file carries, in its metadata, the sha256 of its tensors (names, dtypes, shapes,
  bytes) and of its other metadata entries (the model config among them).

Files written before checksums existed have none: they load as before.
"""
from __future__ import annotations

import hashlib
import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from .files import atomic_write

MANIFEST = "manifest.json"
DIGEST_KEY = "sha256"  # safetensors metadata entry
CHUNK = 1 << 24
OVERLAP = 1 << 20  # writes from this size on are hashed while the OS takes them; smaller ones in turn


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def tensors_sha256(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """sha256 of named tensors (each: name, dtype, shape, bytes; sorted by name) and of string
    metadata (sorted; the ``sha256`` entry itself left out)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    for key in sorted(k for k in metadata if k != DIGEST_KEY):
        h.update(f"{key}={metadata[key]}|".encode())
    return h.hexdigest()


class DigestingStream:
    """A binary file open for writing that computes the sha256 of what is written to it, as
    :func:`file_sha256` of the finished file would: a large write is hashed in this thread while
    another hands it to the OS (both release the GIL). ``digest()`` is None when the bytes may not be
    the file's in order (a seek, a truncate, a short write)."""

    def __init__(self, stream: io.BufferedIOBase):
        self.stream, self.bytes, self.in_order = stream, 0, True
        self._sha = hashlib.sha256()
        self._writer: ThreadPoolExecutor | None = None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if len(view) >= OVERLAP:
            self._writer = self._writer or ThreadPoolExecutor(1, thread_name_prefix="digesting-write")
            pending = self._writer.submit(self.stream.write, view)
            self._sha.update(view)
            written = pending.result()
        else:
            written = self.stream.write(view)
            self._sha.update(view)
        if written is not None and written != len(view):
            self.in_order = False
        self.bytes += len(view)
        return len(view) if written is None else written

    def seek(self, *args: Any) -> int:
        self.in_order = False
        return self.stream.seek(*args)

    def truncate(self, *args: Any) -> int:
        self.in_order = False
        return self.stream.truncate(*args)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def digest(self) -> tuple[int, str] | None:
        """(bytes, sha256 hex) of what was written, or None if that may not be the file."""
        return (self.bytes, self._sha.hexdigest()) if self.in_order else None

    def close(self) -> None:
        if self._writer is not None:
            self._writer.shutdown()
        self.stream.close()

    def __getattr__(self, name: str) -> Any:  # tell, flush, fileno ...
        return getattr(self.stream, name)


def write_manifest(folder: Path, known: dict[str, tuple[int, str]] | None = None) -> None:
    """Record the size and sha256 of every file in ``folder`` (no subfolders) in its manifest.
    ``known``: (bytes, sha256) of files computed as they were written (:class:`DigestingStream`),
    used when the file still has that size; the other files are read and hashed."""
    known = known or {}

    def entry(p: Path) -> dict[str, Any]:
        size = p.stat().st_size
        streamed = known.get(p.name)
        return {"bytes": size, "sha256": streamed[1] if streamed and streamed[0] == size else file_sha256(p)}

    files = {p.name: entry(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    atomic_write(folder / MANIFEST, lambda tmp: tmp.write_text(json.dumps({"files": files}, indent=1)))


def folder_damage(folder: Path) -> str | None:
    """What is wrong with ``folder`` against its manifest (a missing, truncated or changed file),
    or None if it matches, or has no manifest (written before checksums existed)."""
    manifest = folder / MANIFEST
    if not manifest.exists():
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} is damaged"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, {expected['bytes']} were written"
        if file_sha256(path) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None
