"""One benchmark run: every (model, batch, variant) training step and sampler, measured in this
process, each row stating its policy, every ratio taken against a row of the same run that
differs in one aspect only (``benchmarks/policy.py``); then the batch sweep (``benchmarks/sweep.py``).
"""
from __future__ import annotations

import contextlib
import gc
import statistics
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from .configs import BASELINE, ModelSpec, Variant, default_sample_variants, default_train_variants, parse_variants
from .measure import (Flops, PeakMemory, count_flops, git_state, machine, matmul_peak_tflops, synchronize, time_calls,
                      versions)
from .planned import plan_row
from .policy import AUTOCAST, Policy, compare, intended_baseline, with_same_policy_baselines
from .sweep import fits_by_trying, largest_batch
from .workloads import Sampler, TrainStep, variant_settings

SCHEMA = "maskdit_fast-benchmarks/2"
ROOT = Path(__file__).resolve().parents[1]
# Defaults per mode; every one can be overridden (``resolve_settings``).
DEFAULTS = {
    "cuda": {"models": "XL/2", "batch": "64", "warmup": 10, "steps": 30, "sample_steps": 40, "sample_reps": 3,
             "matmul_size": 8192, "compile_backend": "inductor", "threads": 0,
             "sweep_batch": "8,16,32,64,128,256", "sweep_variants": "dit,dit+kernels,mask50,mask50+kernels"},
    # On a CPU kernels-on variants run in Triton's interpreter: the sweep leaves them out.
    "cpu": {"models": "S/2", "batch": "4", "warmup": 2, "steps": 5, "sample_steps": 4, "sample_reps": 1,
            "matmul_size": 1024, "compile_backend": "aot_eager", "threads": 0,
            "sweep_batch": "1,2,4,8", "sweep_variants": "dit,mask50"},
    "tiny": {"models": "tiny/2", "batch": "2", "warmup": 1, "steps": 3, "sample_steps": 2, "sample_reps": 1,
             "matmul_size": 128, "compile_backend": "aot_eager", "threads": 1,
             "sweep_batch": "1,4", "sweep_variants": "dit,mask50"},
}
MAX_BATCH_LIMIT = 4096  # the largest-batch search stops there


