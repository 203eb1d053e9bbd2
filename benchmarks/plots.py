"""Bar charts of a report (matplotlib): training throughput and peak memory per model, sampling throughput."""
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
