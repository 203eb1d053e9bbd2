"""Tiny latent folders written straight through the format's writer (no VAE needed), tiny image folders."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from maskdit_fast.data.latents import RecordLayout, write_meta, write_shard


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


def make_image_folder(root, classes=("n01", "n02", "n03"), per_class=4, seed=0):
    """``root/CLASS/imgI.png``: random RGB images of random sizes between 32 and 90 pixels."""
    rng = np.random.default_rng(seed)
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            w, h = rng.integers(32, 90, 2)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / cls / f"img{i}.png")
    return root
