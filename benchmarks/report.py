"""Training and sampling throughput, memory and MFU of MaskDiT against the plain DiT baseline.

    python -m benchmarks.report --device cuda --models XL/2 --batch 64 --out benchmarks/results/h100
    python -m benchmarks.report --device cuda --models S/2,B/2,L/2,XL/2 --batch 32,64,128 --sample-variants none
    python -m benchmarks.report --device cpu --models S/2,B/2 --batch 4 --steps 3
    python -m benchmarks.report --tiny                # the CPU smoke mode CI runs (tiny models, seconds)
    python -m benchmarks.report --device cuda --sweep-batch 8,16,32,64,128,256,512 --memory-budget 40

Every (model, batch, variant) runs in this one process: full training steps (EDM loss,
backward, AdamW, EMA) after a warm-up, median over the timed steps; then the Heun sampler with
and without guidance; then the batch sweep (images/s and peak memory of DiT and MaskDiT against the
per-device batch, where MaskDiT's advantage appears or vanishes, and on CUDA the largest batch of
each within a memory budget). Every row states its precision policy, and a ratio is only taken
between rows of this run that differ in one aspect (``benchmarks/policy.py``; variant syntax in
``benchmarks/configs.py``). Writes ``report.json``, ``report.md`` and charts (``sweep.png``
among them) to ``--out`` and prints the markdown. Exits with status 1 if a configuration failed
with an error (running out of memory is a result, not an error).
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

GPU_TARGETS = ("XL/2", 64)  # the issue's bar: MaskDiT-XL/2 vs DiT-XL/2 at batch 64, bf16


def _fmt(value: float | None, spec: str = ".3g", suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def _versus(row: dict) -> str:
    """The "compared with" cell: the baseline and the one aspect, or the refusal, loudly."""
    base = row["baseline_variant"]
    if row["status"] != "ok":
        return ""
    if row["comparison"]:
        return f"⚠ **no ratio**: {'vs `' + base + '` ' if base else ''}{row['comparison']}"
    if row["compared"] is None:
        return "(baseline)"
    return f"`{base}` ({row['compared']})"


def _policy_cells(row: dict) -> str:
    return (f"{row['autocast']} | {row['residual_dtype'] or '–'} | {row['attention']} | "
            f"{'on' if row['kernels'] else 'off'} | {'on' if row['compile'] else 'off'}")


POLICY_HEAD = "autocast | residual | attention | kernels | compile"


def _train_table(rows: list[dict]) -> list[str]:
    lines = [f"| variant | {POLICY_HEAD} | step ms | img/s | compared with (one change) | × img/s | peak alloc GiB "
             "| × memory | peak reserved GiB | fwd GFLOPs/img | DiT-paper GFLOPs/img | train GFLOPs/img | TFLOP/s "
             "| MFU |",
             "|---|---|---|---|---|---|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| `{r['variant']}` | {_policy_cells(r)} | **{r['status']}** |" + " |" * 11)
            continue
        lines.append(
            f"| `{r['variant']}` | {_policy_cells(r)} | {_fmt(r['step_ms'], '.4g')} | {_fmt(r['images_per_s'], '.4g')} "
            f"| {_versus(r)} | {_fmt(r['speedup_vs_baseline'], '.2f', '×')} | {_fmt(r['peak_allocated_gib'], '.3g')} "
            f"| {_fmt(r['memory_vs_baseline'], '.2f', '×')} | {_fmt(r['peak_reserved_gib'], '.3g')} "
            f"| {r['fwd_flops_per_image'] / 1e9:.4g} | {r['dit_paper_gflops_per_image']:.4g} "
            f"| {r['train_flops_per_image'] / 1e9:.4g} | {_fmt(r['achieved_tflops'], '.3g')} "
            f"| {_fmt(r['mfu'], '.1%')} |")
    return lines


def _plan_table(rows: list[dict]) -> list[str]:
    """The memory planner's figures of the rows on a GPU (none when the run did not plan)."""
    planned = [r for r in rows if r.get("planned_peak_gib") is not None]
    if not planned:
        return []
    gpus = list(planned[0]["planned_largest_micro_batch"])
    lines = ["Planned on a GPU by the memory planner (fake tensors, CUDA code path, bf16, one GPU; "
             "docs/planning.md): peak at this batch, and the largest micro-batch (a power of two) that fits.", "",
             "| variant | planned peak GiB | " + " | ".join(f"largest micro-batch, {g}" for g in gpus) + " |",
             "|---|--:|" + "--:|" * len(gpus)]
    for r in planned:
        largest = " | ".join(str(r["planned_largest_micro_batch"][g] or "none") for g in gpus)
        lines.append(f"| `{r['variant']}` | {r['planned_peak_gib']:.3g} | {largest} |")
    return lines + [""]


