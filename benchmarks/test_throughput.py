"""Training-step and sampler throughput as pytest-benchmark cases (options: ``benchmarks/conftest.py``).

Each case's ``extra_info`` holds its policy (autocast, measured residual-stream dtype), images/s,
peak allocated/reserved GiB, model FLOPs and MACs per image, MFU against the measured matmul peak,
and, for MaskDiT, the ratios to the DiT of the same policy measured earlier in the same session
(it is parametrized first; deselect it and the ratios are left out; a different measured residual
dtype refuses them); a summary table of them ends the run. Full reports (JSON, markdown, charts) are
``python -m benchmarks.report``'s job.
"""
from __future__ import annotations

import torch

from benchmarks.measure import count_flops, synchronize
from benchmarks.policy import AUTOCAST
from benchmarks.run import isolated, throughput
from benchmarks.workloads import Sampler, TrainStep


def test_train_step(request, benchmark, train_case, bench_settings, matmul_peak, record):
    spec, batch, variant = train_case
    device = torch.device(bench_settings.device)
    flops = count_flops(spec.config(variant.arch, variant.mask_ratio), variant.mask_ratio)
    benchmark.group = f"train {spec.name} batch {batch}"
    with isolated(device, variant) as memory:
        step = TrainStep(spec, variant, batch, device, bench_settings.compile_backend)

        def synchronized_step() -> None:
            step()
            synchronize(device)

        benchmark.pedantic(synchronized_step, warmup_rounds=bench_settings.warmup, rounds=bench_settings.steps,
                           iterations=1)
        allocated, reserved = memory.read()
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing timed
        return
    step_ms = benchmark.stats.stats.median * 1e3
    images_per_s, achieved, mfu = throughput(batch, step_ms, flops, matmul_peak(variant.precision))
    info = {"variant": variant.name, "precision": variant.precision, "autocast": AUTOCAST[variant.precision],
            "residual_dtype": step.residual_dtype, "step_ms": step_ms,
            "images_per_s": images_per_s, "peak_allocated_gib": allocated, "peak_reserved_gib": reserved,
            "fwd_flops_per_image": flops.forward, "fwd_macs_per_image": flops.forward / 2,
            "train_flops_per_image": flops.train, "achieved_tflops": achieved, "mfu": mfu}
    policy = (variant.kernels, variant.attention, variant.compile, variant.precision)
    record(request.node.name, ("train", spec.name, batch, policy), variant.arch == "dit", info)
    benchmark.extra_info.update(info)


def test_sampler(request, benchmark, sample_case, bench_settings, record):
    spec, variant, cfg_scale = sample_case
    device = torch.device(bench_settings.device)
    batch = bench_settings.sample_batch
    benchmark.group = f"sample {spec.name} batch {batch}, {bench_settings.sample_steps} Heun steps"
    with isolated(device, variant) as memory:
        sampler = Sampler(spec, variant, batch, device, bench_settings.sample_steps, cfg_scale,
                          bench_settings.compile_backend)
        sampler(num_steps=2)  # warm-up (and compile) on a short run

        def synchronized_run() -> None:
            sampler()
            synchronize(device)

        benchmark.pedantic(synchronized_run, rounds=bench_settings.sample_reps, iterations=1)
        allocated, reserved = memory.read()
    if benchmark.stats is None:
        return
    run_s = benchmark.stats.stats.median
    info = {"variant": variant.name, "precision": variant.precision, "autocast": AUTOCAST[variant.precision],
            "residual_dtype": sampler.residual_dtype, "cfg_scale": cfg_scale,
            "num_steps": bench_settings.sample_steps, "nfe": 2 * bench_settings.sample_steps - 1, "run_s": run_s,
            "images_per_s": batch / run_s, "peak_allocated_gib": allocated, "peak_reserved_gib": reserved}
    policy = (variant.kernels, variant.attention, variant.compile, variant.precision, cfg_scale)
    record(request.node.name, ("sample", spec.name, batch, policy), variant.arch == "dit", info)
    benchmark.extra_info.update(info)
