"""``train.micro_batch=auto`` in real tiny CPU trainings: the trainer takes the planner's choice for the
memory it finds (``device_capacity``, patched here: it runs in the training process; the planning
itself runs in a child process), logs it with the plan's figures, checks the first two steps' real
peak against the plan, stops with a user error when nothing fits, and keeps a resumed run's size
when it still fits."""
from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from maskdit_fast.errors import UserError
from maskdit_fast.plan import auto
from maskdit_fast.plan.auto import MISMATCH, MemoryCheck
from maskdit_fast.plan.gpus import DEFAULT_RESERVE_GB, GIB
from maskdit_fast.plan.memory import plan_memory
from maskdit_fast.storage import latest_training_state, read_meta
from maskdit_fast.train.trainer import train
from tests.helpers import tiny_config

RESERVE = int(DEFAULT_RESERVE_GB * GIB)
AUTO = ["train.micro_batch=auto", "train.max_steps=2", "train.log_every=1", "train.ckpt_every=1"]


def capacity_between(small: int, large: int) -> int:
    """Memory (bytes, reserve included) in which micro-batches of ``small`` fit and of ``large`` not."""
    cfg = tiny_config(*AUTO)
    below, above = (plan_memory(cfg, micro_batch=m, device="cpu").peak for m in (small, large))
    assert below < above
    return RESERVE + (below + above) // 2


class Recorder(logging.Handler):
    """Keeps the records of ``maskdit_fast.plan.auto`` (a module-scoped run cannot use caplog)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def train_auto(cfg_overrides: list[str], out: Path, capacity: int | None, resume: bool = False) -> dict[str, Any]:
    """``train`` with ``device_capacity`` returning ``capacity`` bytes (None: the machine's); returns the
    auto module's log records and the (planned, real) peaks the memory check compared."""
    recorder, checks = Recorder(), []
    logger = logging.getLogger(auto.__name__)
    report = MemoryCheck.report

    def spy(self: MemoryCheck, real: int) -> None:
        checks.append((self.planned, real))
        report(self, real)

    with pytest.MonkeyPatch.context() as patch:
        if capacity is not None:
            patch.setattr(auto, "device_capacity", lambda device: capacity)
        patch.setattr(MemoryCheck, "report", spy)
        patch.setattr(logger, "level", logging.INFO)
        logger.addHandler(recorder)
        try:
            train(tiny_config(*AUTO, *cfg_overrides), out, resume=resume, progress=False)
        finally:
            logger.removeHandler(recorder)
    return {"records": recorder.records, "checks": checks}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> dict[str, Any]:
    """Two steps with memory for micro-batches of 2 and not of 4 (global batch 8)."""
    out = tmp_path_factory.mktemp("auto") / "run"
    return {**train_auto([], out, capacity_between(2, 4)), "out": out}


def messages(run: dict[str, Any], level: int = logging.INFO) -> list[str]:
    return [r.getMessage() for r in run["records"] if r.levelno == level]


def test_auto_picks_the_largest_size_the_plan_fits_and_logs_it(first_run):
    (choice,) = [m for m in messages(first_run) if "samples per forward pass" in m]
    assert choice.startswith("train.micro_batch=auto: 2 samples per forward pass, 4 per step and process")
    for part in ("planned peak", "parameters", "optimizer", "ema", "activations", "available on cpu", "kept back"):
        assert part in choice, part
    tried = dict(re.findall(r"(\d+): ([0-9.]+)", choice.split("planned peaks tried (GiB):")[1]))
    assert set(tried) == {"8", "2", "4"}  # the whole share first, then the bisection over 1, 2, 4
    meta = read_meta(latest_training_state(first_run["out"]))
    assert meta["micro_batch"] == 2 and meta["step"] == 2


def test_the_first_two_steps_peak_as_planned(first_run):
    """The check's planned figure is the plan of micro-batches of 2 (computed again here); the real
    peak (the loop's tensors as the tracker counts them) is within 10% of it, so no warning."""
    (planned, real), = first_run["checks"]
    assert planned == plan_memory(tiny_config(*AUTO), micro_batch=2, device="cpu").peak
    assert abs(real / planned - 1) <= MISMATCH
    (check,) = [m for m in messages(first_run) if "the first 2 steps peaked at" in m]
    assert f"the plan said {planned / GIB:.3f} GiB ({real / planned - 1:+.1%})" in check
    assert messages(first_run, logging.WARNING) == []


def test_a_resumed_run_keeps_its_size_while_it_fits(first_run, tmp_path):
    """Resumed with plenty of memory, where a fresh run would take the whole share (8), it keeps the 2
    its state was trained with, so that it draws the same numbers."""
    out = tmp_path / "run"
    shutil.copytree(first_run["out"], out)
    resumed = train_auto(["train.max_steps=3"], out, capacity=None, resume=True)
    (choice,) = [m for m in messages(resumed) if "samples per forward pass" in m]
    assert choice.startswith("train.micro_batch=auto: 2 samples per forward pass, 4 per step")
    assert "(the resumed state's size, which still fits)" in choice
    assert read_meta(latest_training_state(out))["micro_batch"] == 2


def test_a_resumed_run_plans_again_when_its_size_no_longer_fits(first_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(first_run["out"], out)
    resumed = train_auto(["train.max_steps=3"], out, capacity_between(1, 2), resume=True)
    (choice,) = [m for m in messages(resumed) if "samples per forward pass" in m]
    assert choice.startswith("train.micro_batch=auto: 1 samples per forward pass, 8 per step")
    assert "resumed state" not in choice
    assert read_meta(latest_training_state(out))["micro_batch"] == 1


def test_nothing_fits_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not even a micro-batch of 1 fits cpu") as error:
        train_auto([], tmp_path / "run", capacity=RESERVE + 1000)  # a thousand bytes over the reserve
    assert "train.parallel=fsdp" in str(error.value) and "train.activation_checkpointing=true" in str(error.value)
    assert latest_training_state(tmp_path / "run") is None
