"""Data benchmarks: loader throughput, and training from images against pre-encoded latents.

    python -m benchmarks.data_loaders [DIR | --synthetic 20000] [--loader torch dali] [--batch 256]
        [--steps 50] [--warmup 5] [--workers 2] [--threads 4] [--device auto] [--json out.json]
    python -m benchmarks.data_loaders --sources [--vae tiny|sd|PATH] [--model tiny|S|B|L|XL]
        [--resolution 32] [--images 48] [--batch 8] [--steps 12] [--warmup 2] [--json out.json]
    (both: [--torch-threads N])

Loaders (the default): reads ``--steps`` batches of ``--batch`` latents (after ``--warmup``
batches) as one training process would, posterior sampling and the copy to the device included, and
prints samples/s per loader. ``--synthetic N`` first writes N random 4x32x32 fp16 records (the
ImageNet-256 shape) to a temporary folder. Compare with the training speed (``img_per_s`` in
metrics.jsonl divided by the number of processes): the loader must be well above it.

``--sources``: writes ``--images`` random JPEGs (sides 1 to 1.5 times ``--resolution``) in 4
classes, encodes them with ``prepare``, then trains the same model for ``--steps`` steps from the
latent shards and from the images (``data.source=images``), one after the other in this process,
and reports the median step time of each after ``--warmup`` steps. ``--vae tiny`` is a tiny random
AutoencoderKL (the tests'), ``sd`` one with Stable Diffusion's architecture and random weights (the
real encoder's cost, no download), else a hub id or local folder.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from maskdit_fast.config import DIT_SIZES
from maskdit_fast.data.latents import LatentShards, RecordLayout, write_meta, write_shard
from maskdit_fast.data.loader import LatentLoader
from maskdit_fast.data.sampler import EpochBatches
from maskdit_fast.data.vae import random_vae


def synthetic_folder(path: Path, count: int, shape=(4, 32, 32), shard_size: int = 4096, seed: int = 0) -> Path:
    """``count`` random fp16 posteriors of ``shape`` in shards of ``shard_size`` records under ``path``."""
    rng = np.random.default_rng(seed)
    layout = RecordLayout(tuple(shape))
    summaries = []
    for s, start in enumerate(range(0, count, shard_size)):
        n = min(shard_size, count - start)
        mean = rng.standard_normal((n, 1, *shape), dtype=np.float32)
        post = np.concatenate([mean, np.full_like(mean, -2.0)], axis=1)
        summaries.append(write_shard(path, s, layout, post, rng.integers(0, 1000, n).astype(np.int32)))
    write_meta(path, layout, summaries, latent_scale=0.18215, vae=None, resolution=8 * shape[1],
               flip_copies=False, num_classes=1000, seed=seed, classes="classes.txt", unreadable=0)
    return path


def machine(device: torch.device) -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import nvidia.dali
        info["dali"] = nvidia.dali.__version__
    except ImportError:
        info["dali"] = None
    return info


def measure(name: str, path: Path, batch: int, steps: int, warmup: int, workers: int, device: torch.device,
            threads: int) -> dict:
    """samples/s of loader ``name`` (torch | dali) reading ``path`` as one process with micro-batch ``batch``."""
    shards = LatentShards(path)
    if name == "torch":
        loader = LatentLoader(shards, EpochBatches(len(shards), batch, 0), 0, 0.18215, device, 0, 1, 1, workers)
    else:
        from maskdit_fast.data.dali import DaliLatentLoader
        loader = DaliLatentLoader(path, shards.meta, batch, 1, 0, 1, seed=0, flip=True, scale=0.18215, device=device,
                                  threads=threads)
    loader.start(0, warmup + steps)
    for step in range(warmup):
        for _ in loader.step(step):
            pass
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for step in range(warmup, warmup + steps):
        for _, _, x, _ in loader.step(step):
            pass
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    loader.close()
    return {"loader": name, "samples_per_s": batch * steps / seconds, "batch": batch, "steps": steps,
            "warmup": warmup, "workers" if name == "torch" else "threads": workers if name == "torch" else threads,
            "device": str(device), "shape": list(x.shape[1:])}


# ------------------------------------------------------------------ images vs latents

MODELS = {
    "tiny": ["model.size=null", "model.hidden_size=32", "model.depth=2", "model.num_heads=2",
             "model.decoder_hidden_size=24", "model.decoder_depth=1", "model.decoder_num_heads=2"],
    # explicit shapes: the preset's defaults already hold XL's width/depth/heads
    **{size: ["model.size=null", f"model.hidden_size={w}", f"model.depth={d}", f"model.num_heads={h}"]
       for size, (w, d, h) in DIT_SIZES.items()},
}


def image_folder(path: Path, count: int, resolution: int, classes: int = 4, seed: int = 0) -> Path:
    """``count`` random JPEGs (quality 90, sides 1 to 1.5 x ``resolution``) in ``classes`` class folders."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = path / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        w, h = (rng.uniform(1.0, 1.5, 2) * resolution).astype(int)
        smooth = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)  # photo-like: not white noise
        image = Image.fromarray(smooth).resize((w, h), Image.BILINEAR)
        image.save(folder / f"{i:05d}.jpg", quality=90)
    return path


