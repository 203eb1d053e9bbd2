"""Where the time of one training step goes: ``torch.profiler`` over a few steps, grouped by kind.

    python -m benchmarks.profile_step --device cuda --model XL/2 --variant mask50+kernels --batch 64 \
        --out benchmarks/results/h200/profile-maskdit-xl2
    python -m benchmarks.profile_step --tiny                    # CPU smoke mode (seconds)

The step is the benchmark suite's (:class:`benchmarks.workloads.TrainStep`: EDM loss, backward,
AdamW, EMA). After ``--warmup`` untimed steps, ``--steps`` steps run under the profiler. On CUDA the
rows are the GPU kernels (what the device spent its time on); on a CPU they are the ATen operators'
self times. Each row falls in the first category whose pattern matches its name (``CATEGORIES``);
"busy" is the share of the profiled wall time that those rows cover: on a GPU, well under 100%
means launch gaps or host-side waits. Writes OUT.json and OUT.md (and OUT.trace.json with
``--trace``: the Chrome trace, tens of MB at XL/2).
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from .configs import ModelSpec, Variant
from .measure import git_state, machine, synchronize, versions
from .workloads import TrainStep, variant_settings

ROOT = Path(__file__).resolve().parent.parent
# First match wins. GPU kernel names (cuBLAS/CUTLASS/cuDNN/flash, Triton functions, PyTorch's
# elementwise templates) and CPU ATen operator names both fall in here.
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("triton: adaLN LayerNorm+modulate / gated residual", r"_adaln_"),
    ("triton: token gather / scatter", r"_gather_kernel|_scatter(_bwd)?_kernel"),
    ("attention", r"flash|fmha|attention|sdpa|softmax"),
    ("torch.compile (Inductor) kernels", r"^triton_(poi|red|per|tem)_"),
    ("matmul and convolution", r"gemm|xmma|cutlass|nvjet|wgmma|cublas|convolution|convolve|conv2d|"
                               r"aten::(mm|addmm|bmm|baddbmm|_addmm_activation)$"),
    ("optimizer (AdamW) and EMA", r"adam|multi_tensor|foreach|lerp"),
    ("layer norm (PyTorch)", r"layer_norm"),
    ("gather / scatter / index (PyTorch)", r"index|gather|scatter|take_along"),
    ("copies, casts, memset", r"memcpy|memset|copy|cat_|aten::cat$|_to_copy|fill|clone"),
    ("elementwise / reductions", r"elementwise|vectorized|reduce|unrolled|gelu|silu|"
                                 r"aten::(add|mul|sub|div|exp|pow|sum|mean|neg|rsqrt|sqrt|square|tanh|addcmul|"
                                 r"addcdiv|where|threshold\w*|sigmoid|log|abs|clamp|maximum|minimum)_?$"),
    ("allocation and views (host bookkeeping)", r"aten::(empty\w*|new_empty\w*|set_|view|_unsafe_view|t|"
                                                r"transpose|as_strided|to|reshape|expand|permute|unsqueeze|"
                                                r"squeeze|slice|select|detach|alias|resolve_\w+)$"),
)
OTHER = "other"


def categorize(name: str) -> str:
    """The category of a kernel or operator ``name`` (``OTHER`` when no pattern matches)."""
    lowered = name.lower()
    for category, pattern in CATEGORIES:
        if re.search(pattern, lowered):
            return category
    return OTHER


@dataclass(frozen=True)
class Row:
    """One kernel (CUDA) or operator (CPU) summed over the profiled steps."""

    name: str
    calls: int
    us: float  # self time, microseconds

    @property
    def category(self) -> str:
        return categorize(self.name)


def profile_rows(prof: profile, device: torch.device) -> list[Row]:
    """The profiled rows of ``device``'s work: GPU kernels on CUDA, ATen operators' self times on CPU."""
    events = prof.key_averages()
    if device.type == "cuda":
        picked = [(evt, _device_us(evt)) for evt in events if evt.device_type == DeviceType.CUDA]
        if not picked:  # a profiler that lists no kernel rows: the operators' own device time instead
            picked = [(evt, _device_us(evt)) for evt in events if evt.key.startswith("aten::")]
    else:
        picked = [(evt, evt.self_cpu_time_total) for evt in events
                  if evt.device_type == DeviceType.CPU and evt.key.startswith("aten::")]
    rows = [Row(evt.key, evt.count, float(us)) for evt, us in picked if us > 0]
    return sorted(rows, key=lambda r: -r.us)


def _device_us(evt) -> float:
    us = getattr(evt, "self_device_time_total", None)
    return evt.self_cuda_time_total if us is None else us  # the older name, torch < 2.4


def summarize(rows: list[Row], wall_us: float, steps: int) -> dict:
    """Per-category time per step, share of the rows' total, and the busy share of the wall time."""
    total = sum(r.us for r in rows)
    by_category: dict[str, dict] = {}
    for r in rows:
        entry = by_category.setdefault(r.category, {"us": 0.0, "rows": 0})
        entry["us"] += r.us
        entry["rows"] += 1
    categories = [{"category": name, "ms_per_step": v["us"] / steps / 1e3, "share": v["us"] / total if total else 0.0,
                   "rows": v["rows"]} for name, v in sorted(by_category.items(), key=lambda kv: -kv[1]["us"])]
    return {"wall_ms_per_step": wall_us / steps / 1e3, "profiled_ms_per_step": total / steps / 1e3,
            "busy": total / wall_us if wall_us else 0.0, "categories": categories}


