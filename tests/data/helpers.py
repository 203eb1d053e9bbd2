"""Tiny latent folders written straight through the format's writer (no VAE needed), tiny image folders."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from maskdit_fast.data.latents import BLOCK, RecordLayout, _tar_header, index_line, record_key, write_meta, write_shard

CORRUPTIONS = ("truncated", "label", "size", "nonfinite")


def make_latent_folder(path: Path, counts=(7, 5, 6), shape=(4, 8, 8), num_classes=3, dtype="float16", seed=0):
    """Shards of ``counts`` records of random posteriors; returns (meta, posterior (N, 2, C, H, W), labels (N,))."""
    rng = np.random.default_rng(seed)
    layout = RecordLayout(tuple(shape), dtype)
    path.mkdir(parents=True, exist_ok=True)
    summaries, posts, labels = [], [], []
    for s, n in enumerate(counts):
        mean = rng.standard_normal((n, 1, *shape)) * 3
        logvar = rng.uniform(-4, 0, (n, 1, *shape))
        post = np.concatenate([mean, logvar], axis=1).astype(dtype)
        lab = rng.integers(0, num_classes, n).astype(np.int32)
        summaries.append(write_shard(path, s, layout, post, lab, extra={"images": n}))
        posts.append(post)
        labels.append(lab)
    (path / "classes.txt").write_text("".join(f"c{i}\n" for i in range(num_classes)))
    meta = write_meta(path, layout, summaries, latent_scale=0.18215, vae=None, resolution=8 * shape[1],
                      flip_copies=False, num_classes=num_classes, seed=seed, classes="classes.txt", unreadable=0)
    return meta, np.concatenate(posts), np.concatenate(labels).astype(np.int64)


def corrupt(path: Path, kind: str, shard: int = 1, record: int = 4) -> str:
    """Damage record ``record`` of shard ``shard`` of a latent folder (one of CORRUPTIONS): ``truncated``
    (the tar cut inside the record), ``label`` (a label outside the classes), ``size`` (its latent member
    declared 2 bytes shorter, in its tar header and in the DALI index, as a writer of another record size
    would) or ``nonfinite`` (a NaN in its mean; the file sizes stay right but for ``truncated``).
    Returns a regex the error must match: the shard's file and the record."""
    meta = json.loads((path / "meta.json").read_text())
    layout = RecordLayout(tuple(meta["shape"]), meta["dtype"])
    tar, idx = path / meta["shards"][shard]["file"], path / meta["shards"][shard]["index"]
    data = bytearray(tar.read_bytes())
    at = record * layout.record_bytes
    if kind == "truncated":
        del data[at + 100:]
    elif kind == "label":
        data[at + layout.label_offset:at + layout.label_offset + 4] = np.array([meta["num_classes"] + 4], "<i4").tobytes()
    elif kind == "size":
        data[at:at + BLOCK] = _tar_header(f"{record_key(shard, record)}.lat", layout.latent_bytes - 2)
        lines = idx.read_text().splitlines()
        fields = index_line(shard, record, layout).split()
        fields[2] = str(layout.latent_bytes - 2)
        lines[record + 1] = " ".join(fields)
        idx.write_text("\n".join(lines) + "\n")
    elif kind == "nonfinite":
        data[at + layout.latent_offset:at + layout.latent_offset + 2] = np.array([np.nan], "<f2").tobytes()
    else:
        raise ValueError(kind)
    tar.write_bytes(bytes(data))
    return rf"shard-{shard:05d}\.(tar|idx): .*record {record}\b"


def read_steps(cfg, steps: int) -> None:
    """Build ``cfg``'s loader on one CPU process (one micro-batch of ``train.global_batch`` per step)
    and read ``steps`` steps: the checks at start, then those of every record read."""
    from maskdit_fast.data.loader import build_loader

    data = build_loader(cfg, torch.device("cpu"), 0, 1, cfg.train.global_batch, 1)
    data.start(0, steps)
    try:
        for step in range(steps):
            list(data.step(step))
    finally:
        data.close()


def make_image_folder(root, classes=("n01", "n02", "n03"), per_class=4, seed=0):
    """``root/CLASS/imgI.png``: random RGB images of random sizes between 32 and 90 pixels."""
    rng = np.random.default_rng(seed)
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            w, h = rng.integers(32, 90, 2)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / cls / f"img{i}.png")
    return root
