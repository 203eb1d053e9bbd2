"""pytest-benchmark front end of the throughput benchmarks (``benchmarks/test_throughput.py``).

    pytest benchmarks/ --benchmark-only                                  # CUDA: XL/2, batch 64; CPU: tiny models
    pytest benchmarks/ --benchmark-only --bench-models B/2,XL/2 --bench-batch 32,64 --bench-variants dit+kernels
    pytest benchmarks/ --benchmark-only --benchmark-json out.json        # extra_info holds img/s, memory, MFU

The ``--bench-*`` options mirror ``python -m benchmarks.report`` and default the same way. The
repository's plain ``pytest`` collects ``tests/`` only, so none of this runs there.
"""
from __future__ import annotations

import functools
import os
from argparse import Namespace
from collections.abc import Callable

import torch

if not torch.cuda.is_available():  # before anything imports triton (kernels-on variants run interpreted)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from benchmarks.configs import ModelSpec, parse_variants  # noqa: E402
from benchmarks.policy import with_same_policy_baselines  # noqa: E402
from benchmarks.measure import matmul_peak_tflops  # noqa: E402
from benchmarks.run import Settings, prepare, resolve_settings  # noqa: E402

SETTINGS = pytest.StashKey[Settings]()
ROWS = pytest.StashKey[list]()  # (case id, extra_info) of every measured case, for the summary
OPTIONS = {  # --bench-NAME: (type, help); None = the mode's default, as in benchmarks.report
    "device": (str, "auto | cuda | cpu"),
    "models": (str, "comma-separated SIZE/PATCH (default: XL/2 on CUDA, tiny/2 on CPU)"),
    "batch": (str, "comma-separated batch sizes"),
    "variants": (str, "comma-separated training variants or 'default' (dit is always added)"),
    "sample_variants": (str, "comma-separated sampling variants, 'default' or 'none'"),
    "warmup": (int, "untimed rounds per training configuration"),
    "steps": (int, "timed rounds per training configuration"),
    "sample_steps": (int, "Heun steps per sampler run"),
    "sample_reps": (int, "timed sampler runs per configuration"),
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("maskdit_fast benchmarks")
    for name, (kind, help_text) in OPTIONS.items():
        group.addoption(f"--bench-{name.replace('_', '-')}", type=kind, default=None, help=help_text)


def pytest_configure(config: pytest.Config) -> None:
    given = Namespace(**{name: config.getoption(f"bench_{name}") for name in OPTIONS})
    device = given.device or "auto"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    # Without a GPU and without explicit models the suite runs the tiny CPU mode.
    tiny = device == "cpu" and given.models is None
    options = {k: v for k, v in vars(given).items() if v is not None and k != "device"}
    try:
        config.stash[SETTINGS] = resolve_settings(device=device, tiny=tiny, **options)
    except ValueError as err:
        raise pytest.UsageError(str(err)) from None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    settings = metafunc.config.stash[SETTINGS]
    specs = [ModelSpec.parse(name) for name in settings.models]
    if "train_case" in metafunc.fixturenames:
        variants = with_same_policy_baselines(parse_variants(settings.variants, settings.device), settings.device)
        cases = [(spec, batch, v) for spec in specs for batch in settings.batches for v in variants]
        metafunc.parametrize("train_case", cases, ids=[f"{s.name}-b{b}-{v.name}" for s, b, v in cases])
    if "sample_case" in metafunc.fixturenames:
        variants = with_same_policy_baselines(
            parse_variants(settings.sample_variants, settings.device, sampling=True), settings.device) \
            if settings.sample_variants else []
        scales = list(dict.fromkeys([1.0, settings.cfg_scale]))
        cases = [(spec, v, scale) for spec in specs for v in variants for scale in scales]
        metafunc.parametrize("sample_case", cases, ids=[f"{s.name}-{v.name}-cfg{c:g}" for s, v, c in cases])


@pytest.fixture(scope="session")
def bench_settings(request: pytest.FixtureRequest) -> Settings:
    settings = request.config.stash[SETTINGS]
    prepare(settings)
    return settings


@pytest.fixture(scope="session")
def matmul_peak(bench_settings: Settings) -> Callable[[str], float]:
    """precision -> measured matmul TFLOP/s of this device, measured once per precision."""
    @functools.cache
    def peak(precision: str) -> float:
        return matmul_peak_tflops(torch.device(bench_settings.device), precision, bench_settings.matmul_size, reps=10)

    return peak


@pytest.fixture(scope="session")
def record(request: pytest.FixtureRequest) -> Callable[[str, tuple, bool, dict], None]:
    """``record(case, group, is_baseline, info)``: adds the ratios to the baseline of ``group`` (the
    DiT of the same policy) measured earlier in this session (it is parametrized first) to ``info``,
    unless their measured residual-stream dtypes differ (then ``info["comparison"]`` says why), and
    keeps the row for the summary printed at the end."""
    baselines: dict[tuple, dict] = {}
    rows = request.config.stash.setdefault(ROWS, [])

    def add(case: str, group: tuple, is_baseline: bool, info: dict) -> None:
        if is_baseline:
            baselines[group] = dict(info)
        elif group in baselines and baselines[group]["residual_dtype"] != info["residual_dtype"]:
            info["comparison"] = (f"no ratio: residual stream {baselines[group]['residual_dtype']} in the DiT, "
                                  f"{info['residual_dtype']} here")
        elif group in baselines:
            base = baselines[group]
            info["speedup_vs_baseline"] = info["images_per_s"] / base["images_per_s"]
            info["memory_vs_baseline"] = info["peak_allocated_gib"] / base["peak_allocated_gib"]
        rows.append((case, info))

    return add


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    rows = config.stash.get(ROWS, [])
    if not rows:
        return
    terminalreporter.section("maskdit_fast throughput (ratios: against the DiT of the same policy in this session)")
    width = max(len(case) for case, _ in rows)
    terminalreporter.write_line(f"{'case':{width}} {'img/s':>10} {'x dit':>6} {'alloc GiB':>10} {'x dit':>6} "
                                f"{'MFU':>6}")
    for case, info in rows:
        def cell(key: str, spec: str, size: int) -> str:
            return f"{info[key]:{size}{spec}}" if key in info else " " * (size - 1) + "-"

        terminalreporter.write_line(f"{case:{width}} {cell('images_per_s', '.4g', 10)} "
                                    f"{cell('speedup_vs_baseline', '.2f', 6)} {cell('peak_allocated_gib', '.3g', 10)} "
                                    f"{cell('memory_vs_baseline', '.2f', 6)} {cell('mfu', '.1%', 6)} "
                                    f"{info.get('comparison', '')}")
