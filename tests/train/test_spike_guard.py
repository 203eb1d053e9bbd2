"""The loss-spike guard: detection from running statistics, and what the loop does with a spike
(log it and save the batch; skip the step; roll back to the newest training state)."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from maskdit_fast.train import objective as objective_module
from maskdit_fast.train.spike_guard import SpikeGuard
from maskdit_fast.storage import latest_training_state, load_training_state
from maskdit_fast.train.trainer import train
from tests.helpers import tiny_config

GUARD = ["train.spike_zscore=6", "train.spike_warmup=3", "train.spike_min_ratio=2", "train.spike_decay=0.9"]
SPLIT = ["train.micro_batch=4", "train.max_steps=6"]  # 2 micro-batches per step: edm_loss calls 2s-1, 2s of step s


def test_guard_flags_a_loss_far_above_its_running_statistics():
    guard = SpikeGuard(zscore=4, min_ratio=1.5, warmup=5, decay=0.9)
    rng = torch.Generator().manual_seed(0)
    warm = SpikeGuard(zscore=4, min_ratio=1.5, warmup=5, decay=0.9)
    assert not any(warm.is_spike(v) for v in (1.0, 1.01, 0.99, 100.0))  # warm-up: never a spike
    for value in (1.0 + 0.05 * torch.randn(30, generator=rng)).tolist():
        assert not guard.is_spike(value)
    assert guard.mean == pytest.approx(1.0, abs=0.1)
    seen = guard.seen
    assert guard.is_spike(3.0) and guard.seen == seen  # a spike stays out of the statistics
    assert not guard.is_spike(1.1)
    copy = SpikeGuard(4, 1.5, 5, 0.9)
    copy.load_state_dict(json.loads(json.dumps(guard.state_dict())))  # saved in meta.json
    assert copy == guard
    assert not SpikeGuard(0, 1.5, 0, 0.9).is_spike(1e9)  # zscore 0: off


def scale_loss(monkeypatch, calls: set[int], factor: float) -> None:
    """Multiply the loss by ``factor`` on the given (1-based) calls of edm_loss."""
    real, count = objective_module.edm_loss, [0]

    def scaled(*args, **kwargs):
        terms = real(*args, **kwargs)
        count[0] += 1
        if count[0] in calls:
            terms.loss = terms.loss * factor
        return terms

    monkeypatch.setattr(objective_module, "edm_loss", scaled)


def final(run):
    return load_training_state(latest_training_state(run))


def assert_same(a, b) -> None:
    for part in ("model", "ema"):
        for name, tensor in a[part].items():
            assert torch.equal(tensor, b[part][name]), f"{part}.{name}"


def test_spike_is_logged_with_its_batch(tmp_path, monkeypatch, caplog):
    scale_loss(monkeypatch, {9, 10}, 100.0)  # step 5
    with caplog.at_level(logging.WARNING):
        train(tiny_config(*SPLIT, *GUARD, "train.spike_action=log"), tmp_path, progress=False)
    assert "step 5: loss" in caplog.text and "is a spike" in caplog.text
    saved = torch.load(tmp_path / "spikes" / "step-0000005-rank0.pt", weights_only=True)
    assert saved["step"] == 5 and len(saved["micro_batches"]) == 2
    assert not any(p.name != "step-0000005-rank0.pt" for p in (tmp_path / "spikes").iterdir())  # no false alarm


def test_skipped_spike_leaves_the_parameters_as_a_skipped_step_does(tmp_path, monkeypatch):
    scale_loss(monkeypatch, {9, 10}, 100.0)
    train(tiny_config(*SPLIT, *GUARD, "train.spike_action=skip"), tmp_path / "spike", progress=False)
    scale_loss(monkeypatch, {9, 10}, float("nan"))
    train(tiny_config(*SPLIT, "train.nonfinite=skip"), tmp_path / "nan", progress=False)
    assert_same(final(tmp_path / "spike"), final(tmp_path / "nan"))


def test_rollback_undoes_the_steps_since_the_newest_state(tmp_path, monkeypatch, caplog):
    scale_loss(monkeypatch, {9, 10}, 100.0)  # spike at step 5; newest training state: step 3
    with caplog.at_level(logging.WARNING):
        train(tiny_config(*SPLIT, *GUARD, "train.spike_action=rollback", "train.ckpt_every=3"), tmp_path / "rolled",
              progress=False)
    assert "rolled back to" in caplog.text and "step-0000003" in caplog.text
    scale_loss(monkeypatch, {7, 8, 9, 10}, float("nan"))  # the same as skipping steps 4 and 5
    train(tiny_config(*SPLIT, "train.nonfinite=skip", "train.ckpt_every=3"), tmp_path / "skipped", progress=False)
    rolled, skipped = final(tmp_path / "rolled"), final(tmp_path / "skipped")
    assert_same(rolled, skipped)
    step = rolled["optimizer"]["state"]["model.x_embedder.proj.weight"]["step"].item()
    assert step == skipped["optimizer"]["state"]["model.x_embedder.proj.weight"]["step"].item() == 4


def record_inputs(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (images, labels) of every edm_loss call, as the objective gets them (flipped, on the device)."""
    real, seen = objective_module.edm_loss, []

    def recording(net, images, labels, *args, **kwargs):
        seen.append((images.detach().clone(), labels.clone()))
        return real(net, images, labels, *args, **kwargs)

    monkeypatch.setattr(objective_module, "edm_loss", recording)
    return seen


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_after_a_rollback_the_loaders_give_the_batches_of_a_run_that_skipped_the_undone_steps(tmp_path, monkeypatch,
                                                                                              loader):
    """One process, one micro-batch per step (one continuous RNG stream), random flips: spike at step 5,
    rolled back to the state of step 3; then step 6 trains on step 6's batch (the DALI reader's position
    and the flips included) exactly as in a run whose steps 4 and 5 were skipped."""
    if loader == "dali":
        pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install -e '.[dali]')")
    from tests.data.helpers import make_latent_folder
    from tests.data.test_train_latents import latent_config

    make_latent_folder(tmp_path / "data", counts=(6, 6))
    cfg = [f"data.loader={loader}", "data.dali_threads=1", "data.shuffle_buffer=8", "data.flip=true",
           "train.global_batch=4", "train.micro_batch=4", "train.max_steps=6", "train.ckpt_every=3"]
    scale_loss(monkeypatch, {5}, 100.0)
    rolled_inputs = record_inputs(monkeypatch)
    train(latent_config(tmp_path / "data", *cfg, *GUARD, "train.spike_action=rollback"), tmp_path / "rolled",
          progress=False)
    monkeypatch.undo()
    scale_loss(monkeypatch, {4, 5}, float("nan"))
    skipped_inputs = record_inputs(monkeypatch)
    train(latent_config(tmp_path / "data", *cfg, "train.nonfinite=skip"), tmp_path / "skipped", progress=False)
    assert len(rolled_inputs) == len(skipped_inputs) == 6
    for step, ((x, y), (x2, y2)) in enumerate(zip(rolled_inputs, skipped_inputs), 1):
        assert torch.equal(x, x2) and torch.equal(y, y2), f"step {step}"
    assert not torch.equal(rolled_inputs[5][0], rolled_inputs[3][0])  # step 6 is not a repeat of step 4
    rolled, skipped = final(tmp_path / "rolled"), final(tmp_path / "skipped")
    assert_same(rolled, skipped)
    assert rolled["optimizer"]["state"]["model.x_embedder.proj.weight"]["step"].item() == 4
