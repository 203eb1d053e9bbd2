"""``sample.py --sampler ddpm|ddim`` on a converted official-layout DiT (tiny, 3-channel pixels, CPU),
against an independent DDPM sampler written from the formulas around the official forward."""
import json
import math

import numpy as np
import pytest
import torch

from maskdit_fast import load_checkpoint
from maskdit_fast.checkpoint import save_safetensors
from maskdit_fast.cli import sample_main
from maskdit_fast.config import SampleConfig
from maskdit_fast.convert import convert_official_dit
from maskdit_fast.diffusion.edm import build_net
from maskdit_fast.eval.__main__ import main as eval_main
from maskdit_fast.generate import generate, to_uint8_nhwc
from tests.dit_reference import official_dit_forward, official_dit_state
from tests.helpers import tiny_model_config

WIDTH, DEPTH, HEADS, PATCH, SIDE, CHANNELS, CLASSES = 24, 2, 3, 2, 8, 3, 4


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dit")
    sd = official_dit_state(WIDTH, DEPTH, PATCH, SIDE, CHANNELS, CLASSES, learn_sigma=True, seed=5)
    torch.save(sd, tmp / "DiT-tiny.pt")
    convert_official_dit(tmp / "DiT-tiny.pt", tmp / "dit.safetensors", num_heads=HEADS)
    return tmp / "dit.safetensors", sd


def reference_ddpm(sd, seeds, labels, steps, scale):
    """The official sampling, written out: respaced linear schedule, DiT guidance on output channels
    0..2 (all eps channels here, C = 3), learned-range variance, no clipping; per-seed noise."""
    abar_full = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    kept = np.unique(np.round(np.arange(steps) * 999 / (steps - 1)).astype(int))
    abar = abar_full[kept]
    prev = np.concatenate([[1.0], abar[:-1]])
    betas = 1 - abar / prev
    post_var = betas * (1 - prev) / (1 - abar)
    post_log = np.log(np.concatenate([[post_var[1]], post_var[1:]]))
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    draw = lambda: torch.stack([torch.randn(CHANNELS, SIDE, SIDE, generator=g) for g in gens])  # noqa: E731
    x = draw()
    n = len(seeds)
    null = torch.full((n,), CLASSES)
    for i in range(len(kept) - 1, -1, -1):
        t = torch.full((n,), int(kept[i]))
        cond = official_dit_forward(sd, HEADS, x, t, labels)
        uncond = official_dit_forward(sd, HEADS, x, t, null)
        eps = uncond[:, :3] + scale * (cond[:, :3] - uncond[:, :3])
        v = cond[:, 3:]
        x0 = (x - math.sqrt(1 - abar[i]) * eps) / math.sqrt(abar[i])
        mean = (betas[i] * math.sqrt(prev[i]) * x0 + (1 - prev[i]) * math.sqrt(1 - betas[i]) * x) / (1 - abar[i])
        frac = (v + 1) / 2
        log_var = frac * math.log(betas[i]) + (1 - frac) * post_log[i]
        x = mean + (torch.exp(0.5 * log_var) * draw() if i > 0 else 0)
    return x


def test_ddpm_sampling_of_a_converted_dit_is_the_official_sampling(converted):
    path, sd = converted
    net = load_checkpoint(path)
    seeds, labels = [0, 1, 2], torch.tensor([0, 1, 2])
    with torch.no_grad():
        ours = generate(net, seeds, labels, SampleConfig(solver="ddpm", num_steps=50, cfg_scale=1.5, guidance="dit"))
        ref = reference_ddpm(sd, seeds, labels, 50, 1.5)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_sample_py_ddpm_250_steps(converted, tmp_path):
    path, sd = converted
    out = tmp_path / "ddpm"
    assert sample_main(["--ckpt", str(path), "--out", str(out), "--n", "2", "--sampler", "ddpm", "--steps", "250",
                        "--device", "cpu"]) == 0
    settings = json.loads((out / "settings.json").read_text())
    # the converted file's own settings: DiT's guidance 1.5 on three channels
    assert (settings["solver"], settings["num_steps"], settings["cfg_scale"], settings["guidance"]) == ("ddpm", 250, 1.5, "dit")
    images = np.load(out / "samples.npz")["arr_0"]
    with torch.no_grad():
        ref = reference_ddpm(sd, [0, 1], torch.tensor([0, 1]), 250, 1.5)
    expected = to_uint8_nhwc(ref.clamp(-1, 1))
    assert images.shape == (2, SIDE, SIDE, CHANNELS)
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1  # rounding at a quantisation edge at most


