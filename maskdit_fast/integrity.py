"""Checksums that loading verifies, so that a damaged file is named instead of loaded.

- A folder (a training state ``checkpoints/step-*``) carries ``manifest.json``: the size and sha256
  of every other file in it, written last, atomically, before the folder is committed.
- A safetensors file carries, in its metadata, the sha256 of its tensors (names, dtypes, shapes,
  bytes) and of its other metadata entries (the model config among them).

Files written before checksums existed have none: they load as before.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .files import atomic_write

MANIFEST = "manifest.json"
DIGEST_KEY = "sha256"  # safetensors metadata entry
CHUNK = 1 << 24


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


def write_manifest(folder: Path) -> None:
    """Record the size and sha256 of every file in ``folder`` (no subfolders) in its manifest."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
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
