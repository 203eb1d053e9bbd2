"""Charts of a report (matplotlib): bars of training throughput and peak memory per model, sampling
throughput; lines of the batch sweep (images/s, peak memory, MaskDiT over its same-policy DiT)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def _grouped_bars(ax, rows: list[dict], label_of, value_key: str, ylabel: str, title: str) -> None:
    """One group of bars per model, one bar per label, in first-seen order; failed rows (OOM) leave a gap."""
    models = list(dict.fromkeys(row["model"] for row in rows))
    labels = list(dict.fromkeys(label_of(row) for row in rows))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        xs, heights = [], []
        for j, model in enumerate(models):
            match = [r for r in rows if r["model"] == model and label_of(r) == label and r["status"] == "ok"]
            if match:
                xs.append(j - 0.4 + (i + 0.5) * width)
                heights.append(match[0][value_key])
        bars = ax.bar(xs, heights, width, label=label)
        ax.bar_label(bars, fmt="%.3g", fontsize=6, rotation=90, padding=2)
    ax.set_xticks(range(len(models)), models)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.margins(y=0.2)


def _figure(n_panels: int, n_bars: int):
    """A column of ``n_panels`` axes wide enough for ``n_bars`` bars each, room for a legend on the right."""
    width = 3.0 + max(4.0, 1.0 + 0.25 * n_bars)
    return plt.subplots(n_panels, 1, figsize=(width, 1.0 + 3.8 * n_panels), squeeze=False, layout="constrained")


def _save(fig, axes, title: str, path: Path) -> Path:
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside right upper", fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_report(report: dict, out_dir: Path) -> list[Path]:
    """Write ``throughput.png``, ``memory.png`` and (with sampling rows) ``sampling.png``; returns their paths."""
    device = report["device"]["name"]
    written = []
    train = report["train"]
    batches = list(dict.fromkeys(row["batch"] for row in train))
    n_variants = len({row["variant"] for row in train})
    memory_label = "peak allocated (GiB)" if report["device"]["type"] == "cuda" else "peak RSS growth (GiB)"
    for name, key, ylabel, what in (("throughput.png", "images_per_s", "images / s", "Training throughput"),
                                    ("memory.png", "peak_allocated_gib", memory_label, "Training peak memory")):
        fig, axes = _figure(len(batches), n_variants * len({row["model"] for row in train}))
        for ax, batch in zip(axes[:, 0], batches):
            rows = [row for row in train if row["batch"] == batch]
            _grouped_bars(ax, rows, lambda row: row["variant"], key, ylabel, f"{what}, batch {batch}")
        written.append(_save(fig, axes, device, out_dir / name))
    if report.get("sweep"):
        written.append(plot_sweep(report, out_dir / "sweep.png"))
    sample = report["sample"]
    if sample:
        def label(row: dict) -> str:
            return row["variant"] + (f" cfg {row['cfg_scale']:g}" if row["cfg_scale"] != 1 else "")

        n_labels = len({label(row) for row in sample})
        fig, axes = _figure(1, n_labels * len({row["model"] for row in sample}))
        _grouped_bars(axes[0][0], sample, label, "images_per_s", "images / s",
                      f"Heun sampler, {sample[0]['num_steps']} steps, batch {sample[0]['batch']}")
        written.append(_save(fig, axes, device, out_dir / "sampling.png"))
    return written


def plot_sweep(report: dict, path: Path) -> Path:
    """``sweep.png``: images/s, peak memory and MaskDiT's speed ratio to the DiT of its policy, each
    against the per-device batch (log 2 axes), one line per variant; OOM points are left out and the
    largest batch within the memory budget (CUDA) is marked on the memory panel."""
    rows = [row for row in report["sweep"] if row["status"] == "ok"]
    variants = list(dict.fromkeys(row["variant"] for row in report["sweep"]))
    memory_label = "peak allocated (GiB)" if report["device"]["type"] == "cuda" else "peak RSS growth (GiB)"
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4), layout="constrained")
    for variant in variants:
        mine = sorted((row for row in rows if row["variant"] == variant), key=lambda row: row["batch"])
        style = {"marker": "o", "linestyle": "-" if variant.startswith("dit") else "--", "label": variant}
        axes[0].plot([r["batch"] for r in mine], [r["images_per_s"] for r in mine], **style)
        line, = axes[1].plot([r["batch"] for r in mine], [r["peak_allocated_gib"] for r in mine], **style)
        for found in report.get("max_batch", []):
            if found["variant"] == variant and found["largest_batch"]:
                axes[1].axvline(found["largest_batch"], color=line.get_color(), linestyle=":", linewidth=1)
        ratios = [r for r in mine if r["compared"] == "arch" and r["speedup_vs_baseline"] is not None]
        if ratios:
            axes[2].plot([r["batch"] for r in ratios], [r["speedup_vs_baseline"] for r in ratios],
                         **{**style, "label": f"{variant} / {ratios[0]['baseline_variant']}"})
    if report.get("max_batch"):
        axes[1].axhline(report["max_batch"][0]["budget_gib"], color="grey", linewidth=1)
    axes[2].axhline(1.0, color="grey", linewidth=1)
    titles = ("Training throughput", "Training peak memory" + (" (dotted: largest batch in budget)"
                                                               if report.get("max_batch") else ""),
              "MaskDiT speed over the DiT of its policy")
    batches = sorted({row["batch"] for row in report["sweep"]})
    for ax, ylabel, title in zip(axes, ("images / s", memory_label, "× images / s"), titles):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel("per-device batch")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, frameon=False)
    axes[0].set_yscale("log")
    fig.suptitle(f"Batch sweep, {report['sweep'][0]['model']}: {report['device']['name']}", fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
