"""One optimizer step of each ``train.optimizer`` at a model's size: torch's AdamW (fused on CUDA, foreach
on the CPU) and apex's FusedAdam, both built as the trainer builds them (``build_optimizer``), over the fp32
parameter tensors of a DiT (XL/2: 674,815,120 parameters in 291 tensors) with random gradients. Without a
usable apex its row says why (e.g. "not installed") and AdamW is still timed.

    python -m benchmarks.optimizer_step                     # DiT-XL/2 on the GPU
    python -m benchmarks.optimizer_step --tiny              # the CPU smoke size

Each timed step sits between two ``torch.cuda.synchronize()`` calls; the median of ``--steps`` steps after
``--warmup`` untimed ones (the first creates the moments). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.configs import ModelSpec
from benchmarks.measure import machine, synchronize
from maskdit_fast.config import ConfigError, TrainConfig
from maskdit_fast.diffusion.edm import build_net
from maskdit_fast.train.optimizer import build_optimizer

OPTIMIZERS = ("adamw", "apex_fused_adam")


def dit_parameters(spec: ModelSpec, device: torch.device) -> list[torch.nn.Parameter]:
    """The parameters of a DiT of shape ``spec`` on ``device``, each with a random gradient."""
    with torch.device(device):
        params = list(build_net(spec.config("dit", 0.0)).parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def step_times(optimizer: torch.optim.Optimizer, device: torch.device, warmup: int, steps: int) -> list[float]:
    """Seconds of each of ``steps`` optimizer steps after ``warmup`` untimed ones."""
    for _ in range(warmup):
        optimizer.step()
    times = []
    for _ in range(steps):  # host work and kernels of one step, as the loop runs it
        synchronize(device)
        start = time.perf_counter()
        optimizer.step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def measure(spec: ModelSpec, device: torch.device, warmup: int, steps: int) -> dict:
    """One row per optimizer: its median step in ms (and every step's), or why it was skipped."""
    params = dit_parameters(spec, device)
    rows = []
    for name in OPTIMIZERS:
        try:
            optimizer = build_optimizer([{"params": params}], TrainConfig(optimizer=name), device)
        except ConfigError as err:
            rows.append({"optimizer": name, "skipped": str(err)})
            continue
        times = step_times(optimizer, device, warmup, steps)
        rows.append({"optimizer": name, "class": type(optimizer).__name__, "median_ms": statistics.median(times) * 1e3,
                     "step_ms": [round(t * 1e3, 4) for t in times]})
        del optimizer  # its moments go before the next one's are made
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result = {"model": f"DiT-{spec.name}", "parameters": sum(p.numel() for p in params), "tensors": len(params),
              "dtype": "float32", "device": machine(device)["name"], "torch": torch.__version__, "warmup": warmup,
              "rows": rows}
    timed = {row["optimizer"]: row["median_ms"] for row in rows if "median_ms" in row}
    if len(timed) == len(OPTIMIZERS):
        result["apex_over_adamw"] = timed["apex_fused_adam"] / timed["adamw"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny model on the CPU (smoke mode)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--model", default=None, help="SIZE/PATCH (default XL/2; tiny/2 with --tiny)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result to this file")
    args = parser.parse_args(argv)

    device_type = args.device if args.device != "auto" else ("cpu" if args.tiny or not torch.cuda.is_available()
                                                             else "cuda")
    if device_type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible (drop --device or use --device cpu)")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1, --warmup at least 0")
    try:
        spec = ModelSpec.parse(args.model or ("tiny/2" if args.tiny else "XL/2"))
    except ValueError as err:
        parser.error(str(err))
    line = json.dumps(measure(spec, torch.device(device_type), args.warmup, args.steps))
    print(line)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
