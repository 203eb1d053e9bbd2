"""Resume from checkpoints written before any masked step: parameters that never had a gradient (the
mask token of an unmasked MaskDiT) have no optimizer state there, and resume keeps it so."""
from __future__ import annotations

import pytest
import torch

from maskdit_fast.train.trainer import train
from tests.helpers import assert_same_final_state, tiny_config, train_and_crash


def assert_same_optimizer(a: dict, b: dict) -> None:
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for name, moments in a["optimizer"]["state"].items():
        for key, value in moments.items():
            assert torch.equal(value, b["optimizer"]["state"][name][key]), f"optimizer {name}.{key}"


@pytest.mark.parametrize("overrides", [
    ["model.mask_ratio=0"],            # the unmasked fine-tune preset
    ["train.unmasked_steps=10"],       # max_steps <= unmasked_steps: every step unmasked
], ids=["mask_ratio_0", "unmasked_phase"])
def test_unmasked_run_resumes_bit_for_bit(tmp_path, monkeypatch, overrides):
    cfg = tiny_config(*overrides, "train.max_steps=4", "train.ckpt_every=2")
    train(cfg, tmp_path / "straight", progress=False)
    train_and_crash(cfg, tmp_path / "crashed", 2, monkeypatch)
    train(cfg, tmp_path / "crashed", resume=True, progress=False)
    a, b = assert_same_final_state(tmp_path / "straight", tmp_path / "crashed", 4)
    assert "model.mask_token" not in a["optimizer"]["state"]  # never had a gradient
    assert_same_optimizer(a, b)


def test_masked_run_resumes_from_its_unmasked_phase(tmp_path, monkeypatch):
    cfg = tiny_config("train.max_steps=6", "train.unmasked_steps=3", "train.ckpt_every=2")
    train(cfg, tmp_path / "straight", progress=False)
    train_and_crash(cfg, tmp_path / "crashed", 4, monkeypatch)  # newest checkpoint: step 4, unmasked since 3
    train(cfg, tmp_path / "crashed", resume=True, progress=False)
    a, b = assert_same_final_state(tmp_path / "straight", tmp_path / "crashed", 6)
    assert_same_optimizer(a, b)


def test_init_from_then_resume(tmp_path, monkeypatch):
    pretrained = train(tiny_config("train.max_steps=2"), tmp_path / "pretrain", progress=False)
    cfg = tiny_config("model.mask_ratio=0", "train.max_steps=4", "train.ckpt_every=2")
    train(cfg, tmp_path / "straight", init_from=str(pretrained), progress=False)
    train_and_crash(None, tmp_path / "crashed", 2, monkeypatch,
                    run=lambda: train(cfg, tmp_path / "crashed", init_from=str(pretrained), progress=False))
    train(cfg, tmp_path / "crashed", resume=True, progress=False)
    a, b = assert_same_final_state(tmp_path / "straight", tmp_path / "crashed", 4)
    assert_same_optimizer(a, b)
