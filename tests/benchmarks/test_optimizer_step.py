"""benchmarks/optimizer_step.py at the tiny size on a CPU: it times AdamW over the DiT's own parameter
tensors, and without apex its apex row says so instead of failing."""
from __future__ import annotations

import sys

import torch

from benchmarks.configs import ModelSpec
from benchmarks.optimizer_step import main, measure
from maskdit_fast.diffusion.edm import build_net


def test_times_adamw_over_the_dits_parameters_and_says_why_apex_is_missing(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "apex", None)  # not installed, even where it is
    spec = ModelSpec.parse("tiny/2")
    result = measure(spec, torch.device("cpu"), warmup=1, steps=3)
    net = build_net(spec.config("dit", 0.0))
    assert (result["parameters"], result["tensors"]) == (sum(p.numel() for p in net.parameters()),
                                                          len(list(net.parameters())))
    adamw, apex = result["rows"]
    assert adamw["optimizer"] == "adamw" and adamw["class"] == "AdamW" and len(adamw["step_ms"]) == 3
    assert min(adamw["step_ms"]) <= adamw["median_ms"] <= max(adamw["step_ms"]) and adamw["median_ms"] > 0
    assert apex["optimizer"] == "apex_fused_adam" and "not installed" in apex["skipped"]
    assert "apex_over_adamw" not in result

    assert main(["--tiny", "--steps", "2", "--warmup", "0"]) == 0
    assert capsys.readouterr().out.count("\n") == 1  # one JSON line
