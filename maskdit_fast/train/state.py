"""Full training state on disk, written atomically, for exact resume.

Layout of a run directory: ``checkpoints/step-XXXXXXX.pt`` (model, EMA, optimizer, grad scaler,
RNG states, step, config) and ``checkpoints/latest`` naming the newest one.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(run_dir: Path, step: int, state: dict[str, Any]) -> Path:
    """Write ``state`` for ``step`` atomically and point ``checkpoints/latest`` at it."""
    ckpt_dir = run_dir / "checkpoints"
    path = ckpt_dir / f"step-{step:07d}.pt"
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    atomic_write(ckpt_dir / "latest", lambda tmp: tmp.write_text(path.name + "\n"))
    return path


def latest_training_state(run_dir: Path) -> Path | None:
    """The newest complete training state of a run, or None."""
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if path.is_file() else None


def load_training_state(path: Path) -> dict[str, Any]:
    """Read a state written by :func:`save_training_state` (plain tensors and containers only)."""
    return torch.load(path, map_location="cpu", weights_only=True)