def run(spec: ModelSpec, variant: Variant, batch: int, device: torch.device, warmup: int, steps: int,
        compile_backend: str, trace: Path | None = None) -> tuple[list[Row], dict]:
    """Profile ``steps`` training steps of ``spec`` as ``variant``; returns (rows, summary)."""
    with variant_settings(variant):
        step = TrainStep(spec, variant, batch, device, compile_backend)
        for _ in range(warmup):
            step()
        synchronize(device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                step()
            synchronize(device)
            wall_us = (time.perf_counter() - start) * 1e6
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    rows = profile_rows(prof, device)
    return rows, summarize(rows, wall_us, steps)


def markdown(report: dict, top: int) -> str:
    s, summary = report["settings"], report["summary"]
    lines = [f"# Profile of one training step: {s['model']} `{s['variant']}`, batch {s['batch']}", "",
             f"- machine: {report['device']['name']}; torch {report['versions']['torch']}, "
             f"triton {report['versions']['triton']}",
             f"- date: {report['date']}; commit {report['git']['commit']}"
             + (" (uncommitted changes)" if report["git"]["dirty"] else ""),
             f"- command: `{report['command']}`",
             f"- {s['steps']} profiled steps after {s['warmup']} warm-up steps; step time under the profiler "
             f"{summary['wall_ms_per_step']:.4g} ms (the profiler adds overhead: take step times from "
             f"`benchmarks.report`); {report['rows_kind']} cover {summary['busy']:.1%} of it", "",
             "| category | ms / step | share |", "|---|--:|--:|"]
    lines += [f"| {c['category']} | {c['ms_per_step']:.4g} | {c['share']:.1%} |" for c in summary["categories"]]
    lines += ["", f"Top {top} {report['rows_kind']} by time:", "", "| name | category | calls / step | ms / step |",
              "|---|---|--:|--:|"]
    for r in report["rows"][:top]:
        name = r["name"] if len(r["name"]) <= 90 else r["name"][:87] + "..."
        lines.append(f"| `{name}` | {categorize(r['name'])} | {r['calls'] / s['steps']:.3g} "
                     f"| {r['us'] / s['steps'] / 1e3:.4g} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU (smoke mode)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--model", default=None, help="SIZE/PATCH (default XL/2; tiny/2 with --tiny)")
    parser.add_argument("--variant", default="mask50+kernels", help="benchmark variant (benchmarks/configs.py)")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default 64; 2 with --tiny)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; 1 with --tiny)")
    parser.add_argument("--steps", type=int, default=None, help="profiled steps (default 5; 2 with --tiny)")
    parser.add_argument("--compile-backend", default=None, help="for +compile (default inductor on CUDA)")
    parser.add_argument("--top", type=int, default=25, help="rows listed in the markdown")
    parser.add_argument("--trace", action="store_true", help="also write OUT.trace.json (Chrome trace)")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)

    device_type = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiny:
        device_type = "cpu" if args.device == "auto" else device_type
    if device_type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible (drop --device or use --device cpu)")
    device = torch.device(device_type)
    try:
        spec = ModelSpec.parse(args.model or ("tiny/2" if args.tiny else "XL/2"))
        variant = Variant.parse(args.variant, device_type)
    except ValueError as err:
        parser.error(str(err))
    batch = args.batch if args.batch is not None else (2 if args.tiny else 64)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    steps = args.steps if args.steps is not None else (2 if args.tiny else 5)
    if min(batch, steps) < 1 or warmup < 0:
        parser.error("--batch and --steps must be at least 1, --warmup at least 0")
    compile_backend = args.compile_backend or ("inductor" if device_type == "cuda" else "aot_eager")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    trace = args.out.with_suffix(".trace.json") if args.trace and args.out is not None else None

    rows, summary = run(spec, variant, batch, device, warmup, steps, compile_backend, trace)
    report = {
        "schema": "maskdit_fast-profile/1",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.profile_step " + shlex.join(sys.argv[1:] if argv is None else argv),
        "device": machine(device), "versions": versions(), "git": git_state(ROOT),
        "settings": {"model": spec.name, "variant": variant.name, "batch": batch, "warmup": warmup, "steps": steps},
        "rows_kind": "GPU kernels" if device_type == "cuda" else "ATen operators (self time)",
        "summary": summary,
        "rows": [{"name": r.name, "calls": r.calls, "us": r.us} for r in rows],
    }
    text = markdown(report, args.top)
    print(text)
    if args.out is not None:
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
