"""Command-line entry points behind ``train.py`` / ``sample.py`` (also the console scripts
``maskdit-train`` and ``maskdit-sample``)."""
from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import torch

from .config import SOLVERS, load_config
from .errors import ArgumentParser
from .files import disk_errors


def train_main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        description="Train MaskDiT / DiT with EDM. With no arguments: MaskDiT on the bundled MNIST.",
        epilog="Overrides are key=value pairs, anywhere on the line, e.g. model.mask_ratio=0.25 train.max_steps=500")
    parser.add_argument("--config", default="mnist", help="preset name in configs/ or a YAML path (default: mnist)")
    parser.add_argument("--out", default=None, help="run directory (default: runs/<config name>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    parser.add_argument("--init-from", default=None, metavar="CKPT",
                        help="start from a pretrained checkpoint's weights (the unmasked fine-tune)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--eval-samples", type=int, default=250, metavar="N",
                        help="MNIST runs: after training, sample N digits and report the classifier's accuracy "
                             "and Fréchet distance (0 = skip; default 250: accuracy to about +-1.5 points)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_intermixed_args(argv)  # overrides before and after the options
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.resume and args.init_from:
        parser.error("--resume and --init-from exclude each other")
    if args.init_from and not Path(args.init_from).exists():
        parser.error(f"--init-from {args.init_from}: no such checkpoint")
    out = Path(args.out or Path("runs") / Path(args.config).stem)
    # bad input found at any time, and a full disk outside the atomic writes (a log line, a grid), said plainly
    with parser.user_errors(), disk_errors(out):
        return _train(args, out)


def _train(args: argparse.Namespace, out: Path) -> int:
    from .train.preemption import PREEMPTED_EXIT, Preempted, stop_signals
    from .train.trainer import train

    cfg = load_config(args.config, args.overrides)
    with stop_signals(cfg.train.preempt_signals) as stop:  # also around the quality check: the signal cuts it short
        try:
            final = train(cfg, out, resume=args.resume, init_from=args.init_from, progress=not args.no_progress)
        except Preempted:
            return PREEMPTED_EXIT  # the loop said so on rank 0: the step and its saved state
        if int(os.environ.get("RANK", 0)) != 0:  # under torchrun rank 0 reports
            return 0
        print(f"EMA weights: {final}\nsamples: {out / 'samples'}\nmetrics: {out / 'metrics.jsonl'}")
        if cfg.data.dataset == "mnist" and cfg.model.num_classes == 10 and args.eval_samples > 0:
            print(f"quality check: sampling {args.eval_samples} digits (--eval-samples 0 skips it)", flush=True)
            report = {}
            if stop.cut_short(lambda: report.update(mnist_quality(final, cfg, args.eval_samples))):
                print(f"preempted ({stop.received.name}) during the quality check, after training ended at step "
                      f"{cfg.train.max_steps}: its training state is saved; --resume runs the check again "
                      f"(exit status {PREEMPTED_EXIT})", flush=True)
                return PREEMPTED_EXIT
            (out / "mnist_quality.json").write_text(json.dumps(report, indent=2))
            print(f"MNIST quality of {report['n']} EMA samples (guidance {report['cfg_scale']}, "
                  f"{report['num_steps']} {report['solver']} steps): classifier accuracy {report['accuracy']:.1%}, "
                  f"classifier-feature Fréchet distance {report['frechet']:.1f} (real held-out digits: about 12)")
    return 0


def mnist_quality(ckpt: Path, cfg, n: int) -> dict:
    """Sample ``n`` class-balanced digits from ``ckpt`` with the run's sampler settings and score them
    with the package's MNIST classifier (accuracy = share classified as the class asked for)."""
    from .checkpoint import load_checkpoint
    from .eval import get_mnist_classifier, mnist_metrics
    from .generate import generate, seed_labels

    device = "cuda" if torch.cuda.is_available() else "cpu"
    net = load_checkpoint(ckpt, device)
    seeds = list(range(1_000_000, 1_000_000 + n))  # disjoint from the seeds of the training grids
    labels = seed_labels(seeds, 10)
    images = generate(net, seeds, labels, cfg.sample, batch_size=250, progress=True)
    metrics = mnist_metrics(images, labels, get_mnist_classifier(device=device))
    return {**metrics, "cfg_scale": cfg.sample.cfg_scale, "num_steps": cfg.sample.num_steps,
            "solver": cfg.sample.solver, "ckpt": str(ckpt)}


def sample_main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        description="Sample a trained checkpoint (DiT, MaskDiT or DyDiT): a PNG grid, an ADM-layout .npz and the "
                    "FLOPs the sampling executed (flops.json).",
        epilog="Under torchrun (torchrun --nproc_per_node N sample.py ...) each process samples a contiguous share "
               "of the seeds on its own GPU and rank 0 writes the outputs; images do not depend on N.")
    parser.add_argument("--ckpt", required=True, help="EMA .safetensors (or a training state checkpoints/step-*)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--n", type=int, default=64, help="number of images (default 64)")
    parser.add_argument("--steps", type=int, default=None,
                        help="sampling steps: EDM time steps, or DDPM/DDIM steps out of 1000 "
                             "(default: the checkpoint's config, else 18)")
    parser.add_argument("--cfg-scale", type=float, default=None, help="guidance scale (default: the checkpoint's config)")
    parser.add_argument("--class", dest="class_index", type=int, default=None, help="sample only this class")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed SEED+i")
    parser.add_argument("--sampler", "--solver", dest="solver", choices=SOLVERS, default=None,
                        help="heun | euler (EDM) | ddpm (ancestral, DiT's) | ddim (default: the checkpoint's)")
    parser.add_argument("--guidance", choices=("standard", "dit"), default=None,
                        help="standard: guide every eps channel; dit: the official DiT's first 3 channels "
                             "(DDPM checkpoints; default: the checkpoint's)")
    parser.add_argument("--batch", type=int, default=64, help="images per network batch (per process)")
    parser.add_argument("--vae", default=None, help="AutoencoderKL id or local folder to decode latent models")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="network autocast: auto = bf16 on CUDA, fp32 on CPU (as eval generate)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be >= 1")
    if args.batch < 1:
        parser.error("--batch must be >= 1")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out {args.out} is a file; name a folder")
    with parser.user_errors():
        return _sample(args, parser)


