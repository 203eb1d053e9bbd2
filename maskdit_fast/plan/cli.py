"""``python -m benchmarks.plan`` (also ``python -m maskdit_fast.plan``): what a training run needs per GPU,
planned on any machine (docs/planning.md).

    python -m benchmarks.plan --model XL/2 --arch maskdit --gpu h100-80gb --gpus 8 --parallel fsdp \\
        --global-batch 1024 [--micro-batch N|auto] [--activation-checkpointing] [--precision bf16]
    python -m benchmarks.plan --config imagenet256-pretrain train.global_batch=256 --gpus 8

It runs two full training steps of the package's own trainer pieces on fake tensors and prints, per
GPU: the peak and its parts (parameters, gradients, optimizer states, EMA, activations, temporaries,
FSDP's gathered parameters), the phase and module of the peak, the headroom left on the GPU, the
largest micro-batch that fits with and without activation checkpointing, the same figures for the
other architecture (MaskDiT or the plain DiT) at the same micro-batch, and a roofline lower bound on
the step time (per GPU, for the run's ``train.max_steps``). ``--json PATH`` writes everything.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from ..config import DIT_SIZES, Config, load_config
from ..errors import ArgumentParser, UserError
from .gpus import DEFAULT_RESERVE_GB, GIB, GPU, GPUS, gpu_named
from .memory import MemoryPlan, plan_memory
from .roofline import OpCounter, gpu_hours, images_per_s, step_time_bound
from .tracker import CATEGORIES
from .search import Fit, PlanCache, largest_micro_batch

LABELS = {"parameters": "parameters", "gradients": "gradients", "optimizer": "optimizer states", "ema": "EMA",
          "activations": "activations", "temporaries": "temporaries", "fsdp_gathered": "FSDP gathered (in flight)"}


def parse_model(text: str) -> tuple[str, int]:
    """``XL/2`` -> (``XL``, 2)."""
    size, _, patch = text.upper().partition("/")
    if size not in DIT_SIZES or not patch.isdigit():
        raise UserError(f"--model {text!r}: give SIZE/PATCH with SIZE one of {list(DIT_SIZES)}, e.g. XL/2")
    return size, int(patch)


def build_config(args: argparse.Namespace) -> Config:
    """The run's config: the preset (``--config``, default ImageNet-256 MaskDiT), then the flags, then
    ``key=value`` overrides."""
    flags = []
    if args.model:
        size, patch = parse_model(args.model)
        flags += [f"model.size={size}", f"model.patch_size={patch}"]
    if args.arch:
        flags += [f"model.arch={args.arch}"] + (["model.mask_ratio=0"] if args.arch == "dit" else [])
    if args.parallel:
        flags.append(f"train.parallel={args.parallel}")
    if args.global_batch:
        flags.append(f"train.global_batch={args.global_batch}")
    if args.activation_checkpointing:
        flags.append("train.activation_checkpointing=true")
    if args.precision:
        flags.append(f"train.precision={args.precision}")
    if args.kernels:
        flags.append(f"model.kernels={'triton' if args.kernels == 'on' else 'reference'}")
    return load_config(args.config, [*flags, *args.overrides])


def other_arch(cfg: Config) -> Config:
    """The plain DiT of a MaskDiT config (same encoder, no decoder, no masking), or the paper's MaskDiT
    (decoder 8 x 512, half the tokens masked) of a DiT config."""
    if cfg.model.arch == "maskdit":
        model = dataclasses.replace(cfg.model, arch="dit", mask_ratio=0.0)
    else:
        model = dataclasses.replace(cfg.model, arch="maskdit", mask_ratio=0.5)
    return dataclasses.replace(cfg, model=model)


def gib(n: int | float) -> str:
    return f"{n / GIB:.2f}"


def plan_run(cfg: Config, gpus: int, gpu: GPU, reserve: int, micro_batch: str | None, search: bool
             ) -> dict[str, Any]:
    """Everything the command prints, as a dict (the JSON)."""
    started = time.perf_counter()
    share = cfg.train.global_batch // gpus
    if cfg.train.global_batch % gpus:
        raise UserError(f"train.global_batch={cfg.train.global_batch} does not divide over --gpus {gpus}")
    cached = PlanCache()  # the two searches share their first probes
    fits: dict[str, Fit] = {}
    if search or micro_batch == "auto":
        for ac in (False, True):
            fits["with_ac" if ac else "without_ac"] = largest_micro_batch(
                cfg, gpus, gpu.memory_bytes, reserve, activation_checkpointing=ac, plan=cached)
    if micro_batch == "auto":
        key = "with_ac" if cfg.train.activation_checkpointing else "without_ac"
        if fits[key].micro_batch == 0:
            raise UserError(f"no micro-batch fits {gpu.name} (even 1: {gib(fits[key].tried.get(1, 0))} GiB planned "
                            f"+ {gib(reserve)} GiB reserve); use FSDP, activation checkpointing or more GPUs")
        micro = fits[key].micro_batch
    else:
        micro = int(micro_batch) if micro_batch else (cfg.train.micro_batch or share)
    counters = (OpCounter(), OpCounter())
    plan = plan_memory(cfg, gpus, micro, counter=counters[0])
    other = plan_memory(other_arch(cfg), gpus, micro, counter=counters[1])
    result = {
        "command": "python -m benchmarks.plan", "gpu": dataclasses.asdict(gpu), "gpus": gpus,
        "reserve_bytes": reserve, "global_batch": cfg.train.global_batch, "per_gpu_batch": share,
        "plan": plan.to_dict(), "headroom_bytes": gpu.memory_bytes - reserve - plan.peak,
        "fits": plan.peak + reserve <= gpu.memory_bytes,
        "largest_micro_batch": {k: {"micro_batch": f.micro_batch, "tried": f.tried} for k, f in fits.items()},
        "other_arch": other.to_dict(),
        "maskdit_over_dit_peak": _maskdit_over_dit(plan.peak, other.peak, plan),
        "maskdit_over_dit_activations": _maskdit_over_dit(plan.saved_activations, other.saved_activations, plan),
    }
    bounds = [_bound(p, c, gpu, cfg, gpus) for p, c in zip((plan, other), counters)]
    result["roofline"] = {"plan": bounds[0], "other_arch": bounds[1],
                          "maskdit_over_dit": _maskdit_over_dit(bounds[0]["step_s"], bounds[1]["step_s"], plan)}
    result["seconds"] = time.perf_counter() - started
    return result


def _maskdit_over_dit(mine: float, other: float, plan: MemoryPlan) -> float:
    """MaskDiT's figure over DiT's, from ``plan``'s figure and the other architecture's."""
    return mine / other if plan.arch == "maskdit" else other / mine


def _bound(plan: MemoryPlan, counter: OpCounter, gpu: GPU, cfg: Config, gpus: int) -> dict[str, Any]:
    """The roofline lower bound of one step of ``plan`` on ``gpu``: the counted last step had
    min(accumulation, 2) micro-batches; a step runs ``accumulation`` of them."""
    bound = step_time_bound(counter, gpu, tf32=cfg.train.tf32)
    per_micro_batch = plan.accumulation / min(plan.accumulation, 2)
    step_s = sum(p.seconds * (per_micro_batch if name in ("forward", "backward") else 1)
                 for name, p in bound.phases.items())
    return {"step_s": step_s, "images_per_s": images_per_s(step_s, cfg.train.global_batch),
            "gpu_hours": gpu_hours(step_s, cfg.train.max_steps, gpus), "max_steps": cfg.train.max_steps,
            "counted": bound.to_dict()}


def render(result: dict[str, Any]) -> str:
    """The table a person reads."""
    plan, other, gpu = result["plan"], result["other_arch"], result["gpu"]
    name = "MaskDiT" if plan["arch"] == "maskdit" else "DiT"
    other_name = "DiT" if plan["arch"] == "maskdit" else "MaskDiT"
    setting = (f"{name}-{plan['size']}, {result['gpus']} x {gpu['name']}, {plan['parallel']}, micro-batch "
               f"{plan['micro_batch']} x {plan['accumulation']} per GPU (global {result['global_batch']}), "
               f"{plan['precision']}, kernels {plan['kernels']}, activation checkpointing "
               f"{'on' if plan['activation_checkpointing'] else 'off'}")
    lines = [f"Plan: {setting}", "", f"| per GPU, GiB | {name} | {other_name} |", "|---|--:|--:|"]
    for c in CATEGORIES:
        lines.append(f"| {LABELS[c]} at the peak | {gib(plan['at_peak'][c])} | {gib(other['at_peak'][c])} |")
    lines += [f"| **peak** | **{gib(plan['peak'])}** | **{gib(other['peak'])}** |",
              f"| peak in | {plan['peak_phase']}, step {plan['peak_step']} | {other['peak_phase']}, step "
              f"{other['peak_step']} |",
              f"| activations saved by a forward pass | {gib(plan['saved_activations'])} | "
              f"{gib(other['saved_activations'])} |", ""]
    lines.append(f"Peak module ({name}): {plan['peak_module'] or '-'}")
    lines.append(f"MaskDiT / DiT at the same micro-batch: peak {result['maskdit_over_dit_peak']:.3f}, activations "
                 f"{result['maskdit_over_dit_activations']:.3f}")
    verdict = "fits" if result["fits"] else "does NOT fit"
    lines.append(f"{gpu['name']}: {gib(gpu['memory_bytes'])} GiB, {gib(result['reserve_bytes'])} GiB kept back "
                 f"(CUDA context, workspaces, fragmentation): {verdict}, headroom {gib(result['headroom_bytes'])} GiB")
    for key, label in (("without_ac", "without"), ("with_ac", "with")):
        fit = result["largest_micro_batch"].get(key)
        if fit is not None:
            tried = ", ".join(f"{m}: {gib(p)}" for m, p in sorted(fit["tried"].items(), key=lambda kv: int(kv[0])))
            best = fit["micro_batch"] or "none"
            lines.append(f"Largest micro-batch {label} activation checkpointing: {best} (planned peaks, GiB: {tried})")
    bound = result["roofline"]
    mine, others = bound["plan"], bound["other_arch"]
    lines.append(f"Step time on {gpu['name']}, a LOWER bound (roofline: every op at the data-sheet peak of FLOPs or "
                 f"bandwidth, no communication), not a measurement: {name} {mine['step_s'] * 1e3:.1f} ms, {other_name} "
                 f"{others['step_s'] * 1e3:.1f} ms per step (MaskDiT / DiT {bound['maskdit_over_dit']:.3f}); {name}: at "
                 f"most {mine['images_per_s']:.0f} images/s, at least {mine['gpu_hours']:.0f} GPU-hours for "
                 f"{mine['max_steps']} steps on {result['gpus']} GPUs")
    for note in plan["fallbacks"]:
        lines.append(f"Note: {note}")
    lines.append(f"Planned on fake tensors on the CPU path in {result['seconds']:.1f} s (docs/planning.md says what "
                 "differs from a CUDA run).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m benchmarks.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="imagenet256-pretrain", help="preset or YAML file (default: "
                        "imagenet256-pretrain, MaskDiT-XL/2 on 256px latents)")
    parser.add_argument("--model", help="SIZE/PATCH, e.g. XL/2 (default: the config's)")
    parser.add_argument("--arch", choices=("maskdit", "dit"), help="default: the config's")
    parser.add_argument("--gpu", default="h100-80gb", help=f"one of {sorted(GPUS)} (default h100-80gb)")
    parser.add_argument("--memory-gb", type=float, help="GPU memory in GiB, in place of the named GPU's")
    parser.add_argument("--reserve-gb", type=float, default=DEFAULT_RESERVE_GB,
                        help=f"kept back for the CUDA context, workspaces and fragmentation (default {DEFAULT_RESERVE_GB})")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs in the run (processes; default 1)")
    parser.add_argument("--parallel", choices=("none", "ddp", "fsdp"), help="default: ddp with several GPUs")
    parser.add_argument("--global-batch", type=int, help="default: the config's train.global_batch")
    parser.add_argument("--micro-batch", help="N, or auto (the largest that fits); default: the config's, else "
                        "the whole per-GPU batch")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--precision", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--kernels", choices=("on", "off"), help="Triton kernels (on) or the references (off)")
    parser.add_argument("--no-search", action="store_true", help="skip the largest-micro-batch bisection")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    if args.gpus < 1:
        parser.error("--gpus must be >= 1")
    if args.micro_batch not in (None, "auto") and not (args.micro_batch.isdigit() and int(args.micro_batch) > 0):
        parser.error(f"--micro-batch {args.micro_batch!r}: give a positive integer or auto")
    if args.parallel is None:
        args.parallel = "ddp" if args.gpus > 1 else None
    elif args.parallel == "none" and args.gpus > 1:
        parser.error("--parallel none runs one GPU; use ddp or fsdp with --gpus > 1")
    with parser.user_errors():
        cfg = build_config(args)
        gpu = gpu_named(args.gpu, args.memory_gb)
        result = plan_run(cfg, args.gpus, gpu, int(args.reserve_gb * GIB), args.micro_batch,
                          search=not args.no_search)
        print(render(result))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1))
    return 0
