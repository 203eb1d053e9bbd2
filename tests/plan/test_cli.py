"""``python -m benchmarks.plan``: the JSON holds every figure issue 25 (item 2) names, the GPU's memory
decides the largest micro-batch, ``--micro-batch auto`` runs the search's choice, user errors end in
one message with exit status 2, and the issue's bar at XL/2."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import kernels
from maskdit_fast.plan.cli import main
from maskdit_fast.plan.gpus import DEFAULT_RESERVE_GB, GIB, GPUS
from maskdit_fast.plan.tracker import CATEGORIES
from tests.helpers import TINY_MODEL

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--config", "mnist", "--global-batch", "16"]  # with TINY_MODEL: a 2-block MaskDiT, 16 samples per GPU
RESERVE = int(DEFAULT_RESERVE_GB * GIB)
needs_triton = pytest.mark.skipif(not kernels.triton_available(), reason="the Triton ops' fake kernels need Triton")


def run_main(tmp_path: Path, *args: str) -> dict[str, Any]:
    """``main`` on the tiny model: the JSON it wrote, with what it printed under ``"printed"``."""
    out, printed = tmp_path / "plan.json", io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main([*TINY, *args, "--json", str(out), *TINY_MODEL]) == 0
    return {**json.loads(out.read_text()), "printed": printed.getvalue()}


def command(*args: str) -> subprocess.Popen:
    """``python -m benchmarks.plan ARGS`` from the worktree root, started (not waited for)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "benchmarks.plan", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict[str, Any]:
    """The plan of the tiny MaskDiT on an H100 with the search (everything fits there)."""
    return run_main(tmp_path_factory.mktemp("plan"))


def test_the_json_holds_every_component_of_the_plan(small):
    plan, other = small["plan"], small["other_arch"]
    # per GPU at the peak: every category, summing to the peak; its phase and module
    assert set(plan["at_peak"]) == set(CATEGORIES)
    assert sum(plan["at_peak"].values()) == plan["peak"]
    assert plan["at_peak"]["parameters"] > 0 and plan["at_peak"]["optimizer"] > 0 and plan["at_peak"]["ema"] > 0
    assert plan["peak_phase"] in ("forward", "backward", "optimizer", "ema") and isinstance(plan["peak_module"], str)
    assert plan["peak_step"] == 2 and len(plan["steps"]) == 2
    assert {"forward", "backward", "optimizer"} <= set(plan["phase_peaks"])
    # the headroom left on the named GPU
    assert small["gpu"]["name"] == "h100-80gb" and small["gpu"]["memory_bytes"] == GPUS["h100-80gb"].memory_bytes
    assert small["headroom_bytes"] == small["gpu"]["memory_bytes"] - RESERVE - plan["peak"] > 0 and small["fits"]
    # the largest micro-batch with and without activation checkpointing: the whole share fits, one probe each
    fits = small["largest_micro_batch"]
    assert fits["without_ac"] == {"micro_batch": 16, "tried": {"16": plan["peak"]}}
    assert fits["with_ac"]["micro_batch"] == 16 and list(fits["with_ac"]["tried"]) == ["16"]
    assert fits["with_ac"]["tried"]["16"] < plan["peak"]  # checkpointing keeps less
    # the other architecture at the same micro-batch, and the ratios
    assert (plan["arch"], other["arch"], other["mask_ratio"]) == ("maskdit", "dit", 0.0)
    assert other["micro_batch"] == plan["micro_batch"] == 16
    assert other["size"] == plan["size"] == "32x2/4"  # 32 wide, 2 blocks, patch 4
    assert small["maskdit_over_dit_peak"] == plan["peak"] / other["peak"]
    assert small["maskdit_over_dit_activations"] == plan["saved_activations"] / other["saved_activations"]
    text = small["printed"]
    assert f"peak {small['maskdit_over_dit_peak']:.3f}" in text and "Largest micro-batch with activation" in text