@dataclass
class Settings:
    """What to run and how long; see ``python -m benchmarks.report --help``."""

    device: str  # cuda | cpu
    models: list[str]
    batches: list[int]
    variants: list[str]
    sample_variants: list[str]  # empty: no sampling
    warmup: int
    steps: int
    sample_batch: int
    sample_steps: int
    sample_reps: int
    cfg_scale: float
    compile_backend: str
    matmul_size: int
    threads: int  # torch CPU threads; 0 = torch's default
    tiny: bool = False
    sweep_batches: list[int] = field(default_factory=list)  # empty: no batch sweep
    sweep_variants: list[str] = field(default_factory=list)
    memory_budget_gib: float | None = None  # CUDA: largest-batch search within this (None: no search)
    plan: bool = False  # the memory planner's columns for each training row (benchmarks/planned.py)


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def resolve_settings(device: str = "auto", tiny: bool = False, models: str | None = None, batch: str | None = None,
                     variants: str = "default", sample_variants: str = "default", warmup: int | None = None,
                     steps: int | None = None, sample_batch: int | None = None, sample_steps: int | None = None,
                     sample_reps: int | None = None, cfg_scale: float = 1.5, compile_backend: str | None = None,
                     matmul_size: int | None = None, threads: int | None = None, sweep_batch: str | None = None,
                     sweep_variants: str | None = None, memory_budget: float | None = None,
                     plan: str = "auto") -> Settings:
    """Settings from command-line style strings (``None``: the mode's default); checks every name.

    ``variants``/``sample_variants``: comma-separated names, ``default`` (or ``none`` for sampling).
    ``sweep_batch``: comma-separated batches of the sweep (``none``: no sweep), each running
    ``sweep_variants`` on the first model. ``memory_budget``: GiB for the largest-batch search
    (CUDA only; default: the device's memory; 0: no search). ``plan``: the memory planner's columns
    (``on`` | ``off`` | ``auto``: on off CUDA, where they are the only GPU figures).
    Raises ValueError naming what is wrong.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda: no CUDA device is visible")
    given = {"models": models, "batch": batch, "warmup": warmup, "steps": steps, "sample_steps": sample_steps,
             "sample_reps": sample_reps, "matmul_size": matmul_size, "compile_backend": compile_backend,
             "threads": threads, "sweep_batch": sweep_batch, "sweep_variants": sweep_variants}
    opts = {k: given[k] if given[k] is not None else v for k, v in DEFAULTS["tiny" if tiny else device].items()}
    try:
        batches = [int(b) for b in _csv(opts["batch"])]
        sweep_batches = [] if opts["sweep_batch"] == "none" else sorted({int(b) for b in _csv(opts["sweep_batch"])})
    except ValueError:
        raise ValueError(f"batch {opts['batch']!r} / sweep batch {opts['sweep_batch']!r}: comma-separated "
                         "integers expected") from None
    if memory_budget is None and device == "cuda":
        memory_budget = torch.cuda.get_device_properties(0).total_memory / 2**30
    if memory_budget is not None and memory_budget < 0:
        raise ValueError(f"memory budget {memory_budget}: GiB >= 0 expected (0: no search)")
    train_names = default_train_variants(device, tiny) if variants == "default" else _csv(variants)
    if sample_variants == "default":
        sample_names = default_sample_variants(device, tiny)
    else:
        sample_names = [] if sample_variants == "none" else _csv(sample_variants)
    settings = Settings(device=device, models=_csv(opts["models"]), batches=batches, variants=train_names,
                        sample_variants=sample_names, warmup=opts["warmup"], steps=opts["steps"],
                        sample_batch=sample_batch or batches[0], sample_steps=opts["sample_steps"],
                        sample_reps=opts["sample_reps"], cfg_scale=cfg_scale, compile_backend=opts["compile_backend"],
                        matmul_size=opts["matmul_size"], threads=opts["threads"], tiny=tiny,
                        sweep_batches=sweep_batches, sweep_variants=_csv(opts["sweep_variants"]),
                        memory_budget_gib=memory_budget if device == "cuda" and memory_budget else None,
                        plan=plan == "on" or (plan == "auto" and device != "cuda"))
    if plan not in ("auto", "on", "off"):
        raise ValueError(f"plan {plan!r}: auto, on or off")
    for name in settings.models:
        ModelSpec.parse(name)
    parse_variants(settings.variants, device)
    parse_variants(settings.sample_variants, device, sampling=True)
    parse_variants(settings.sweep_variants, device)
    counts = [settings.steps, settings.sample_batch, settings.sample_reps, settings.sample_steps]
    if min(batches + sweep_batches + counts) < 1 \
            or settings.warmup < 0:
        raise ValueError("batch sizes, steps and repetitions must be positive (warm-up >= 0)")
    return settings


@dataclass
class Row:
    """Fields shared by training and sampling rows."""

    id: str
    model: str
    batch: int
    variant: str
    arch: str
    mask_ratio: float
    kernels: bool
    attention: str
    compile: bool
    precision: str
    status: str = "ok"  # ok | oom | error: <message>
    images_per_s: float | None = None
    peak_allocated_gib: float | None = None
    peak_reserved_gib: float | None = None
    autocast: str = ""  # bf16 | fp16 | off
    residual_dtype: str | None = None  # measured by hooks on the blocks (None: the configuration failed first)
    baseline: str | None = None  # id of the row the ratios divide by (same run)
    baseline_variant: str | None = None  # that row's variant
    compared: str | None = None  # the one aspect in which this row differs from its baseline
    comparison: str = ""  # "" when the ratios are taken, else why not (policies differ in more than one aspect)
    speedup_vs_baseline: float | None = None  # images/s over the baseline's

    @classmethod
    def of(cls, row_id: str, spec: ModelSpec, batch: int, variant: Variant, **fields) -> Row:
        settings = {k: v for k, v in asdict(variant).items() if k != "name"}
        return cls(id=row_id, model=spec.name, batch=batch, variant=variant.name, **settings,
                   autocast=AUTOCAST[variant.precision], **fields)

    def policy(self) -> Policy:
        head = self.variant.split("+")[0]
        return Policy(head, self.autocast, self.residual_dtype, self.attention, self.kernels, self.compile)


@dataclass
class TrainRow(Row):
    step_ms: float | None = None  # median
    step_ms_all: list[float] = field(default_factory=list)
    fwd_flops_per_image: float | None = None
    fwd_macs_per_image: float | None = None
    dit_paper_gflops_per_image: float | None = None  # forward MACs: the DiT paper's "Gflops" (measure.Flops)
    train_flops_per_image: float | None = None  # forward + backward
    achieved_tflops: float | None = None
    mfu: float | None = None  # achieved / measured matmul peak of the row's precision
    memory_vs_baseline: float | None = None  # peak allocated over the baseline's
    planned_peak_gib: float | None = None  # the memory planner's peak of this row on a GPU (benchmarks/planned.py)
    planned_largest_micro_batch: dict[str, int] | None = None  # per GPU


@dataclass
class SampleRow(Row):
    cfg_scale: float = 1.0
    num_steps: int = 0
    nfe: int = 0  # network evaluations per run (each on 2x the batch with guidance)
    run_s: float | None = None  # median seconds of one sampler run
    run_s_all: list[float] = field(default_factory=list)


def prepare(settings: Settings) -> torch.device:
    """Process-wide settings of a run (CPU threads, TF32 as the trainer); returns the device."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if settings.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return torch.device(settings.device)


