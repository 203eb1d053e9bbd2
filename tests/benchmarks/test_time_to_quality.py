"""Time to quality: target parsing, the time-to-target arithmetic, the budget hook's clock, the
trainer's step hook, and the tool end to end in its tiny mode."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.policy import Policy
from benchmarks.time_to_quality import BudgetHook, Target, compare_runs, markdown, time_to_target
from maskdit_fast.config import load_config
from maskdit_fast.train.trainer import train

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["model.hidden_size=32", "model.depth=2", "model.num_heads=2", "model.decoder_hidden_size=32",
         "model.decoder_depth=1", "model.decoder_num_heads=2", "train.global_batch=4", "train.log_every=1",
         "train.max_steps=100", "train.unmasked_steps=0", "train.sample_every=1000", "train.ckpt_every=1000"]


def test_targets_parse_and_refuse_the_wrong_direction():
    assert Target.parse("accuracy>=0.9") == Target("accuracy", ">=", 0.9)
    assert Target.parse(" val_loss <= 0.5 ").met(0.4) and not Target.parse("val_loss<=0.5").met(0.6)
    assert not Target.parse("frechet<=20").met(float("nan"))
    with pytest.raises(ValueError, match="better when >"):
        Target.parse("accuracy<=0.9")
    with pytest.raises(ValueError, match="METRIC"):
        Target.parse("fid<=3")


def test_time_to_target_interpolates_between_the_points_around_it():
    points = [{"train_s": 10.0, "images": 100, "accuracy": 0.5}, {"train_s": 20.0, "images": 200, "accuracy": 0.8},
              {"train_s": 30.0, "images": 300, "accuracy": 0.95}, {"train_s": 40.0, "images": 400, "accuracy": 0.99}]
    target = Target.parse("accuracy>=0.9")
    found = time_to_target(points, target, "train_s")
    assert found["first"] == 30.0 and found["before"] == 20.0
    assert found["estimate"] == pytest.approx(20 + 10 * (0.9 - 0.8) / (0.95 - 0.8))
    assert time_to_target(points, target, "images")["estimate"] == pytest.approx(200 + 100 * (0.1 / 0.15))
    assert time_to_target(points[2:], target, "train_s") == {"first": 30.0, "before": None, "estimate": 30.0}
    assert time_to_target(points[:2], target, "train_s") is None


def _run(points: list[dict], residual: str, arch: str) -> dict:
    return {"points": points, "policy": vars(Policy(arch, "bf16", residual, "sdpa", False, False))}


def test_the_ratio_is_refused_when_the_runs_policies_differ_in_more_than_the_architecture():
    dit = [{"train_s": 10.0, "images": 100, "accuracy": 0.5}, {"train_s": 20.0, "images": 200, "accuracy": 1.0}]
    masked = [{"train_s": 5.0, "images": 100, "accuracy": 0.5}, {"train_s": 10.0, "images": 200, "accuracy": 1.0}]
    target = Target.parse("accuracy>=0.75")
    same = compare_runs({"dit": _run(dit, "float32", "dit"), "maskdit": _run(masked, "float32", "maskdit")}, target)
    assert same["speedup"] == pytest.approx(15.0 / 7.5) and same["comparison"] == ""
    other = compare_runs({"dit": _run(dit, "float32", "dit"), "maskdit": _run(masked, "bfloat16", "maskdit")}, target)
    assert other["speedup"] is None and "precision" in other["comparison"]
    assert other["reached"]["maskdit"]["train_s"]["estimate"] == pytest.approx(7.5)  # still reported


class FakeEvaluator:
    """Scores = the number of calls; each evaluation takes 5 s of the fake clock."""

    def __init__(self, clock: list[float]):
        self.clock, self.calls = clock, 0

    def residual_dtype(self, net, mask_ratio: float) -> str:
        self.clock[0] += 1.0
        return "float32"

    def __call__(self, net) -> dict[str, float]:
        self.calls += 1
        self.clock[0] += 5.0
        return {"val_loss": float(self.calls)}


def test_the_budget_hook_evaluates_on_time_switches_masking_and_stops_with_evaluation_off_the_clock():
    clock = [0.0]
    evaluator = FakeEvaluator(clock)
    hook = BudgetHook(evaluator, budget_s=10.0, eval_at=[5.0, 10.0], unmask_at=7.0, batch=4, mask_ratio=0.5,
                      timer=lambda: clock[0])
    actions = []
    for step in range(1, 100):
        clock[0] += 1.0  # one second per training step
        actions.append(hook(step, None))
        if actions[-1] == "stop":
            break
    assert actions.index("unmask") == 6 and actions.count("unmask") == 1  # step 7: 7 s of training
    assert actions[-1] == "stop" and hook.steps == 10 and hook.train_s == 10.0  # whatever the evaluations took
    assert [(p["step"], p["train_s"], p["images"], p["unmasked"]) for p in hook.points] == [
        (5, 5.0, 20, False), (10, 10.0, 40, True)]
    assert hook.eval_s == pytest.approx(1.0 + 2 * 5.0) and hook.unmasked_from == 7


def test_the_trainer_step_hook_unmasks_and_stops(tmp_path):
    cfg = load_config("mnist", SMALL)
    calls = []

    def hook(step: int, ema_net) -> str | None:
        calls.append(step)
        return {3: "unmask", 6: "stop"}.get(step)

    train(cfg, tmp_path, progress=False, step_hook=hook)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert calls == [1, 2, 3, 4, 5, 6]
    assert [(r["step"], r["mask_ratio"]) for r in rows] == [(1, 0.5), (2, 0.5), (3, 0.5), (4, 0.0), (5, 0.0),
                                                            (6, 0.0)]


def test_tiny_mode_end_to_end(tmp_path, mnist_classifier, mnist_cache):
    out = tmp_path / "ttq"
    env = {**os.environ, "MASKDIT_CACHE": str(mnist_cache), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.time_to_quality", "--tiny", "--no-progress",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "time_to_quality.json").read_text())
    assert report["metrics"] == ["accuracy", "frechet", "val_loss"] and report["settings"]["budget_s"] == 4.0
    for arch, run in report["runs"].items():
        # 2 points at 2 s and 4 s of training; 1 when the first steps alone took over 4 s (a loaded machine)
        assert run["arch"] == arch and 1 <= len(run["points"]) <= 2 and run["points"][-1]["train_s"] >= 4.0
        assert run["train_s"] >= 4.0 and run["train_s"] + run["eval_s"] <= run["wall_s"] + 1e-6
        assert run["images_seen"] == 8 * run["steps"] and run["points"][-1]["step"] == run["steps"]
        assert all(0 <= p["accuracy"] <= 1 and p["frechet"] > 0 and p["val_loss"] > 0 for p in run["points"])
        assert run["policy"]["residual_dtype"] == "float32" and run["policy"]["autocast"] == "off"
    assert report["runs"]["dit"]["model"]["arch"] == "dit" and report["runs"]["maskdit"]["model"]["mask_ratio"] == 0.5
    assert report["runs"]["dit"]["unmask_at_s"] is None and report["runs"]["maskdit"]["unmask_at_s"] > 0
    assert report["comparison"]["target"] == "accuracy>=0.9"
    text = (out / "time_to_quality.md").read_text()
    assert proc.stdout.strip() == text.strip() and "## Time to accuracy>=0.9" in text
    assert (out / "time_to_quality.png").read_bytes().startswith(b"\x89PNG")
    assert (out / "dit" / "metrics.jsonl").exists() and (out / "maskdit" / "metrics.jsonl").exists()
    again = subprocess.run([sys.executable, "-m", "benchmarks.time_to_quality", "--tiny", "--out", str(out)],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already holds" in again.stderr


def test_the_committed_cpu_result_is_what_the_tool_writes_and_names_the_faster_model():
    folder = ROOT / "benchmarks" / "results" / "cpu-epyc-2vcpu" / "time-to-quality"
    report = json.loads((folder / "time_to_quality.json").read_text())
    assert markdown(report) == (folder / "time_to_quality.md").read_text()
    assert report["settings"]["budget_s"] >= 600 and not report["settings"]["tiny"]
    assert all(run["train_s"] >= 600 for run in report["runs"].values())
    report["comparison"]["speedup"] = 2.0
    assert "(MaskDiT 2.00× faster)" in markdown(report)
    report["comparison"]["speedup"] = 0.5
    assert "(DiT 2.00× faster)" in markdown(report)
