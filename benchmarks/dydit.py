"""DyDiT vs its base model, side by side in one run: sampling time and measured FLOPs.

Trained checkpoints (the CPU bar: MNIST, same batch, same seeds, same sampler)::

    OMP_NUM_THREADS=1 python benchmarks/dydit.py --base runs/mnist/ema.safetensors --threads 1 \
        --dydit runs/dydit-0.7/ema.safetensors runs/dydit-0.5/ema.safetensors --out benchmarks/results/dydit-mnist

Emulated routers on a random network (speed depends on the decisions, not on the weights):
``--tiny`` (CPU smoke mode, CI) or ``--size XL/2 --device cuda`` (full size on a GPU). Each emulated
DyDiT keeps a share of heads/groups and of tokens per block chosen for lambda = 0.7, 0.5, 0.3; the
FLOPs reported are always the measured ones.

Every model samples the same seeds (``--n`` images in batches of ``--batch``; guidance doubles the
rows). An untimed first pass measures the FLOPs executed (:class:`~maskdit_fast.dydit.FlopsMeter`);
then the timed calls are interleaved (base, DyDiT 1, DyDiT 2, ... repeated ``--reps`` times) so
that a busy machine slows all of them alike, and the median is reported. ``--masked`` also times
each DyDiT's masked formulation (same decisions, nothing skipped). Writes OUT.json and OUT.md
(machine, date, load average, command, table) when ``--out`` is given.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.measure import git_state, machine, synchronize, versions
from maskdit_fast.checkpoint import load_checkpoint, sample_settings
from maskdit_fast.config import DIT_SIZES, ModelConfig, SampleConfig
from maskdit_fast.diffusion.edm import build_net
from maskdit_fast.dydit import FlopsMeter, load_dydit, model_flops, to_dydit
from maskdit_fast.dydit.checkpoint import is_dydit
from maskdit_fast.generate import generate, make_grid, seed_labels
from maskdit_fast.models.precision import autocast_for

TARGETS = (0.7, 0.5, 0.3)
TINY = ModelConfig(arch="maskdit", size=None, hidden_size=64, depth=4, num_heads=4, patch_size=4, input_size=32,
                   in_channels=1, num_classes=10, decoder_hidden_size=48, decoder_depth=1, decoder_num_heads=4,
                   mask_ratio=0.0)


def random_network(cfg: ModelConfig, device: torch.device):
    """A preconditioned network whose weights are all non-trivial (DiT's init zeroes adaLN)."""
    with device:  # built where it runs: seconds saved per XL model on a GPU
        net = build_net(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return net.to(device).eval().requires_grad_(False)


@torch.no_grad()
def emulate(dyn, target: float, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None,
            token_keep: float = 0.8) -> None:
    """Set ``dyn``'s routers so that every block keeps ``w`` of its heads and MLP groups (the same at
    every timestep) and about ``token_keep`` of its tokens, ``w`` chosen for a FLOPs ratio ``target``."""
    flops = model_flops(dyn)
    blocks = dyn.model.dynamic_blocks()
    dyn_costs = [flops.blocks[i] for i in flops.dynamic_index]
    fixed = flops.static - sum(b.static for b in dyn_costs) + sum(b.modulation + b.routers for b in dyn_costs)
    width_cost = sum(b.heads * b.per_head + b.heads * b.tokens * b.per_group_token * token_keep for b in dyn_costs)
    keep = 1.0 if target >= 1 else max(0.0, min(1.0, (target * flops.static - fixed) / width_cost))
    for block in blocks:
        on = max(1, round(keep * block.num_heads))
        bias = torch.tensor([10.0] * on + [-10.0] * (block.num_heads - on), device=x.device)
        for router in (block.head_router, block.group_router):
            router.linear.weight.zero_()
            router.linear.bias.copy_(bias)
        block.token_router.fc2.weight.normal_(0, 1.0)
        block.token_router.fc2.bias.zero_()
    # Token thresholds, block by block: the quantile of each block's router logits on a real input.
    logits: list[torch.Tensor] = []
    hooks = [b.token_router.register_forward_hook(lambda m, a, out: logits.append(out)) for b in blocks]
    try:
        for i, block in enumerate(blocks):
            logits.clear()
            dyn(x, sigma, labels)
            block.token_router.fc2.bias.fill_(-float(torch.quantile(logits[i].float().flatten(), 1 - token_keep)))
    finally:
        for h in hooks:
            h.remove()


def time_sampling(nets: dict, seeds: list[int], labels, sample_cfg: SampleConfig, batch: int, reps: int,
                  warmup: int, device: torch.device, precision: str = "fp32") -> dict[str, list[float]]:
    """Seconds per ``generate`` call of each network, calls interleaved across networks."""
    times: dict[str, list[float]] = {name: [] for name in nets}
    for rep in range(warmup + reps):
        for name, (net, mode) in nets.items():
            if mode is not None:
                net.model.set_mode(mode)
            synchronize(device)
            start = time.perf_counter()
            with autocast_for(precision, device):
                generate(net, seeds, labels, sample_cfg, batch_size=batch)
            synchronize(device)
            if rep >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def run(args: argparse.Namespace) -> tuple[dict, dict[str, torch.Tensor]]:
    """(report, images): the report's rows, and each model's samples of the untimed pass
    ((n, C, H, W) in model space, the same seeds for every model)."""
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if args.base:
        base = load_checkpoint(args.base, device)
        settings = sample_settings(args.base).sampler
    else:
        if args.tiny:
            cfg = TINY
        else:
            width, depth, heads = DIT_SIZES[args.size.split("/")[0]]
            cfg = ModelConfig(arch="dit", size=None, hidden_size=width, depth=depth, num_heads=heads,
                              patch_size=int(args.size.split("/")[1]), mask_ratio=0.0)
        torch.manual_seed(0)
        base = random_network(cfg, device)
        settings = {"num_steps": 18, "cfg_scale": 1.5}
    settings.update({k: v for k, v in (("num_steps", args.steps), ("cfg_scale", args.cfg_scale)) if v is not None})
    sample_cfg = SampleConfig(**{**SampleConfig().__dict__, **settings})
    cfg = base.model.cfg
    seeds = list(range(args.n))
    labels = seed_labels(seeds, cfg.num_classes)

    nets: dict[str, tuple] = {"base": (base, None)}
    if args.dydit:
        for path in args.dydit:
            if not is_dydit(path):
                raise SystemExit(f"{path} is not a DyDiT checkpoint")
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("lambda", "null"))
            name = f"dydit-{meta}" if meta is not None else Path(path).parent.name
            nets[name] = (load_dydit(path, device), "fast")
    else:
        calib_x = torch.randn(8, cfg.in_channels, cfg.input_size, cfg.input_size, device=device)
        calib_labels = seed_labels(list(range(8)), cfg.num_classes)
        calib_labels = None if calib_labels is None else calib_labels.to(device)
        for target in TARGETS:
            dyn = to_dydit(base).eval()
            emulate(dyn, target, calib_x, torch.full((8,), 1.0, device=device), calib_labels)
            nets[f"emulated-{target}"] = (dyn, "fast")
    if args.masked:
        for name in [n for n in nets if n != "base"]:
            nets[f"{name} (masked)"] = (nets[name][0], "masked")

    flops, images = {}, {}  # an untimed pass over the same seeds as the timed ones
    for name, (net, mode) in nets.items():
        if mode is not None:
            net.model.set_mode(mode)
        with FlopsMeter(net) as meter, autocast_for(precision, device):
            images[name] = generate(net, seeds, labels, sample_cfg, batch_size=args.batch)
        flops[name] = meter.summary(images=args.n)
    load_before = os.getloadavg()
    times = time_sampling(nets, seeds, labels, sample_cfg, args.batch, args.reps, args.warmup, device, precision)
    load_after = os.getloadavg()
    base_s = statistics.median(times["base"])
    rows = []
    for name in nets:
        median = statistics.median(times[name])
        f = flops[name]
        paired = statistics.median(b / t for b, t in zip(times["base"], times[name]))  # same round, same load
        rows.append({"model": name, "median_s": median, "times_s": times[name], "images_per_s": args.n / median,
                     "speedup": base_s / median, "speedup_paired": paired,
                     "flops_ratio": f["ratio"], "gflops_per_image": f["flops_per_image"] / 1e9,
                     "flops_per_row": f["flops_per_row"],
                     "mean_heads": statistics.mean(e["heads"] for e in f["per_evaluation"]),
                     "mean_groups": statistics.mean(e["groups"] for e in f["per_evaluation"]),
                     "mean_tokens": statistics.mean(e["tokens"] for e in f["per_evaluation"])})
    report = {"command": " ".join(sys.argv), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(device), "load_average_1_5_15min": {"before": load_before, "after": load_after},
              "versions": versions(), "git": git_state(ROOT), "precision": precision,
              "model": cfg.__dict__, "sample": sample_cfg.__dict__, "n": args.n, "batch": args.batch,
              "reps": args.reps, "rows": rows}
    return report, images


def save_figure(report: dict, images: dict[str, torch.Tensor], path: Path, rows: int = 5) -> Path | None:
    """One panel per model of its first ``rows`` x 10 samples (same seeds, one column per class when
    the model has 10), titled with its measured FLOPs ratio and speed-up. None for latent models."""
    first = next(iter(images.values()))
    if first.shape[1] not in (1, 3):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from maskdit_fast.eval.images import to_uint8_nhwc

    shown = {name: imgs for name, imgs in images.items() if "(masked)" not in name}
    shown_rows = -(-min(len(first), rows * 10) // 10)
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 1.0 + 0.33 * shown_rows), squeeze=False)
    by_model = {r["model"]: r for r in report["rows"]}
    for ax, (name, imgs) in zip(axes[0], shown.items()):
        grid = make_grid(to_uint8_nhwc(imgs[: rows * 10]), nrow=10)
        ax.imshow(grid.squeeze(-1), cmap="gray") if grid.shape[-1] == 1 else ax.imshow(grid)
        r = by_model[name]
        ax.set_title(f"{name}\nFLOPs {r['flops_ratio']:.2f}x, speed {r['speedup']:.2f}x", fontsize=10)
        ax.axis("off")
    fig.suptitle(f"same seeds, guidance {report['sample']['cfg_scale']}, {report['sample']['num_steps']} steps",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path



def markdown(report: dict) -> str:
    s = report["sample"]
    title = (f"DyDiT sampling benchmark: {report['n']} images, batch {report['batch']}, {s['num_steps']} {s['solver']} "
             f"steps, guidance {s['cfg_scale']}, median of {report['reps']} interleaved runs")
    load = report["load_average_1_5_15min"]
    lines = [title, "",
             f"- machine: {report['machine']['name']}, {report['machine']['platform']}",
             f"- date: {report['date']}; load average (1/5/15 min) before timing "
             f"{'/'.join(f'{v:.2f}' for v in load['before'])}, after {'/'.join(f'{v:.2f}' for v in load['after'])}",
             f"- command: `{report['command']}`",
             "- FLOPs: measured on the executed path (2 x MACs of matmuls/linears/convs, guidance rows included); "
             "heads / groups / tokens: mean share on over blocks and network evaluations", "",
             "- speed-up: base median / model median; paired: median over rounds of base time / model time in "
             f"the same round; precision {report.get('precision', 'fp32')}", "",
             "| model | s / run | images/s | speed-up | paired | FLOPs ratio | GFLOPs / image | heads | groups | tokens |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['model']} | {r['median_s']:.3f} | {r['images_per_s']:.2f} | {r['speedup']:.2f}x "
                     f"| {r['speedup_paired']:.2f}x | {r['flops_ratio']:.3f} | {r['gflops_per_image']:.4g} | {r['mean_heads']:.2f} "
                     f"| {r['mean_groups']:.2f} | {r['mean_tokens']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--base", help="base checkpoint (with --dydit)")
    source.add_argument("--tiny", action="store_true", help="random tiny MaskDiT with emulated routers (CPU smoke)")
    source.add_argument("--size", help="random DiT of this size (e.g. XL/2) with emulated routers")
    parser.add_argument("--dydit", nargs="+", help="DyDiT checkpoints fine-tuned from --base")
    parser.add_argument("--n", type=int, default=64, help="images per timed run (default 64)")
    parser.add_argument("--batch", type=int, default=64, help="images per network batch (default 64)")
    parser.add_argument("--steps", type=int, default=None, help="EDM steps (default: the checkpoint's, else 18)")
    parser.add_argument("--cfg-scale", type=float, default=None)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--masked", action="store_true", help="also time the masked formulation of each DyDiT")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                        help="auto: bf16 autocast on CUDA, fp32 on CPU")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch (0: torch's default; on a shared machine 1 is steadier)")
    parser.add_argument("--out", help="write OUT.json, OUT.md and (pixel models) OUT.png, the samples side by side")
    args = parser.parse_args(argv)
    if args.base and not args.dydit:
        parser.error("--base needs --dydit checkpoints")
    if args.threads:
        torch.set_num_threads(args.threads)
    report, images = run(args)
    text = markdown(report)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(report, indent=2))
        out.with_suffix(".md").write_text(text)
        save_figure(report, images, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
