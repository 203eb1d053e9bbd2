"""The README's memory table: planned peak per GPU of DiT-XL/2 and MaskDiT-XL/2 (Triton kernels on and
off) on 8 GPUs under DDP and FSDP, per-GPU batch 32 to 256, without and with activation checkpointing,
and whether it fits an A100-80GB and an H100-80GB. Every cell is a planner run (fake tensors, no GPU).

    python -m benchmarks.plan_table --write     # plans every cell (minutes), writes the JSON and the README
    python -m benchmarks.plan_table             # renders the committed JSON (what the test checks)
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from maskdit_fast.config import load_config
from maskdit_fast.plan.gpus import DEFAULT_RESERVE_GB, GIB, gpu_named
from maskdit_fast.plan.memory import plan_memory

ROOT = Path(__file__).resolve().parents[1]
JSON = ROOT / "benchmarks" / "results" / "plan" / "xl2-memory.json"
README = ROOT / "README.md"
START, END = "<!-- plan-table:start -->", "<!-- plan-table:end -->"
GPUS = ("a100-80gb", "h100-80gb")
BATCHES = (32, 64, 128, 256)
WORLD = 8
ROWS = [(arch, kernels, parallel) for arch in ("dit", "maskdit") for kernels in ("on", "off")
        for parallel in ("ddp", "fsdp")]


def cell_config(arch: str, kernels: str, parallel: str, checkpointing: bool, batch: int):
    return load_config("imagenet256-pretrain", [
        f"model.arch={arch}", *(["model.mask_ratio=0"] if arch == "dit" else []),
        f"model.kernels={'triton' if kernels == 'on' else 'reference'}", f"train.parallel={parallel}",
        f"train.global_batch={batch * WORLD}", f"train.activation_checkpointing={str(checkpointing).lower()}"])


def plan_cell(arch: str, kernels: str, parallel: str, checkpointing: bool, batch: int) -> int:
    """Planned peak (bytes) per GPU of one cell."""
    return plan_memory(cell_config(arch, kernels, parallel, checkpointing, batch), WORLD, batch).peak


def compute() -> dict:
    cells = [{"arch": arch, "kernels": kernels, "parallel": parallel, "activation_checkpointing": ac,
              "batch": batch, "peak": plan_cell(arch, kernels, parallel, ac, batch)}
             for arch, kernels, parallel in ROWS for ac in (False, True) for batch in BATCHES]
    reserve = int(DEFAULT_RESERVE_GB * GIB)
    for cell in cells:
        cell["fits"] = {g: cell["peak"] + reserve <= gpu_named(g).memory_bytes for g in GPUS}
    return {"command": "python -m benchmarks.plan_table --write", "world_size": WORLD, "reserve_bytes": reserve,
            "memory_bytes": {g: gpu_named(g).memory_bytes for g in GPUS}, "cells": cells}


def _mark(fits: dict[str, bool]) -> str:
    a100, h100 = (fits[g] for g in GPUS)
    return "" if a100 and h100 else " ✗" if not (a100 or h100) else " (A100 only)" if a100 else " (H100 only)"


def render(data: dict) -> str:
    """The markdown table of ``data`` (:func:`compute`'s output)."""
    cells = {(c["arch"], c["kernels"], c["parallel"], c["activation_checkpointing"], c["batch"]): c
             for c in data["cells"]}
    reserve = data["reserve_bytes"] / GIB
    lines = [f"Planned peak per GPU, GiB, without / with activation checkpointing, {data['world_size']} GPUs, "
             f"bf16 (`python -m benchmarks.plan_table --write`); ✗: does not fit an A100-80GB nor an H100-80GB "
             f"({reserve:g} GiB kept back for the CUDA context and workspaces).", "",
             "| model | kernels | parallel | " + " | ".join(f"batch {b}" for b in BATCHES) + " |",
             "|---|---|---|" + "--:|" * len(BATCHES)]
    for arch, kernels, parallel in ROWS:
        row = []
        for batch in BATCHES:
            off, on = (cells[(arch, kernels, parallel, ac, batch)] for ac in (False, True))
            row.append(f"{off['peak'] / GIB:.1f}{_mark(off['fits'])} / {on['peak'] / GIB:.1f}{_mark(on['fits'])}")
        name = "MaskDiT-XL/2" if arch == "maskdit" else "DiT-XL/2"
        lines.append(f"| {name} | {kernels} | {parallel.upper()}-{data['world_size']} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def readme_with(table: str, readme: str) -> str:
    """``readme`` with the text between the table's markers replaced by ``table``."""
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if not pattern.search(readme):
        raise SystemExit(f"README.md has no {START} ... {END} section")
    return pattern.sub(lambda _: f"{START}\n{table}\n{END}", readme)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="plan every cell, write the JSON and the README")
    args = parser.parse_args(argv)
    if args.write:
        JSON.parent.mkdir(parents=True, exist_ok=True)
        JSON.write_text(json.dumps(compute(), indent=1) + "\n")
    table = render(json.loads(JSON.read_text()))
    if args.write:
        README.write_text(readme_with(table, README.read_text()))
    print(table)


if __name__ == "__main__":
    main()
