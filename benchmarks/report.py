"""Training and sampling throughput, memory and MFU of MaskDiT against the plain DiT baseline.

    python -m benchmarks.report --device cuda --models XL/2 --batch 64 --out benchmarks/results/h100
    python -m benchmarks.report --device cuda --models S/2,B/2,L/2,XL/2 --batch 32,64,128 --sample-variants none
    python -m benchmarks.report --device cpu --models S/2,B/2 --batch 4 --steps 3
    python -m benchmarks.report --tiny                # the CPU smoke mode CI runs (tiny models, seconds)

Every (model, batch, variant) runs in this one process: full training steps (EDM loss,
backward, AdamW, EMA) after a warm-up, median over the timed steps; then the Heun sampler with
and without guidance. Ratios are taken against the baseline ``dit`` of the same run (see
``benchmarks/configs.py`` for the variant syntax). Writes ``report.json``, ``report.md`` and bar
charts to ``--out`` and prints the markdown. Exits with status 1 if a configuration failed with
an error (running out of memory is a result, not an error).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

GPU_TARGETS = ("XL/2", 64)  # the bar: MaskDiT-XL/2 vs DiT-XL/2 at batch 64, bf16


def _fmt(value: float | None, spec: str = ".3g", suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def _train_table(rows: list[dict]) -> list[str]:
    lines = ["| variant | precision | step ms | img/s | × dit | peak alloc GiB | × dit | peak reserved GiB "
             "| fwd GFLOPs/img | fwd GMACs/img | train GFLOPs/img | TFLOP/s | MFU |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| `{r['variant']}` | {r['precision']} | **{r['status']}** |" + " |" * 10)
            continue
        lines.append(
            f"| `{r['variant']}` | {r['precision']} | {_fmt(r['step_ms'], '.4g')} | {_fmt(r['images_per_s'], '.4g')} "
            f"| {_fmt(r['speedup_vs_baseline'], '.2f', '×')} | {_fmt(r['peak_allocated_gib'], '.3g')} "
            f"| {_fmt(r['memory_vs_baseline'], '.2f', '×')} | {_fmt(r['peak_reserved_gib'], '.3g')} "
            f"| {r['fwd_flops_per_image'] / 1e9:.4g} | {r['fwd_macs_per_image'] / 1e9:.4g} "
            f"| {r['train_flops_per_image'] / 1e9:.4g} | {_fmt(r['achieved_tflops'], '.3g')} "
            f"| {_fmt(r['mfu'], '.1%')} |")
    return lines


def _summary(rows: list[dict], device_type: str) -> list[str]:
    """The headline comparison of one (model, batch) group: the fastest MaskDiT-50% and the
    highest-MFU DiT with kernels, checked against the issue's GPU targets for XL/2 at batch 64."""
    ok = [r for r in rows if r["status"] == "ok" and r["speedup_vs_baseline"] is not None]
    on_target = device_type == "cuda" and rows and (rows[0]["model"], rows[0]["batch"]) == GPU_TARGETS

    def verdict(met: bool) -> str:
        return (" (target met)" if met else " (target missed)") if on_target else ""

    precision = next(r["precision"] for r in rows if r["variant"] == "dit")  # the baseline's
    same = [r for r in ok if r["precision"] == precision]
    lines = []
    masked = [r for r in same if r["arch"] == "maskdit" and r["mask_ratio"] == 0.5]
    if masked:
        best = max(masked, key=lambda r: r["images_per_s"])
        speedup, memory = best["speedup_vs_baseline"], best["memory_vs_baseline"]
        lines.append(f"- fastest {precision} MaskDiT (50% masked): `{best['variant']}`, {speedup:.2f}× the images/s "
                     f"of `dit` with {memory:.2f}× its peak memory" + verdict(speedup >= 2.5 and memory <= 0.6))
    dit_kernels = [r for r in same if r["arch"] == "dit" and r["kernels"]]
    if dit_kernels:
        best = max(dit_kernels, key=lambda r: r["mfu"])
        lines.append(f"- highest-MFU {precision} DiT with kernels: `{best['variant']}`, MFU {best['mfu']:.1%}"
                     + verdict(best["mfu"] >= 0.5))
    if on_target:
        lines.append("- targets (issue 6): MaskDiT-XL/2 ≥ 2.5× the images/s of DiT-XL/2 at ≤ 0.6× its peak "
                     "memory; DiT-XL/2 with kernels ≥ 50% MFU")
    return lines


