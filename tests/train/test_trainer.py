import json

import pytest
import torch

from maskdit_fast import load_checkpoint
from maskdit_fast import storage as state_module
from maskdit_fast.checkpoint import main as checkpoint_main
from maskdit_fast.checkpoint import read_safetensors
from maskdit_fast.config import ConfigError
from maskdit_fast.errors import UserError
from maskdit_fast.data.sampler import EpochBatches, split_global_batch
from maskdit_fast.files import atomic_write
from maskdit_fast.storage import latest_training_state, load_training_state
from maskdit_fast.train import objective as objective_module
from maskdit_fast.train.trainer import learning_rate, train
from tests.helpers import assert_same_final_state, train_and_crash, tiny_config


def params(path):
    return load_training_state(path)


def test_killed_run_resumes_to_the_same_parameters(tmp_path, monkeypatch):
    cfg = tiny_config("train.max_steps=8", "train.ckpt_every=3", "train.unmasked_steps=2", "train.lr_schedule=cosine",
                      "train.warmup_steps=2")
    train(cfg, tmp_path / "straight", progress=False)

    train_and_crash(cfg, tmp_path / "crashed", 5, monkeypatch)
    assert load_training_state(latest_training_state(tmp_path / "crashed"))["step"] == 3
    train(cfg, tmp_path / "crashed", resume=True, progress=False)

    a, b = assert_same_final_state(tmp_path / "straight", tmp_path / "crashed", 8)
    assert torch.equal(a["rng"]["rank0"]["cpu"], b["rng"]["rank0"]["cpu"])
    steps = [json.loads(line)["step"] for line in (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8]  # step 4, logged after the checkpoint of step 3 and before the crash, once


def test_run_writes_logs_samples_and_a_loadable_checkpoint(tmp_path):
    cfg = tiny_config("train.max_steps=4", "train.log_every=2", "train.unmasked_steps=2")
    final = train(cfg, tmp_path, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4]
    assert {"loss", "dsm", "mae", "img_per_s", "lr", "peak_mem_gb"} <= set(lines[0])
    assert lines[0]["mask_ratio"] == 0.5 and lines[1]["mask_ratio"] == 0.0 and lines[1]["mae"] == 0.0
    assert (tmp_path / "samples" / "step-0000004.png").is_file()
    net = load_checkpoint(final)
    state = load_training_state(latest_training_state(tmp_path))
    for name, tensor in net.state_dict().items():
        assert torch.equal(tensor, state["ema"][name])
    # the export command writes the same file from the training state
    assert checkpoint_main(["export", str(tmp_path), str(tmp_path / "exported.safetensors")]) == 0
    exported, model_cfg, metadata = read_safetensors(tmp_path / "exported.safetensors")
    assert model_cfg == cfg.model and json.loads(metadata["step"]) == 4
    assert all(torch.equal(exported[name], tensor) for name, tensor in net.state_dict().items())
    assert load_checkpoint(latest_training_state(tmp_path)).state_dict().keys() == exported.keys()


def test_starting_over_an_existing_run_is_refused(tmp_path):
    cfg = tiny_config("train.max_steps=2")
    train(cfg, tmp_path, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg, tmp_path, progress=False)


def test_init_from_loads_pretrained_weights(tmp_path):
    pre = tiny_config("train.max_steps=3")
    final = train(pre, tmp_path / "pre", progress=False)
    fine = tiny_config("train.max_steps=1", "model.mask_ratio=0", "train.lr=1e-12")
    train(fine, tmp_path / "fine", init_from=str(final), progress=False)
    start = load_checkpoint(final).state_dict()
    after = load_training_state(latest_training_state(tmp_path / "fine"))["model"]
    for name in start:
        assert torch.allclose(start[name], after[name], atol=1e-6), name
    wrong = tiny_config("train.max_steps=1", "model.hidden_size=40")
    with pytest.raises(UserError, match="32 of another shape .* use the --config and model overrides"):
        train(wrong, tmp_path / "wrong", init_from=str(final), progress=False)
    assert not (tmp_path / "wrong").exists()  # a rejected start leaves no run folder


def test_loss_goes_down_on_mnist(tmp_path):
    cfg = tiny_config("train.max_steps=60", "train.lr=2e-3", "train.log_every=10", "train.global_batch=32")
    train(cfg, tmp_path, progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.6 * losses[0]


def test_learning_rate_schedule():
    cfg = tiny_config("train.max_steps=100", "train.warmup_steps=10", "train.lr=1e-3", "train.lr_schedule=cosine",
                      "train.min_lr=1e-4")
    assert learning_rate(cfg, 0) == pytest.approx(1e-4)
    assert learning_rate(cfg, 9) == pytest.approx(1e-3)
    assert learning_rate(cfg, 10) == pytest.approx(1e-3)
    assert learning_rate(cfg, 100) == pytest.approx(1e-4)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "state.pt"
    target.write_text("good")

    def failing(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, failing)
    assert target.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def poison_loss(monkeypatch, calls: set[int]) -> None:
    """Make the loss NaN on the given (1-based) calls of edm_loss."""
    real = objective_module.edm_loss
    count = [0]

    def poisoned(*args, **kwargs):
        terms = real(*args, **kwargs)
        count[0] += 1
        if count[0] in calls:
            terms.loss = terms.loss * float("nan")
        return terms

    monkeypatch.setattr(objective_module, "edm_loss", poisoned)


def test_nan_loss_stops_with_the_step_and_saves_the_batch(tmp_path, monkeypatch):
    cfg = tiny_config("train.max_steps=4", "train.log_every=2")
    poison_loss(monkeypatch, {2, 3, 4})
    with pytest.raises(FloatingPointError, match="step 2"):
        train(cfg, tmp_path, progress=False)
    saved = torch.load(tmp_path / "nonfinite" / "step-0000002-rank0.pt", weights_only=True)
    (batch,) = saved["micro_batches"]
    assert saved["step"] == 2 and batch["images"].shape == (8, 1, 32, 32) and batch["labels"].shape == (8,)
    assert latest_training_state(tmp_path) is None


def test_nan_loss_can_skip_the_step(tmp_path, monkeypatch):
    cfg = tiny_config("train.max_steps=4", "train.log_every=2", "train.nonfinite=skip")
    poison_loss(monkeypatch, {2})
    train(cfg, tmp_path, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in lines] == [1, 1] and all(r["loss"] == r["loss"] for r in lines)
    state = load_training_state(latest_training_state(tmp_path))
    assert state["optimizer"]["state"]["model.x_embedder.proj.weight"]["step"].item() == 3  # 4 steps, 1 skipped
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    cfg = tiny_config("train.max_steps=4", "train.ckpt_every=2")
    real_save = state_module.dcp.save
    calls = [0]

    def crash_after_writing_the_second(*args, **kwargs):
        real_save(*args, **kwargs)
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt("simulated crash before the commit")

    monkeypatch.setattr(state_module.dcp, "save", crash_after_writing_the_second)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path, progress=False)
    monkeypatch.setattr(state_module.dcp, "save", real_save)
    checkpoints = tmp_path / "checkpoints"
    assert latest_training_state(tmp_path).name == "step-0000002"
    assert (checkpoints / ".tmp-step-0000004").is_dir()  # the half-done write, never resumed from
    load_checkpoint(latest_training_state(tmp_path))

    train(tiny_config("train.max_steps=4", "train.ckpt_every=2", "train.keep_last=1"), tmp_path, resume=True,
          progress=False)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-0000004"]


def test_activation_checkpointing_gives_the_same_parameters(tmp_path):
    plain = train(tiny_config("train.max_steps=2"), tmp_path / "plain", progress=False)
    recomputed = train(tiny_config("train.max_steps=2", "train.activation_checkpointing=true"), tmp_path / "ac",
                       progress=False)
    a = load_training_state(latest_training_state(plain.parent), parts=("model",))["model"]
    b = load_training_state(latest_training_state(recomputed.parent), parts=("model",))["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_global_batch_splits_into_micro_batches_or_is_refused():
    assert split_global_batch(1024, 8, None) == (128, 1)
    assert split_global_batch(1024, 8, 32) == (32, 4)
    with pytest.raises(ConfigError, match="train.global_batch"):
        split_global_batch(1024, 3, None)
    with pytest.raises(ConfigError, match="train.micro_batch"):
        split_global_batch(1024, 8, 48)
    with pytest.raises(ConfigError, match="train.micro_batch"):
        tiny_config("train.micro_batch=3")
    assert tiny_config("parallel=fsdp").train.parallel == "fsdp"  # command-line shorthand


@pytest.mark.parametrize("world_size,accumulation", [(1, 1), (2, 2), (4, 1), (3, 1)])
def test_ranks_share_each_global_batch_exactly(world_size, accumulation):
    # 50 samples, batches of 12: neither divides the other, nor is 50 divisible by 3 or 4
    batches = EpochBatches(50, 12, seed=3)
    seen = []
    for step in range(4):  # one epoch: 4 batches, 2 samples dropped
        parts = [mb for rank in range(world_size) for mb in batches.micro_batches(step, rank, world_size, accumulation)]
        assert [j for j, _ in parts] == list(range(world_size * accumulation))
        assert torch.equal(torch.cat([idx for _, idx in parts]), batches(step))
        seen += batches(step).tolist()
    assert len(seen) == len(set(seen)) == 48


def test_resume_checks_the_whole_config_and_writes_config_json(tmp_path):
    train(tiny_config("train.max_steps=2"), tmp_path, progress=False)
    assert json.loads((tmp_path / "config.json").read_text())["loss"]["mae_coef"] == 0.1
    with pytest.raises(ValueError, match="loss.mae_coef"):
        train(tiny_config("train.max_steps=3", "loss.mae_coef=0.2"), tmp_path, resume=True, progress=False)
    train(tiny_config("train.max_steps=3", "train.log_every=1"), tmp_path, resume=True, progress=False)  # free keys
    assert load_training_state(latest_training_state(tmp_path))["step"] == 3