@contextlib.contextmanager
def isolated(device: torch.device, variant: Variant) -> Iterator[PeakMemory]:
    """One configuration's scope: frees what earlier ones left (memory, compiled graphs), resets the
    peak-memory counters, seeds the RNG and applies the variant's kernels and attention settings."""
    gc.collect()
    torch.compiler.reset()  # fresh compiles per configuration: no stale guards or recompile limits
    memory = PeakMemory(device)
    memory.reset()
    torch.manual_seed(0)
    with variant_settings(variant):
        yield memory


def _failure(err: Exception) -> str:
    """The status of a configuration that raised ``err`` (the traceback goes to stderr unless OOM)."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return "oom"
    traceback.print_exc()
    return f"error: {type(err).__name__}: {err}".splitlines()[0][:300]


def throughput(batch: int, step_ms: float, flops: Flops, peak_tflops: float) -> tuple[float, float, float]:
    """(images/s, achieved TFLOP/s, MFU) of a training step of ``step_ms`` on ``batch`` images."""
    images_per_s = batch / (step_ms / 1e3)
    achieved = flops.train * images_per_s / 1e12
    return images_per_s, achieved, achieved / peak_tflops


def measure_train(spec: ModelSpec, variant: Variant, batch: int, settings: Settings, device: torch.device,
                  peak_tflops: dict[str, float], flops: dict) -> TrainRow:
    """Median step time, images/s, peak memory, FLOPs and MFU of one training configuration."""
    row = TrainRow.of(f"train/{spec.name}/b{batch}/{variant.name}", spec, batch, variant)
    key = (spec.name, variant.arch, variant.mask_ratio)
    if key not in flops:
        flops[key] = count_flops(spec.config(variant.arch, variant.mask_ratio), variant.mask_ratio)
    count = flops[key]
    row.fwd_flops_per_image, row.fwd_macs_per_image = count.forward, count.forward / 2
    row.dit_paper_gflops_per_image = count.dit_paper / 1e9
    row.train_flops_per_image = count.train
    try:
        with isolated(device, variant) as memory:
            step = TrainStep(spec, variant, batch, device, settings.compile_backend)
            row.residual_dtype = step.residual_dtype
            times = time_calls(step, device, settings.warmup, settings.steps)
            row.peak_allocated_gib, row.peak_reserved_gib = memory.read()
    except Exception as err:  # one failing configuration (OOM, a compile error) must not lose the run
        row.status = _failure(err)
        return row
    row.step_ms, row.step_ms_all = statistics.median(times), times
    row.images_per_s, row.achieved_tflops, row.mfu = throughput(batch, row.step_ms, count,
                                                                peak_tflops[variant.precision])
    return row


def peak_after_steps(spec: ModelSpec, variant: Variant, batch: int, settings: Settings, device: torch.device) -> float:
    """Peak allocated GiB of two training steps at ``batch`` (raises ``torch.cuda.OutOfMemoryError``
    when they do not fit); the configuration's memory is freed before returning."""
    step = None
    try:
        with isolated(device, variant) as memory:
            step = TrainStep(spec, variant, batch, device, settings.compile_backend)
            step()
            step()
            synchronize(device)
            return memory.read()[0]
    finally:
        del step
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def measure_sample(spec: ModelSpec, variant: Variant, settings: Settings, device: torch.device,
                   cfg_scale: float) -> SampleRow:
    """Median time and images/s of full Heun sampler runs (warmed up by a 2-step run)."""
    batch = settings.sample_batch
    row = SampleRow.of(f"sample/{spec.name}/b{batch}/{variant.name}/cfg{cfg_scale:g}", spec, batch, variant,
                       cfg_scale=cfg_scale, num_steps=settings.sample_steps, nfe=2 * settings.sample_steps - 1)
    try:
        with isolated(device, variant) as memory:
            sampler = Sampler(spec, variant, batch, device, settings.sample_steps, cfg_scale,
                              settings.compile_backend)
            row.residual_dtype = sampler.residual_dtype
            sampler(num_steps=2)
            times = time_calls(sampler, device, 0, settings.sample_reps)
            row.peak_allocated_gib, row.peak_reserved_gib = memory.read()
    except Exception as err:  # as in measure_train
        row.status = _failure(err)
        return row
    row.run_s_all = [t / 1e3 for t in times]
    row.run_s = statistics.median(row.run_s_all)
    row.images_per_s = batch / row.run_s
    return row