def refusals(rows: list[dict]) -> list[str]:
    """One loud line per row whose comparison was refused (policies differ in more than one aspect)."""
    return [f"- ⚠ **no ratio for `{r['variant']}`** ({r['model']}, batch {r['batch']}"
            + (f", guidance {r['cfg_scale']:g}" if "cfg_scale" in r else "") + f"): {r['comparison']}"
            for r in rows if r["status"] == "ok" and r["comparison"]]


def _summary(rows: list[dict], device_type: str) -> list[str]:
    """The headline comparison of one (model, batch) group: the fastest MaskDiT-50% against the DiT of
    its own policy and the highest-MFU DiT with kernels, checked against the issue's GPU targets for
    XL/2 at batch 64; then every refused comparison."""
    ok = [r for r in rows if r["status"] == "ok"]
    on_target = device_type == "cuda" and rows and (rows[0]["model"], rows[0]["batch"]) == GPU_TARGETS

    def verdict(met: bool) -> str:
        return (" (target met)" if met else " (target missed)") if on_target else ""

    lines = []
    masked = [r for r in ok if r["arch"] == "maskdit" and r["mask_ratio"] == 0.5 and r["compared"] == "arch"]
    if masked:
        best = max(masked, key=lambda r: r["images_per_s"])
        speedup, memory = best["speedup_vs_baseline"], best["memory_vs_baseline"]
        base = best["baseline_variant"]
        lines.append(f"- fastest MaskDiT (50% masked): `{best['variant']}`, {speedup:.2f}× the images/s of `{base}` "
                     f"(the same policy: autocast {best['autocast']}, residual {best['residual_dtype']}, "
                     f"{best['attention']} attention, kernels {'on' if best['kernels'] else 'off'}, "
                     f"compile {'on' if best['compile'] else 'off'}) with {memory:.2f}× its peak memory"
                     + verdict(speedup >= 2.5 and memory <= 0.6))
    dit_kernels = [r for r in ok if r["arch"] == "dit" and r["kernels"]]
    if dit_kernels:
        best = max(dit_kernels, key=lambda r: r["mfu"])
        lines.append(f"- highest-MFU DiT with kernels: `{best['variant']}`, MFU {best['mfu']:.1%}"
                     + verdict(best["mfu"] >= 0.5))
    if on_target:
        lines.append("- targets (issue 6): MaskDiT-XL/2 ≥ 2.5× the images/s of DiT-XL/2 at ≤ 0.6× its peak "
                     "memory; DiT-XL/2 with kernels ≥ 50% MFU")
    return lines + refusals(rows)


def _sweep_section(report: dict) -> list[str]:
    """The batch sweep: a table of images/s and memory per (variant, batch), the crossover sentences and
    the largest batch within the memory budget."""
    rows = report["sweep"]
    if not rows:
        return []
    batches = sorted({r["batch"] for r in rows})
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    cell = {(r["variant"], r["batch"]): r for r in rows}

    def show(r: dict | None) -> str:
        if r is None:
            return ""
        if r["status"] != "ok":
            return f"**{r['status']}**"
        ratio = f", {r['speedup_vs_baseline']:.2f}×" if r["compared"] == "arch" else (
            ", ⚠ no ratio" if r["comparison"] else "")
        return f"{r['images_per_s']:.4g}{ratio} · {r['peak_allocated_gib']:.3g} GiB"

    lines = [f"## Batch sweep: {rows[0]['model']}", "",
             "Training images/s, for MaskDiT its ratio to the DiT of the same policy, and peak memory, "
             "per per-device batch (chart: `sweep.png`).", "",
             "| variant | " + " | ".join(f"batch {b}" for b in batches) + " |",
             "|---|" + "--:|" * len(batches)]
    lines += [f"| `{v}` | " + " | ".join(show(cell.get((v, b))) for b in batches) + " |" for v in variants]
    lines += ["", *[f"- {line}" for line in sweep_crossovers(rows)], *refusals(rows)]
    if report["max_batch"]:
        budget = report["max_batch"][0]["budget_gib"]
        found = ", ".join(f"`{m['variant']}` {m['largest_batch']}"
                          + " (the search limit)" * (m["largest_batch"] == m["limit"]) for m in report["max_batch"])
        lines.append(f"- largest batch within {budget:.1f} GiB (found by trying, to within 1/16): {found}")
    elif report["device"]["type"] != "cuda":
        lines.append("- largest batch in a memory budget: searched on CUDA only (a CPU has no out-of-memory "
                     "error to catch)")
    return lines + [""]


