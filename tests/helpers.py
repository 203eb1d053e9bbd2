"""Tiny configs shared by the tests: models that run in well under a second on a CPU."""
from __future__ import annotations

from maskdit_fast.config import Config, ModelConfig, load_config

TINY_MODEL = [
    "model.size=null", "model.hidden_size=32", "model.depth=2", "model.num_heads=2",
    "model.decoder_hidden_size=24", "model.decoder_depth=1", "model.decoder_num_heads=2",
]


TINY_RUN = [*TINY_MODEL, "train.global_batch=8", "train.max_steps=6", "train.unmasked_steps=0",
            "train.warmup_steps=0", "train.log_every=2", "train.sample_every=1000", "train.ckpt_every=1000",
            "sample.num_steps=2", "sample.grid_per_class=1"]


def tiny_config(*overrides: str) -> Config:
    """The MNIST preset shrunk to a 2-block model and a few steps (``TINY_RUN`` as overrides)."""
    return load_config("mnist", [*TINY_RUN, *overrides])


def tiny_model_config(**changes) -> ModelConfig:
    cfg = tiny_config().model
    values = {**cfg.__dict__, **changes}
    return ModelConfig(**values)


def train_and_crash(cfg: Config | None, out_dir, crash_step: int, monkeypatch, run=None) -> None:
    """Run ``train(cfg, out_dir)`` (or the callable ``run()``) and kill it (KeyboardInterrupt, not a
    clean exit) at the EMA update of step ``crash_step`` (0-based), after the optimizer step and
    before anything is saved."""
    import pytest

    from maskdit_fast.train.ema import EMA
    from maskdit_fast.train.trainer import train

    real_update = EMA.update

    def crash(self, model, step):
        if step == crash_step:
            raise KeyboardInterrupt("simulated crash")
        real_update(self, model, step)

    monkeypatch.setattr(EMA, "update", crash)
    with pytest.raises(KeyboardInterrupt):
        if run is None:
            train(cfg, out_dir, progress=False)
        else:
            run()
    monkeypatch.setattr(EMA, "update", real_update)


def assert_same_final_state(straight, resumed, step: int, parts=("model", "ema")) -> tuple[dict, dict]:
    """The newest training states of the runs in ``straight`` and ``resumed`` are both of ``step``
    and hold bit-identical ``parts``; returns both states for further checks."""
    import torch

    from maskdit_fast.storage import latest_training_state, load_training_state

    a = load_training_state(latest_training_state(straight))
    b = load_training_state(latest_training_state(resumed))
    assert a["step"] == b["step"] == step
    for key in parts:
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resume"
    return a, b