def markdown(report: dict) -> str:
    """The report as markdown: header, one table per (model, batch), the sampling table, a legend."""
    device, ver, git, s = report["device"], report["versions"], report["git"], report["settings"]
    commit = "unknown" if git["commit"] is None else git["commit"][:12]
    if git["dirty"]:
        commit += " + uncommitted changes"
    peaks = ", ".join(f"{p} {t:.3g} TFLOP/s" for p, t in report["matmul_peak_tflops"].items())
    timer = "CUDA events around each step" if device["type"] == "cuda" else "wall clock around each step"
    memory = ("`torch.cuda.max_memory_allocated` / `max_memory_reserved` (model, EMA, optimizer and activations)"
              if device["type"] == "cuda" else
              "process RSS: alloc = growth of the peak RSS during the configuration, "
              "reserved = peak RSS of the process")
    extra = (f", capability {device['capability']}, {device['memory_gib']:.0f} GiB"
             if device["type"] == "cuda" else f", {device['platform']}")
    lines = [
        f"# maskdit_fast benchmark: {device['name']}", "",
        f"Command: `{report['command']}`", "",
        "| | |", "|---|---|",
        f"| device | {device['name']}{extra} |",
        f"| software | torch {ver['torch']}, triton {ver['triton']}, CUDA {ver['cuda']}, Python {ver['python']}; "
        f"attention backends: {', '.join(ver['attention_backends'])} |",
        f"| commit | {commit} |",
        f"| run | {report['run_id']}, {report['created']} |",
        f"| timing | {s['warmup']} warm-up steps, median of {s['steps']} timed steps ({timer}) |",
        f"| matmul peak | {peaks} (measured, {s['matmul_size']}² matmul; MFU is against the row's precision) |",
        f"| memory | {memory} |",
        f"| torch.compile backend | {s['compile_backend']} |", "",
        "Baseline `dit`: this package's DiT with kernels off (PyTorch reference ops), SDPA attention, eager, "
        f"{'bf16 autocast' if device['type'] == 'cuda' else 'fp32'}. Every × column divides by the `dit` row "
        "of the same table, measured in this run." + (
            "" if device["type"] == "cuda" else
            " On a CPU `+kernels` runs the Triton kernels in Triton's interpreter: a test of the code path, "
            "not of speed."), "",
    ]
    groups: dict[tuple, list[dict]] = {}
    for row in report["train"]:
        groups.setdefault((row["model"], row["batch"]), []).append(row)
    for (model, batch), rows in groups.items():
        lines += [f"## Training: {model}, batch {batch}", "", *_train_table(rows), "",
                  *_summary(rows, device["type"]), ""]
    if report["sample"]:
        first = report["sample"][0]
        lines += [f"## Sampling: Heun, {first['num_steps']} steps ({first['nfe']} network evaluations), "
                  f"batch {first['batch']}", "",
                  "Guidance runs the network on twice the batch. × dit: against `dit` without guidance.", "",
                  "| model | variant | precision | guidance | s / run | img/s | × dit | peak alloc GiB |",
                  "|---|---|---|--:|--:|--:|--:|--:|"]
        for r in report["sample"]:
            cells = (f"{_fmt(r['run_s'], '.4g')} | {_fmt(r['images_per_s'], '.4g')} | "
                     f"{_fmt(r['speedup_vs_baseline'], '.2f', '×')} | {_fmt(r['peak_allocated_gib'], '.3g')}"
                     if r["status"] == "ok" else f"**{r['status']}** | | |")
            lines.append(f"| {r['model']} | `{r['variant']}` | {r['precision']} | {r['cfg_scale']:g} | {cells} |")
        lines.append("")
    lines += ["Variants: `dit` / `maskdit` (no masking) / `maskNN` (MaskDiT training with NN% of the tokens masked), "
              "then `+kernels` (Triton kernels on), an attention backend (default `sdpa`), `+compile`, "
              "a precision other than the default. FLOPs from `torch.utils.flop_counter` (1 MAC = 2 FLOPs; "
              "train = forward + backward)."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Defaults depend on the mode (cuda, cpu or --tiny): "
                                            "see DEFAULTS in benchmarks/run.py.")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--tiny", action="store_true", help="tiny models and few steps: the CI smoke mode")
    parser.add_argument("--models", help="comma-separated SIZE/PATCH, e.g. S/2,B/2,L/2,XL/2 (tiny/2 in --tiny)")
    parser.add_argument("--batch", help="comma-separated batch sizes; every model runs at every one")
    parser.add_argument("--variants", default="default",
                        help="comma-separated training variants (e.g. dit+kernels,mask50+kernels+compile) or "
                             "'default'; the baseline dit is always added")
    parser.add_argument("--sample-variants", default="default",
                        help="comma-separated sampling variants, 'default' or 'none'")
    parser.add_argument("--warmup", type=int, help="untimed training steps per configuration (compiles happen here)")
    parser.add_argument("--steps", type=int, help="timed training steps per configuration")
    parser.add_argument("--sample-batch", type=int, help="sampling batch (default: the first --batch)")
    parser.add_argument("--sample-steps", type=int, help="Heun steps per sampler run")
    parser.add_argument("--sample-reps", type=int, help="timed sampler runs per configuration")
    parser.add_argument("--cfg-scale", type=float, default=1.5, help="guidance scale of the guided sampling rows")
    parser.add_argument("--compile-backend", help="torch.compile backend (default: inductor on CUDA, aot_eager on CPU)")
    parser.add_argument("--matmul-size", type=int, help="side of the square matmul that measures the FLOP/s peak")
    parser.add_argument("--threads", type=int,
                        help="CPU threads for torch (0: torch's default; tiny models run fastest on 1)")
    parser.add_argument("--out", default="runs/bench", help="folder for report.json, report.md and the charts")
    parser.add_argument("--no-plots", action="store_true", help="skip the matplotlib charts")
    args = parser.parse_args(argv)

    if args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()):
        # Before anything imports triton: kernels-on variants run in Triton's interpreter on CPU.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from .run import resolve_settings, run

    options = {k: v for k, v in vars(args).items() if k not in ("out", "no_plots")}
    try:
        settings = resolve_settings(**options)
    except ValueError as err:
        parser.error(str(err))
    command = shlex.join(["python", "-m", "benchmarks.report", *argv])
    report = run(settings, command, log=lambda message: print(message, file=sys.stderr, flush=True))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    (out / "report.md").write_text(text)
    if not args.no_plots:
        from .plots import plot_report

        plot_report(report, out)
    print(text)
    failed = [row["id"] for row in report["train"] + report["sample"] if row["status"].startswith("error")]
    if failed:
        print(f"failed configurations: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