def test_less_memory_fits_a_smaller_micro_batch_and_auto_runs_it(small, tmp_path):
    """Memory for just under the whole share without activation checkpointing: the bisection finds a
    smaller size, checkpointing (less memory) still fits the whole share, and ``auto`` plans the first."""
    memory_gb = (small["plan"]["peak"] - 1) / GIB
    result = run_main(tmp_path, "--memory-gb", repr(memory_gb), "--reserve-gb", "0", "--micro-batch", "auto")
    assert result["gpu"]["memory_bytes"] < small["plan"]["peak"] and result["reserve_bytes"] == 0
    without, with_ac = result["largest_micro_batch"]["without_ac"], result["largest_micro_batch"]["with_ac"]
    assert 0 < without["micro_batch"] < 16 and with_ac["micro_batch"] == 16
    assert without["tried"][str(without["micro_batch"])] <= result["gpu"]["memory_bytes"]
    plan = result["plan"]
    assert (plan["micro_batch"], plan["accumulation"]) == (without["micro_batch"], 16 // without["micro_batch"])
    assert result["fits"] and result["headroom_bytes"] == result["gpu"]["memory_bytes"] - plan["peak"] >= 0
    assert result["other_arch"]["micro_batch"] == plan["micro_batch"]


def test_a_given_micro_batch_is_planned_as_given(small, tmp_path):
    """Micro-batches of 4, 4 per step: the gradients of the first ones are held through the next
    forward passes (the whole share frees them before its forward pass)."""
    result = run_main(tmp_path, "--micro-batch", "4", "--no-search")
    plan = result["plan"]
    assert (plan["micro_batch"], plan["accumulation"]) == (4, 4) and result["largest_micro_batch"] == {}
    assert plan["at_peak"]["gradients"] == plan["state"]["gradients"] > 0
    assert small["plan"]["at_peak"]["gradients"] == 0


def test_user_errors_end_in_one_message_with_status_2():
    cases = {
        "--model": (["--model", "XL"], "give SIZE/PATCH"),
        "--gpu": (["--gpu", "v100"], "'v100' is not a known GPU"),
        "--micro-batch": (["--micro-batch", "x"], "give a positive integer or auto"),
        "--gpus": (["--global-batch", "10", "--gpus", "4"], "does not divide over --gpus 4"),
        "--parallel": (["--parallel", "none", "--gpus", "2"], "--parallel none runs one GPU"),
    }
    started = {name: command(*args, "--no-search") for name, (args, _) in cases.items()}  # side by side
    for name, process in started.items():
        out, err = process.communicate(timeout=120)
        expected = cases[name][1]
        assert process.returncode == 2, (name, err)
        assert "Traceback" not in err and err.count("error:") == 1 and out == "", (name, err)
        last = err.strip().splitlines()[-1]
        assert last.startswith("python -m benchmarks.plan: error: ") and expected in last, (name, err)


@needs_triton
def test_the_issues_bar_at_xl2(tmp_path):
    """The issue's bar: ``python -m benchmarks.plan --model XL/2 --arch dit`` and ``--arch maskdit``
    print per-GPU peaks whose MaskDiT / DiT ratio at the same batch is reported. Run here without the
    bisection (``--no-search``, about 8 s each on 2 cores); the full commands took 20 s (dit) and 30 s
    (maskdit) on 2 cores (34 s with the cores shared), within the bar's 2 minutes."""
    runs = {arch: (command("--model", "XL/2", "--arch", arch, "--no-search", "--json", str(tmp_path / f"{arch}.json")),
                   time.perf_counter()) for arch in ("dit", "maskdit")}
    results, printed = {}, {}
    for arch, (process, started) in runs.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
        assert time.perf_counter() - started < 120
        results[arch] = json.loads((tmp_path / f"{arch}.json").read_text())
        printed[arch] = float(re.search(r"MaskDiT / DiT at the same micro-batch: peak ([0-9.]+)", out).group(1))
    dit, maskdit = results["dit"], results["maskdit"]
    assert dit["plan"]["arch"] == "dit" and maskdit["plan"]["arch"] == "maskdit"
    assert dit["plan"]["micro_batch"] == maskdit["plan"]["micro_batch"] == 1024  # the same batch
    # each command plans the other architecture too: the same numbers either way
    assert dit["plan"]["peak"] == maskdit["other_arch"]["peak"] and maskdit["plan"]["peak"] == dit["other_arch"]["peak"]
    ratio = maskdit["plan"]["peak"] / dit["plan"]["peak"]
    assert printed["dit"] == printed["maskdit"] == round(ratio, 3)
    assert dit["maskdit_over_dit_peak"] == maskdit["maskdit_over_dit_peak"] == ratio
    assert ratio < 1  # half the tokens through the 28 XL blocks