def test_sample_py_ddim_and_heun(converted, tmp_path):
    path, _ = converted
    for sampler in ("ddim", "heun"):
        assert sample_main(["--ckpt", str(path), "--out", str(tmp_path / sampler), "--n", "2", "--sampler", sampler,
                            "--steps", "5", "--device", "cpu", "--guidance", "standard"]) == 0
    ddim = np.load(tmp_path / "ddim" / "samples.npz")["arr_0"]
    heun = np.load(tmp_path / "heun" / "samples.npz")["arr_0"]
    assert ddim.shape == heun.shape == (2, SIDE, SIDE, CHANNELS) and not np.array_equal(ddim, heun)


def test_dit_guidance_on_an_edm_checkpoint_is_a_user_error(tmp_path, capsys):
    cfg = tiny_model_config()
    save_safetensors(tmp_path / "edm.safetensors", build_net(cfg).state_dict(), cfg)
    with pytest.raises(SystemExit) as err:
        sample_main(["--ckpt", str(tmp_path / "edm.safetensors"), "--out", str(tmp_path / "o"), "--n", "1",
                     "--guidance", "dit", "--device", "cpu"])
    assert err.value.code == 2 and "--guidance dit" in capsys.readouterr().err


def reference_ddim(sd, seeds, labels, steps, scale):
    """DDIM (eta 0) written out: x <- sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps on the respaced steps."""
    abar_full = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    kept = np.unique(np.round(np.arange(steps) * 999 / (steps - 1)).astype(int))
    abar = abar_full[kept]
    prev = np.concatenate([[1.0], abar[:-1]])
    x = torch.stack([torch.randn(CHANNELS, SIDE, SIDE, generator=torch.Generator().manual_seed(s)) for s in seeds])
    null = torch.full((len(seeds),), CLASSES)
    for i in range(len(kept) - 1, -1, -1):
        t = torch.full((len(seeds),), int(kept[i]))
        cond = official_dit_forward(sd, HEADS, x, t, labels)[:, :CHANNELS]
        uncond = official_dit_forward(sd, HEADS, x, t, null)[:, :CHANNELS]
        eps = uncond + scale * (cond - uncond)
        x0 = (x - math.sqrt(1 - abar[i]) * eps) / math.sqrt(abar[i])
        x = math.sqrt(prev[i]) * x0 + math.sqrt(1 - prev[i]) * eps
    return x


def test_ddim_sampling_of_a_converted_dit(converted):
    path, sd = converted
    net = load_checkpoint(path)
    seeds, labels = [3, 4], torch.tensor([3, 0])
    with torch.no_grad():
        ours = generate(net, seeds, labels, SampleConfig(solver="ddim", num_steps=20, cfg_scale=2.0))
        ref = reference_ddim(sd, seeds, labels, 20, 2.0)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_eval_generate_ddpm_depends_on_the_seed_only(converted, tmp_path):
    path, sd = converted
    args = ["generate", "--ckpt", str(path), "--num", "3", "--chunk", "2", "--seed", "0", "--no-progress",
            "--sampler", "ddpm", "--steps", "20", "--device", "cpu", "--no-png"]
    eval_main([*args, "--out", str(tmp_path / "a"), "--batch", "1"])
    eval_main([*args, "--out", str(tmp_path / "b"), "--batch", "3"])
    a, b = (np.load(tmp_path / d / "samples.npz")["arr_0"] for d in "ab")
    assert np.array_equal(a, b)
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert (manifest["sampler"], manifest["steps"], manifest["guidance"]) == ("ddpm-ancestral", 20, "dit")
    with torch.no_grad():
        ref = reference_ddpm(sd, [0, 1, 2], torch.tensor([0, 1, 2]), 20, 1.5)
    assert np.abs(a.astype(int) - to_uint8_nhwc(ref.clamp(-1, 1)).astype(int)).max() <= 1
