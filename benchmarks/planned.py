"""What the memory planner says about a benchmark row on a GPU: the planned peak of its training step
at its batch, and the largest micro-batch that fits an A100-80GB and an H100-80GB (powers of two up
to 1024), on the CUDA code path (bf16 autocast, or the row's fp16; Triton ops as the row's kernels),
from fake tensors: a CPU-only report says something about XL/2 on those GPUs (docs/planning.md)."""
from __future__ import annotations

import dataclasses

from maskdit_fast.config import Config, LossConfig, TrainConfig
from maskdit_fast.plan.gpus import DEFAULT_RESERVE_GB, GIB, gpu_named
from maskdit_fast.plan.search import PlanCache, largest_micro_batch

from .configs import ModelSpec, Variant

GPUS = ("a100-80gb", "h100-80gb")
SEARCH_BATCH = 1024  # the largest micro-batch is searched among the divisors of this: powers of two


def row_config(spec: ModelSpec, variant: Variant, batch: int) -> Config:
    """The training config of a row, for one GPU and one micro-batch of ``batch``."""
    model = dataclasses.replace(spec.config(variant.arch, variant.mask_ratio),
                                kernels="triton" if variant.kernels else "reference")
    precision = "fp16" if variant.precision == "fp16" else "bf16"
    return Config(model=model, loss=LossConfig(), train=TrainConfig(global_batch=batch, precision=precision))


def plan_row(spec: ModelSpec, variant: Variant, batch: int) -> dict:
    """``planned_peak_gib`` at ``batch`` and ``planned_largest_micro_batch`` per GPU (0: not even one)."""
    cached = PlanCache()  # the two GPUs' searches share their probes
    peak = cached(row_config(spec, variant, batch), 1, batch).peak
    search = row_config(spec, variant, SEARCH_BATCH)
    reserve = int(DEFAULT_RESERVE_GB * GIB)
    largest = {g: largest_micro_batch(search, 1, gpu_named(g).memory_bytes, reserve, plan=cached).micro_batch
               for g in GPUS}
    return {"planned_peak_gib": peak / GIB, "planned_largest_micro_batch": largest}