def add_ratios(rows: list[TrainRow] | list[SampleRow], device_type: str) -> None:
    """Set each row's baseline, the aspect it compares and, when the measured policies differ in
    that aspect only, its ratios (``benchmarks/policy.py``). A guided sampling row of the plain
    ``dit`` is compared with ``dit`` unguided (same policy; guidance doubles the network's batch)."""
    def key(row: Row, variant: str, cfg: float | None) -> tuple:
        return row.model, row.batch, variant, cfg

    by_key = {key(row, row.variant, getattr(row, "cfg_scale", None)): row for row in rows}
    for row in rows:
        cfg = getattr(row, "cfg_scale", None)
        found = intended_baseline(Variant.parse(row.variant, device_type), device_type)
        if found is not None:
            base_key, aspect = key(row, found[0].name, cfg), found[1]
        elif cfg not in (None, 1.0):
            base_key, aspect = key(row, row.variant, 1.0), "guidance"
        else:
            base_key, aspect = key(row, row.variant, cfg), None
        base = by_key.get(base_key)
        row.baseline, row.baseline_variant = (None, None) if base is None else (base.id, base.variant)
        if row.status != "ok":
            continue
        ok_base = base is not None and base.status == "ok"
        verdict = compare(row.policy(), base.policy() if ok_base else None, aspect)
        row.compared, row.comparison = verdict.aspect, verdict.note
        if not ok_base or not verdict.ok:
            continue
        row.speedup_vs_baseline = row.images_per_s / base.images_per_s
        if isinstance(row, TrainRow):
            row.memory_vs_baseline = row.peak_allocated_gib / base.peak_allocated_gib


