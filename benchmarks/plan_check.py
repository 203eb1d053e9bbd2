"""The memory plan against a real run: the planner's peak (fake tensors, no GPU) next to the same two
training steps run for real, where ``torch.cuda.max_memory_allocated`` measures them (on a CPU: the
real tensors' storages, counted as the planner counts).

    python -m benchmarks.plan_check --device cuda --model XL/2 --batches 32,64 --json plan-check.json
    python -m benchmarks.plan_check --tiny                          # CPU, a tiny model: checks the command

Prints one table row per architecture and batch, and the JSON with both plans.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from maskdit_fast.config import load_config
from maskdit_fast.plan.gpus import GIB
from maskdit_fast.plan.memory import plan_memory

TINY = ["model.size=null", "model.hidden_size=64", "model.depth=2", "model.num_heads=2", "model.decoder_hidden_size=32",
        "model.decoder_depth=1", "model.decoder_num_heads=2", "model.input_size=8", "model.num_classes=10"]


def check(model: str, batches: list[int], device: str, overrides: list[str]) -> list[dict]:
    size, _, patch = model.partition("/")
    rows = []
    for arch in ("dit", "maskdit"):
        for batch in batches:
            cfg = load_config("imagenet256-pretrain", [f"model.arch={arch}", f"model.size={size}",
                                                       f"model.patch_size={patch}", f"train.global_batch={batch}",
                                                       *(["model.mask_ratio=0"] if arch == "dit" else []), *overrides])
            planned = plan_memory(cfg, 1, batch, device=device)
            real = plan_memory(cfg, 1, batch, device=device, fake=False)
            measured = real.measured if real.measured is not None else real.peak
            rows.append({"arch": arch, "batch": batch, "planned": planned.peak, "measured": measured,
                         "tracked_real": real.peak, "measured_over_planned": measured / planned.peak,
                         "plan": planned.to_dict(), "real": real.to_dict()})
            del real
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--model", default="XL/2")
    parser.add_argument("--batches", default="32,64")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU (checks the command)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    device, model, overrides = ("cpu", "S/2", TINY) if args.tiny else (args.device, args.model, [])
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible")
    rows = check(model, [int(b) for b in args.batches.split(",")], device, overrides)
    what = "torch.cuda.max_memory_allocated" if device == "cuda" else "real tensors' storages"
    print(f"| arch | batch | planned peak, GiB | measured ({what}), GiB | measured / planned |")
    print("|---|--:|--:|--:|--:|")
    for r in rows:
        print(f"| {r['arch']} | {r['batch']} | {r['planned'] / GIB:.3f} | {r['measured'] / GIB:.3f} | "
              f"{r['measured_over_planned']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "model": model, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
