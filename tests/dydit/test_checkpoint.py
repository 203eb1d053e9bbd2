import numpy as np
import pytest
import torch

from maskdit_fast.checkpoint import load_checkpoint, save_safetensors
from maskdit_fast.config import SampleConfig
from maskdit_fast.dydit import RouterConfig, is_dydit, load_dydit, save_dydit
from maskdit_fast.eval.__main__ import main as eval_main
from maskdit_fast.eval.images import to_uint8_nhwc
from maskdit_fast.generate import generate, seed_labels

from .helpers import inputs, random_base, random_dydit


@pytest.mark.parametrize("arch", ["dit", "maskdit"])
def test_save_and_load_round_trip(tmp_path, arch):
    router = RouterConfig(token_ratio=4, decoder=False, temperature=3.0)
    net = random_dydit(arch, router)
    path = tmp_path / "dydit.safetensors"
    save_dydit(path, net.state_dict(), net.model.cfg, router, {"step": 7})
    assert is_dydit(path)
    x, sigma, labels = inputs()
    with torch.no_grad():
        expected = net.eval()(x, sigma, labels)
    for loaded in (load_dydit(path), load_checkpoint(path)):  # load_checkpoint recognises DyDiT files too
        assert not loaded.training and loaded.model.router_cfg == router
        with torch.no_grad():
            assert torch.equal(loaded(x, sigma, labels), expected)


def test_base_checkpoints_are_not_dydit(tmp_path):
    base = random_base("dit")
    path = tmp_path / "base.safetensors"
    save_safetensors(path, base.state_dict(), base.model.cfg)
    assert not is_dydit(path) and not is_dydit(tmp_path / "state.pt")
    with pytest.raises(ValueError, match="not a DyDiT checkpoint"):
        load_dydit(path)
    with pytest.raises(FileNotFoundError):
        load_dydit(tmp_path / "missing.safetensors")


def test_eval_generate_samples_a_dydit_checkpoint(tmp_path):
    """``python -m maskdit_fast.eval generate`` goes through load_checkpoint: DyDiT files just work."""
    router = RouterConfig(token_ratio=4)
    net = random_dydit("maskdit", router).eval()
    path = tmp_path / "dydit.safetensors"
    save_dydit(path, net.state_dict(), net.model.cfg, router)
    eval_main(["generate", "--ckpt", str(path), "--out", str(tmp_path / "gen"), "--num", "3", "--steps", "2",
               "--batch", "2", "--no-png", "--no-progress", "--device", "cpu"])
    seeds = [0, 1, 2]
    expected = generate(net, seeds, seed_labels(seeds, 10), SampleConfig(num_steps=2, cfg_scale=1.0), batch_size=2)
    assert np.array_equal(np.load(tmp_path / "gen" / "samples.npz")["arr_0"], to_uint8_nhwc(expected))