def run(settings: Settings, command: str, log: Callable[[str], None] = lambda message: None) -> dict:
    """Measure everything ``settings`` asks for; returns the report (a JSON-ready dict)."""
    device = prepare(settings)
    specs = [ModelSpec.parse(name) for name in settings.models]
    variants = with_same_policy_baselines(parse_variants(settings.variants, device.type), device.type)
    sample_variants = with_same_policy_baselines(
        parse_variants(settings.sample_variants, device.type, sampling=True), device.type) \
        if settings.sample_variants else []
    report = {"schema": SCHEMA, "run_id": uuid.uuid4().hex, "command": command,
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "device": machine(device), "versions": versions(), "git": git_state(ROOT),
              "settings": asdict(settings), "baseline": BASELINE}

    peak_tflops = {}
    for precision in sorted({v.precision for v in variants}):
        peak_tflops[precision] = matmul_peak_tflops(device, precision, settings.matmul_size, reps=10)
        log(f"matmul peak {precision}: {peak_tflops[precision]:.2f} TFLOP/s")
    report["matmul_peak_tflops"] = peak_tflops

    train_rows: list[TrainRow] = []
    flops: dict = {}
    for spec in specs:
        for batch in settings.batches:
            for variant in variants:
                row = measure_train(spec, variant, batch, settings, device, peak_tflops, flops)
                log(f"train  {spec.name:7} b{batch:<4} {variant.name:36} " + (
                    f"{row.images_per_s:9.2f} img/s  {row.peak_allocated_gib:7.2f} GiB  MFU {row.mfu:6.1%}"
                    if row.status == "ok" else row.status))
                train_rows.append(row)
    add_ratios(train_rows, device.type)
    if settings.plan:
        for row in train_rows:
            row.planned_peak_gib, row.planned_largest_micro_batch = plan_row(
                ModelSpec.parse(row.model), Variant.parse(row.variant, device.type), row.batch).values()
            log(f"plan   {row.model:7} b{row.batch:<4} {row.variant:36} {row.planned_peak_gib:7.2f} GiB on a GPU, "
                f"largest micro-batch {row.planned_largest_micro_batch}")

    sample_rows: list[SampleRow] = []
    for spec in specs:
        for variant in sample_variants:
            for cfg_scale in dict.fromkeys([1.0, settings.cfg_scale]):
                row = measure_sample(spec, variant, settings, device, cfg_scale)
                log(f"sample {spec.name:7} b{row.batch:<4} {variant.name:36} cfg {cfg_scale:<4g} " + (
                    f"{row.images_per_s:9.2f} img/s" if row.status == "ok" else row.status))
                sample_rows.append(row)
    add_ratios(sample_rows, device.type)

    report["train"] = [asdict(row) for row in train_rows]
    report["sample"] = [asdict(row) for row in sample_rows]
    report["sweep"], report["max_batch"] = sweep(settings, specs[0], device, peak_tflops, flops, log)
    return report


def sweep(settings: Settings, spec: ModelSpec, device: torch.device, peak_tflops: dict[str, float], flops: dict,
          log: Callable[[str], None]) -> tuple[list[dict], list[dict]]:
    """The batch sweep of ``spec`` (every sweep variant at each batch in turn, so that drift hits them
    alike; ratios as in the main table) and, with a memory budget (CUDA), each variant's largest
    batch within it, found by trying. Returns (sweep rows, largest-batch records)."""
    if not settings.sweep_batches:
        return [], []
    variants = with_same_policy_baselines(parse_variants(settings.sweep_variants, device.type), device.type)
    for precision in {v.precision for v in variants} - set(peak_tflops):
        peak_tflops[precision] = matmul_peak_tflops(device, precision, settings.matmul_size, reps=10)
    rows: list[TrainRow] = []
    for batch in settings.sweep_batches:
        for variant in variants:
            row = measure_train(spec, variant, batch, settings, device, peak_tflops, flops)
            measured = f"{row.images_per_s:9.2f} img/s  {row.peak_allocated_gib:7.2f} GiB" if row.status == "ok" else ""
            log(f"sweep  {spec.name:7} b{batch:<4} {variant.name:36} " + (measured or row.status))
            rows.append(row)
    add_ratios(rows, device.type)
    largest = []
    if settings.memory_budget_gib:
        for variant in variants:
            fits = fits_by_trying(lambda b, v=variant: peak_after_steps(spec, v, b, settings, device),
                                  settings.memory_budget_gib)
            batch, tries = largest_batch(fits, start=settings.sweep_batches[0], limit=MAX_BATCH_LIMIT)
            log(f"largest batch within {settings.memory_budget_gib:.1f} GiB: {variant.name} {batch} (tried {tries})")
            largest.append({"model": spec.name, "variant": variant.name, "budget_gib": settings.memory_budget_gib,
                            "largest_batch": batch, "limit": MAX_BATCH_LIMIT, "tries": tries})
    return [asdict(row) for row in rows], largest