def step_times(run: Path, warmup: int, global_batch: int) -> list[float]:
    """Seconds of each training step after ``warmup`` (metrics.jsonl written with log_every=1)."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [global_batch / r["img_per_s"] for r in lines[warmup:]]


def compare_sources(tmp: Path, vae: str, model: str, resolution: int, images: int, batch: int, steps: int,
                    warmup: int, workers: int, device: str) -> dict:
    """Median training-step time from pre-encoded latent shards and from images (same model, data, seed)."""
    from maskdit_fast.config import load_config
    from maskdit_fast.train.trainer import train
    from maskdit_fast.data.prepare import main as prepare

    if vae in ("tiny", "sd"):
        vae = str(random_vae(vae, tmp / f"vae-{vae}"))
    root = image_folder(tmp / "images", images, resolution)
    if prepare([str(root), str(tmp / "latents"), "--resolution", str(resolution), "--vae", vae, "--shard-size", "64",
                "--batch", str(batch), "--workers", str(max(workers, 1)), "--device", device, "--no-progress"]):
        raise RuntimeError("prepare failed")
    side = resolution // 8
    common = [*MODELS[model], "data.dataset=latents", f"data.vae={vae}", f"data.num_workers={workers}",
              "model.in_channels=4", f"model.input_size={side}", "model.patch_size=2", "model.num_classes=4",
              f"train.global_batch={batch}", f"train.max_steps={warmup + steps}", "train.log_every=1",
              "train.sample_every=1000000", "train.ckpt_every=1000000", "train.precision=fp32", f"train.device={device}",
              "train.unmasked_steps=0", "sample.num_steps=2", "sample.grid_per_class=1"]
    rows = []
    for source, path in (("shards", tmp / "latents"), ("images", root)):
        cfg = load_config("imagenet256-pretrain", [*common, f"data.source={source}", f"data.path={path}"])
        start = time.perf_counter()
        train(cfg, tmp / f"run-{source}", progress=False)
        seconds = step_times(tmp / f"run-{source}", warmup, batch)
        rows.append({"source": source, "step_ms": 1000 * statistics.median(seconds),
                     "step_ms_all": [1000 * s for s in seconds], "img_per_s": batch / statistics.median(seconds),
                     "run_s": time.perf_counter() - start})
    return {"vae": vae, "model": model, "resolution": resolution, "images": images, "batch": batch, "steps": steps,
            "warmup": warmup, "workers": workers, "rows": rows,
            "images_over_shards": rows[1]["step_ms"] / rows[0]["step_ms"]}


def run(p: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str] | None) -> dict:
    """The benchmark ``args`` ask for; returns the report."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    command = "python -m benchmarks.data_loaders " + " ".join(sys.argv[1:] if argv is None else argv)
    report = {"command": command, "machine": machine(device)}
    with tempfile.TemporaryDirectory() as tmp:
        if args.sources:
            if args.resolution % 8:
                p.error("--resolution must be a multiple of 8")
            batch, steps, warmup = args.batch or 8, args.steps or 12, 2 if args.warmup is None else args.warmup
            result = compare_sources(Path(tmp), args.vae, args.model, args.resolution, args.images, batch, steps,
                                     warmup, args.workers, device.type)
            for row in result["rows"]:
                print(f"{row['source']:6s} {row['step_ms']:10.1f} ms/step  {row['img_per_s']:8.2f} img/s")
            print(f"images / shards: {result['images_over_shards']:.2f}x the step time "
                  f"(model {args.model}, VAE {args.vae}, {args.resolution} px, batch {batch}, {device})")
            report["sources"] = result
        else:
            if args.path is None and not args.synthetic:
                p.error("give a latent folder or --synthetic N")
            path = Path(args.path) if args.path else synthetic_folder(Path(tmp), args.synthetic)
            batch, steps, warmup = args.batch or 256, args.steps or 50, 5 if args.warmup is None else args.warmup
            report["loaders"] = []
            for name in args.loader:
                if name == "dali":
                    from maskdit_fast.data.dali import dali_available
                    if not dali_available():
                        print("dali: not installed, skipped")
                        continue
                result = measure(name, path, batch, steps, warmup, args.workers, device, args.threads)
                print(f"{name:5s} {result['samples_per_s']:12.0f} samples/s  (batch {batch}, {device})")
                report["loaders"].append(result)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.data_loaders", description=__doc__.split("\n\n")[0])
    p.add_argument("path", nargs="?", help="latent folder (else --synthetic)")
    p.add_argument("--synthetic", type=int, default=0, help="write this many random records to a temporary folder")
    p.add_argument("--loader", nargs="+", choices=("torch", "dali"), default=["torch", "dali"])
    p.add_argument("--batch", type=int, default=None, help="samples per batch (default 256; --sources: 8)")
    p.add_argument("--steps", type=int, default=None, help="timed batches (default 50; --sources: 12)")
    p.add_argument("--warmup", type=int, default=None, help="batches before timing (default 5; --sources: 2)")
    p.add_argument("--workers", type=int, default=2, help="torch: DataLoader workers; --sources: also decode threads")
    p.add_argument("--threads", type=int, default=4, help="dali: pipeline threads")
    p.add_argument("--device", default="auto")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch.set_num_threads in this process (1 steadies CPU numbers on a loaded machine)")
    p.add_argument("--sources", action="store_true", help="time training steps from images against latent shards")
    p.add_argument("--vae", default="tiny", help="--sources: tiny | sd (random weights) | hub id | local folder")
    p.add_argument("--model", choices=sorted(MODELS), default="tiny", help="--sources: the model trained")
    p.add_argument("--resolution", type=int, default=32, help="--sources: image side after the centre crop")
    p.add_argument("--images", type=int, default=48, help="--sources: images in the synthetic folder")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    try:
        report = run(p, args, argv)
    finally:
        torch.set_num_threads(threads)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