def _sample(args: argparse.Namespace, parser: ArgumentParser) -> int:
    import numpy as np
    import torch.distributed as dist

    from .dist import processes
    from .dydit import FlopsMeter
    from .generate import generate, open_for_sampling, save_grid, save_npz, seed_labels, to_uint8_nhwc
    from .models.precision import resolve_precision

    with processes("auto", args.device) as env:
        rank, world, device = env.rank, env.world_size, env.device
        if args.n < world:
            parser.error(f"--n {args.n} is smaller than the {world} processes")
        try:
            opened = open_for_sampling(args.ckpt, device, args.steps, args.cfg_scale, args.solver, args.vae,
                                       args.guidance)
            seeds = list(range(args.seed, args.seed + args.n))
            labels = seed_labels(seeds, opened.net.num_classes, args.class_index)
        except (FileNotFoundError, ValueError) as err:
            parser.error(str(err))
        net, sample_cfg = opened.net, opened.sample
        precision = resolve_precision(args.precision, device)
        lo, hi = rank * args.n // world, (rank + 1) * args.n // world  # this process's seeds
        with FlopsMeter(net) as meter:  # the FLOPs really executed (DyDiT: from its routers' decisions)
            images = generate(net, seeds[lo:hi], None if labels is None else labels[lo:hi], sample_cfg,
                              batch_size=args.batch, progress=rank == 0, precision=precision)
        if opened.vae:
            from .data.vae import decode_latents, load_vae
            images = decode_latents(load_vae(opened.vae, device), images, opened.latent_scale)
        uint8 = to_uint8_nhwc(images)
        if world > 1:
            parts = [None] * world if rank == 0 else None
            dist.gather_object((uint8, meter.records), parts, dst=0)
            if rank != 0:
                return 0
            uint8 = np.concatenate([p[0] for p in parts])
            meter.records = [r for p in parts for r in p[1]]
        out = Path(args.out)
        save_grid(uint8, out / "grid.png", nrow=min(args.n, 8 if labels is None or args.class_index is not None else 10))
        save_npz(out / "samples.npz", uint8, labels)
        settings = {"ckpt": str(args.ckpt), "n": args.n, "seed": args.seed, "class": args.class_index,
                    "precision": precision, **vars(sample_cfg)}
        (out / "settings.json").write_text(json.dumps(settings, indent=2))
        flops = meter.summary(images=args.n)
        (out / "flops.json").write_text(json.dumps(flops, indent=2))
        print(f"wrote {out / 'grid.png'} and {out / 'samples.npz'} ({args.n} images); measured "
              f"{flops['flops_per_image'] / 1e9:.4g} GFLOPs per image, {flops['ratio']:.3f}x the base model's")
        return 0
