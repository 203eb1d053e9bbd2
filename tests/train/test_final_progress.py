"""The final phases (the last sample grid, the MNIST quality check) show their own progress."""
from __future__ import annotations

from maskdit_fast import cli
from maskdit_fast.train import trainer as trainer_module
from tests.helpers import TINY_RUN


def test_final_grid_and_quality_check_announce_themselves(tmp_path, monkeypatch, capsys):
    grids = []
    real_grid = trainer_module.write_sample_grid

    def grid(cfg, ema_net, path, progress=False):
        grids.append((path.name, progress))
        return real_grid(cfg, ema_net, path, progress)

    monkeypatch.setattr(trainer_module, "write_sample_grid", grid)
    monkeypatch.setattr(cli, "mnist_quality", lambda ckpt, cfg, n: {
        "n": n, "cfg_scale": 1.0, "num_steps": 2, "solver": "heun", "accuracy": 0.5, "frechet": 1.0})
    assert cli.train_main(["--out", str(tmp_path), "--eval-samples", "3", *TINY_RUN, "train.max_steps=2",
                           "train.sample_every=1"]) == 0
    assert grids == [("step-0000001.png", False), ("step-0000002.png", True)]  # the last one with a bar
    out = capsys.readouterr().out
    assert "quality check: sampling 3 digits (--eval-samples 0 skips it)" in out
    assert out.index("quality check") < out.index("MNIST quality of 3")
