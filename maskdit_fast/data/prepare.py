"""Encode an ImageNet-style image folder into VAE latent shards (format: ``data/latents.py``).

    python -m maskdit_fast.data.prepare IMAGEDIR OUTDIR --resolution 256 \\
        [--vae stabilityai/sd-vae-ft-ema | stabilityai/sd-vae-ft-mse | LOCAL_FOLDER] [--flip] \\
        [--shard-size 4096] [--batch 64] [--decoder auto|pil|dali] [--strict]

    torchrun --nproc-per-node 8 -m maskdit_fast.data.prepare IMAGEDIR OUTDIR ...   # one GPU per rank

Steps: list ``IMAGEDIR/CLASS/*`` (sorted classes -> labels 0..K-1, written to classes.txt) ->
shuffle the images with ``--seed`` -> cut into shards of ``--shard-size`` images -> for each shard:
decode (DALI's GPU ``mixed`` decoder when DALI and a GPU are there, else PIL), ADM centre crop,
optional flipped copy, ``AutoencoderKL.encode`` -> posterior mean and log-variance -> one shard.

Resumable: a shard's files appear (atomically) only once it is complete and finished shards are
skipped, so a killed run is continued by running the same command again. Under torchrun rank r
encodes shards r, r + W, r + 2W, ...; rank 0 writes meta.json once all shards exist. Images that
cannot be decoded are skipped and listed in OUTDIR/unreadable.txt (``--strict``: stop instead).
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .images import UnreadableImage, choose_decoder, list_image_folder
from .latents import DTYPES, RecordLayout, shard_done, shard_name, write_json, write_meta, write_shard
from .vae import encode_posterior, load_vae, vae_downsampling, vae_scale

log = logging.getLogger(__name__)
PLAN_KEYS = ("resolution", "vae", "flip_copies", "shard_size", "seed", "dtype", "images", "num_classes")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m maskdit_fast.data.prepare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("image_dir", help="ImageNet-style folder: IMAGE_DIR/CLASS/IMAGE")
    p.add_argument("out_dir", help="latent folder to write (or to complete)")
    p.add_argument("--resolution", type=int, default=256, help="image side after the ADM centre crop")
    p.add_argument("--vae", default="stabilityai/sd-vae-ft-ema",
                   help="diffusers AutoencoderKL: stabilityai/sd-vae-ft-ema, stabilityai/sd-vae-ft-mse or a local folder")
    p.add_argument("--flip", action="store_true", help="also store a horizontally flipped copy of every image")
    p.add_argument("--shard-size", type=int, default=4096, help="images per shard (x2 records with --flip)")
    p.add_argument("--batch", type=int, default=64, help="images per VAE forward pass")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="stored dtype of mean/logvar")
    p.add_argument("--seed", type=int, default=0, help="seed of the order in which the images are stored")
    p.add_argument("--decoder", choices=("auto", "pil", "dali"), default="auto",
                   help="auto: DALI's GPU decoder when DALI and a GPU are present, else PIL")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decoding threads (PIL)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image instead of skipping it")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for key in ("resolution", "shard_size", "batch", "workers"):
        if getattr(args, key) <= 0:
            p.error(f"--{key.replace('_', '-')} must be positive")
    if args.resolution % 8:
        p.error("--resolution must be a multiple of 8 (the VAE downsamples by 8)")
    return args


# ------------------------------------------------------------------ encoding

def encode(vae, images: torch.Tensor, batch: int) -> np.ndarray:
    """images (n, H, W, 3) uint8 -> posterior (n, 2, C, h, w) float32 (mean, logvar) on the CPU."""
    mean, logvar = encode_posterior(vae, images, batch)
    return torch.stack([mean, logvar], dim=1).cpu().numpy()


def encode_shard(shard: int, items: list[tuple[str, int]], args, vae, decoder, pool, layout: RecordLayout,
                 bar) -> dict:
    """Decode, crop and encode one shard's images batch by batch (only latents are kept in memory),
    then write the shard: the images as records 0..n-1, their flipped copies (``--flip``) as n..2n-1."""
    root = Path(args.image_dir)
    store = DTYPES[args.dtype]
    posteriors, flipped, labels, files, unreadable = [], [], [], [], []
    for start in range(0, len(items), args.batch):
        chunk = items[start:start + args.batch]
        decoded = decoder([root / rel for rel, _ in chunk], args.resolution, pool, args.strict)
        good = []
        for (rel, label), (arr, error) in zip(chunk, decoded):
            if arr is None:
                unreadable.append([rel, error])
                log.warning("unreadable image skipped: %s (%s)", rel, error)
            else:
                good.append(arr)
                labels.append(label)
                files.append(rel)
        if good:
            pixels = torch.from_numpy(np.stack(good))
            posteriors.append(encode(vae, pixels, args.batch).astype(store))
            if args.flip:
                flipped.append(encode(vae, pixels.flip(2), args.batch).astype(store))
        bar.update(len(chunk))
    n = len(labels)
    posterior = np.concatenate(posteriors + flipped) if n else np.zeros((0, 2, *layout.shape), store)
    if args.flip:
        labels = labels + labels
    return write_shard(Path(args.out_dir), shard, layout, posterior, np.array(labels, np.int32),
                       extra={"shard": shard, "images": n, "files": files, "unreadable": unreadable})


# ------------------------------------------------------------------ driver

def _dist_env() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _select_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def _check_plan(out_dir: Path, plan: dict) -> None:
    """The settings a folder was started with must not change when it is completed."""
    path = out_dir / "plan.json"
    if path.is_file():
        old = json.loads(path.read_text())
        changed = [k for k in PLAN_KEYS if old.get(k) != plan.get(k)]
        if changed:
            diff = ", ".join(f"{k}: {old.get(k)!r} -> {plan.get(k)!r}" for k in changed)
            raise SystemExit(f"{out_dir} was started with other settings ({diff}); use another OUTDIR or the same options")
    else:
        write_json(path, plan)


def prepare(args: argparse.Namespace) -> dict | None:
    """Run the preparation for this process; returns meta (rank 0) or None."""
    rank, world, local_rank = _dist_env()
    group = False
    if world > 1 and not torch.distributed.is_initialized():
        # the final barrier waits for the slowest rank's shards: hours when resuming unevenly
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(days=7))
        group = True
    try:
        return _prepare(args, rank, world, local_rank)
    finally:
        if group:
            torch.distributed.destroy_process_group()


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _prepare(args, rank: int, world: int, local_rank: int) -> dict | None:
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    classes, items = list_image_folder(args.image_dir)
    order = np.random.default_rng(args.seed).permutation(len(items))
    items = [items[i] for i in order]
    num_shards = -(-len(items) // args.shard_size)
    plan = {"resolution": args.resolution, "vae": args.vae, "flip_copies": args.flip, "shard_size": args.shard_size,
            "seed": args.seed, "dtype": args.dtype, "images": len(items), "num_classes": len(classes)}
    if rank == 0:
        _check_plan(out_dir, plan)
        (out_dir / ".classes.txt.tmp").write_text("".join(f"{c}\n" for c in classes))
        os.replace(out_dir / ".classes.txt.tmp", out_dir / "classes.txt")
    _barrier(world)
    if rank != 0:
        _check_plan(out_dir, plan)

    device = _select_device(args.device, local_rank)
    vae = load_vae(args.vae, device)
    side = args.resolution // vae_downsampling(vae)
    layout = RecordLayout((vae.config.latent_channels, side, side), args.dtype)
    scale = vae_scale(vae)
    mine = [s for s in range(rank, num_shards, world) if shard_done(out_dir, s, layout) is None]
    todo_images = sum(len(items[s * args.shard_size:(s + 1) * args.shard_size]) for s in mine)
    if rank == 0:
        log.info("%d images in %d classes -> %d shards of %d images; %d shards left for this rank",
                 len(items), len(classes), num_shards, args.shard_size, len(mine))
    try:
        decoder = choose_decoder(args.decoder, args.batch, device, args.workers)
    except RuntimeError as err:
        raise SystemExit(f"--decoder {args.decoder}: {err}") from None
    bar = tqdm(total=todo_images, unit="img", desc=f"prepare[{rank}]" if world > 1 else "prepare",
               disable=args.no_progress, dynamic_ncols=True)
    with ThreadPoolExecutor(args.workers) as pool:
        for s in mine:
            encode_shard(s, items[s * args.shard_size:(s + 1) * args.shard_size], args, vae, decoder, pool, layout, bar)
    bar.close()
    _barrier(world)
    if rank != 0:
        return None
    summaries = []
    for s in range(num_shards):
        summary = shard_done(out_dir, s, layout)
        if summary is None:
            raise SystemExit(f"{out_dir / shard_name(s)}.tar is missing: a process stopped early; run the command again")
        summaries.append(summary)
    unreadable = [(u[0], u[1]) for s in summaries for u in s["unreadable"]]
    (out_dir / "unreadable.txt").write_text("".join(f"{p}\t{e}\n" for p, e in sorted(unreadable)))
    meta = write_meta(out_dir, layout, summaries, latent_scale=scale, vae=args.vae, resolution=args.resolution,
                      flip_copies=args.flip, num_classes=len(classes), seed=args.seed, classes="classes.txt",
                      unreadable=len(unreadable))
    if unreadable:
        log.warning("%d unreadable image(s) skipped, listed in %s", len(unreadable), out_dir / "unreadable.txt")
    return meta


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        meta = prepare(args)
    except UnreadableImage as err:
        print(f"error: unreadable image (--strict): {err}", file=sys.stderr)
        return 1
    if meta is not None:
        print(f"{args.out_dir}: {meta['count']} latents {meta['shape']} {meta['dtype']} from {meta['images']} images "
              f"in {len(meta['shards'])} shards ({meta['unreadable']} unreadable) in {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