def sweep_crossovers(rows: list[dict]) -> list[str]:
    """One crossover sentence per MaskDiT sweep variant, against the DiT of its policy."""
    from .sweep import crossover

    sentences = []
    for variant in dict.fromkeys(r["variant"] for r in rows if r["arch"] == "maskdit"):
        mine = [r for r in rows if r["variant"] == variant and r["compared"] == "arch"]
        points = [(r["batch"], r["speedup_vs_baseline"]) for r in mine]
        base = next((r["baseline_variant"] for r in rows if r["variant"] == variant and r["baseline"]), "dit")
        sentences.append(crossover(points, variant, base))
    return sentences


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
        "Every row states its policy: autocast dtype, the residual stream's dtype (measured by forward hooks "
        "on the blocks, not assumed), attention backend, kernels, compile. A ratio (× columns) divides a row "
        "by the row of the same table that differs from it in exactly one aspect, named in *compared with*: "
        "a MaskDiT by the DiT of the same policy (arch), a DiT by the DiT with its last setting undone. Where "
        "the measured policies differ in more than that aspect the ratio is refused (⚠ no ratio) and the "
        "reason is given. Plain `dit`: kernels off (PyTorch reference ops), SDPA attention, eager, "
        f"{'bf16 autocast' if device['type'] == 'cuda' else 'fp32'}." + (
            "" if device["type"] == "cuda" else
            " On a CPU `+kernels` runs the Triton kernels in Triton's interpreter: a test of the code path, "
            "not of speed."), "",
    ]
    groups: dict[tuple, list[dict]] = {}
    for row in report["train"]:
        groups.setdefault((row["model"], row["batch"]), []).append(row)
    for (model, batch), rows in groups.items():
        lines += [f"## Training: {model}, batch {batch}", "", *_train_table(rows), "", *_plan_table(rows),
                  *_summary(rows, device["type"]), ""]
    if report["sample"]:
        first = report["sample"][0]
        lines += [f"## Sampling: Heun, {first['num_steps']} steps ({first['nfe']} network evaluations), "
                  f"batch {first['batch']}", "",
                  "Guidance runs the network on twice the batch; a guided `dit` is compared with `dit` unguided "
                  "(guidance), every other row with the row of the same guidance that differs in one aspect.", "",
                  f"| model | variant | {POLICY_HEAD} | guidance | s / run | img/s | compared with (one change) "
                  "| × img/s | peak alloc GiB |",
                  "|---|---|---|---|---|---|---|--:|--:|--:|---|--:|--:|"]
        for r in report["sample"]:
            cells = (f"{_fmt(r['run_s'], '.4g')} | {_fmt(r['images_per_s'], '.4g')} | {_versus(r)} | "
                     f"{_fmt(r['speedup_vs_baseline'], '.2f', '×')} | {_fmt(r['peak_allocated_gib'], '.3g')}"
                     if r["status"] == "ok" else f"**{r['status']}** | | | |")
            lines.append(f"| {r['model']} | `{r['variant']}` | {_policy_cells(r)} | {r['cfg_scale']:g} | {cells} |")
        lines += ["", *refusals(report["sample"]), ""]
    lines += _sweep_section(report)
    lines += ["Variants: `dit` / `maskdit` (no masking) / `maskNN` (MaskDiT training with NN% of the tokens masked), "
              "then `+kernels` (Triton kernels on), an attention backend (default `sdpa`), `+compile`, "
              "a precision other than the default. FLOPs from `torch.utils.flop_counter`: *fwd* and *train* "
              "count 2 FLOPs per multiply-add (what MFU divides by the hardware peak; train = forward + "
              "backward); *DiT-paper* counts a multiply-add as one FLOP, forward only, as the DiT paper's "
              "Gflops do (118.6 for DiT-XL/2 at 256 px; docs/benchmarks.md)."]
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
    parser.add_argument("--sweep-batch",
                        help="comma-separated per-device batches of the batch sweep of the first model, or 'none' "
                             "(default: 8..256 on CUDA, 1..8 on a CPU)")
    parser.add_argument("--sweep-variants", help="comma-separated variants of the sweep (default: dit and mask50, "
                                                 "kernels off and on on CUDA); same-policy DiTs are added")
    parser.add_argument("--memory-budget", type=float, metavar="GIB",
                        help="CUDA: find each sweep variant's largest batch within this many GiB by trying "
                             "(default: the device's memory; 0: no search)")
    parser.add_argument("--plan", choices=("auto", "on", "off"), default="auto",
                        help="the memory planner's columns per training row: planned peak and largest micro-batch "
                             "on an A100-80GB and an H100-80GB (auto: on unless the run is on CUDA)")
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
