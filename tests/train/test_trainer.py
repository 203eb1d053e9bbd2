import json

import pytest
import torch

from maskdit_fast import load_checkpoint
from maskdit_fast.train import trainer as trainer_module
from maskdit_fast.train.ema import EMA
from maskdit_fast.train.state import atomic_write, latest_training_state, load_training_state
from maskdit_fast.train.trainer import learning_rate, train
from tests.helpers import tiny_config


def params(path):
    return load_training_state(path)


def test_killed_run_resumes_to_the_same_parameters(tmp_path, monkeypatch):
    cfg = tiny_config("train.max_steps=8", "train.ckpt_every=3", "train.unmasked_steps=2", "train.lr_schedule=cosine",
                      "train.warmup_steps=2")
    train(cfg, tmp_path / "straight", progress=False)

    real_update = EMA.update

    def crash_at_step_5(self, model, step):
        if step == 5:
            raise KeyboardInterrupt("simulated crash")
        real_update(self, model, step)

    monkeypatch.setattr(EMA, "update", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "crashed", progress=False)
    monkeypatch.setattr(EMA, "update", real_update)
    assert load_training_state(latest_training_state(tmp_path / "crashed"))["step"] == 3
    train(cfg, tmp_path / "crashed", resume=True, progress=False)

    a = load_training_state(latest_training_state(tmp_path / "straight"))
    b = load_training_state(latest_training_state(tmp_path / "crashed"))
    assert a["step"] == b["step"] == 8
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resume"
    assert torch.equal(a["rng"]["cpu"], b["rng"]["cpu"])


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
    with pytest.raises(RuntimeError, match="does not match"):
        train(wrong, tmp_path / "wrong", init_from=str(final), progress=False)


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


def test_nan_loss_stops_with_the_step(tmp_path, monkeypatch):
    cfg = tiny_config("train.max_steps=4", "train.log_every=2")
    real = trainer_module.edm_loss

    def poisoned(*args, **kwargs):
        terms = real(*args, **kwargs)
        terms.loss = terms.loss * float("nan")
        return terms

    monkeypatch.setattr(trainer_module, "edm_loss", poisoned)
    with pytest.raises(FloatingPointError, match="step 2"):
        train(cfg, tmp_path, progress=False)
