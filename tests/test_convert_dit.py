"""Official DiT checkpoints: conversion from the official layout (random weights, several sizes) and
the EDM-interface equation D(x; sigma_t) = x - sigma_t * eps(x sqrt(abar_t), t) against an
independent implementation of the official forward (tests/dit_reference.py)."""
import pickle
from pathlib import Path

import pytest
import torch

from maskdit_fast import load_checkpoint
from maskdit_fast.checkpoint import read_safetensors, sample_settings
from maskdit_fast.convert import main as convert_main
from maskdit_fast.convert import convert_official_dit, infer_dit_config
from maskdit_fast.diffusion.ddpm_precond import DDPMPrecond
from tests.dit_reference import dit_alphas_cumprod, official_dit_forward, official_dit_state

# width, depth, heads, patch, input size, channels, classes, learn_sigma
SIZES = [(32, 2, 2, 2, 8, 4, 5, True), (48, 1, 4, 4, 16, 4, 3, True), (24, 2, 3, 2, 8, 3, 2, False)]


def _save(tmp_path: Path, size: tuple, name: str = "dit.pt") -> tuple[Path, dict]:
    width, depth, _, patch, input_size, channels, classes, learn_sigma = size
    sd = official_dit_state(width, depth, patch, input_size, channels, classes, learn_sigma)
    path = tmp_path / name
    torch.save(sd, path)
    return path, sd


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"w{s[0]}p{s[3]}c{s[5]}{'-sigma' if s[7] else ''}")
@pytest.mark.parametrize("labelled", [True, False], ids=["labels", "no-class"])
def test_converted_dit_is_the_official_eps_network_at_every_step(tmp_path, size, labelled):
    width, depth, heads, patch, input_size, channels, classes, learn_sigma = size
    src, sd = _save(tmp_path, size)
    convert_official_dit(src, tmp_path / "dit.safetensors", num_heads=heads)
    net = load_checkpoint(tmp_path / "dit.safetensors")
    assert isinstance(net, DDPMPrecond)
    t = torch.arange(1000) if size == SIZES[0] else torch.randperm(1000, generator=torch.Generator().manual_seed(1))[:200]
    n = t.shape[0]
    g = torch.Generator().manual_seed(2)
    abar = dit_alphas_cumprod()[t]
    sigma = ((1 - abar) / abar).sqrt().float()
    x = torch.randn(n, channels, input_size, input_size, generator=g) * (1 + sigma.view(-1, 1, 1, 1))
    y = torch.randint(0, classes, (n,), generator=g) if labelled else None
    official_y = y if labelled else torch.full((n,), classes)  # None = the learned "no class" row
    with torch.no_grad():
        out = official_dit_forward(sd, heads, x * abar.sqrt().float().view(-1, 1, 1, 1), t, official_y)
        ours = net(x, sigma, y)
    assert out.shape[1] == channels * (2 if learn_sigma else 1)
    expected = x - sigma.view(-1, 1, 1, 1) * out[:, :channels]
    # float32 rounding: eps to ~1e-5, scaled by sigma (up to 157) in D
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=2e-5 * (1 + sigma.max().item()))
    torch.testing.assert_close((x - ours) / sigma.view(-1, 1, 1, 1), out[:, :channels], rtol=1e-4, atol=2e-5)


def test_predict_gives_eps_and_the_learned_variance_values(tmp_path):
    size = SIZES[0]
    src, sd = _save(tmp_path, size)
    convert_official_dit(src, tmp_path / "dit.safetensors", num_heads=2)
    net = load_checkpoint(tmp_path / "dit.safetensors")
    g = torch.Generator().manual_seed(3)
    x_t, t, y = torch.randn(6, 4, 8, 8, generator=g), torch.tensor([0, 1, 17, 500, 998, 999]), torch.tensor([0, 1, 2, 3, 4, 5])
    with torch.no_grad():
        eps, values = net.predict(x_t, t, y)
        ref = official_dit_forward(sd, 2, x_t, t, y)
    torch.testing.assert_close(eps, ref[:, :4], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values, ref[:, 4:], rtol=1e-5, atol=1e-5)


def test_guidance_conventions_match_the_official_forward_with_cfg(tmp_path):
    """dit: output channels 0..2 guided, channel 3 and the variance values conditional; standard: all eps."""
    src, sd = _save(tmp_path, SIZES[0])
    convert_official_dit(src, tmp_path / "dit.safetensors", num_heads=2)
    net = load_checkpoint(tmp_path / "dit.safetensors")
    g = torch.Generator().manual_seed(4)
    x_t, t, y, scale = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([5, 250, 900]), torch.tensor([1, 0, 4]), 4.0
    with torch.no_grad():
        cond = official_dit_forward(sd, 2, x_t, t, y)
        uncond = official_dit_forward(sd, 2, x_t, t, torch.full((3,), 5))
        eps_dit, var_dit = net.predict(x_t, t, y, scale, "dit")
        eps_std, var_std = net.predict(x_t, t, y, scale, "standard")
    guided = uncond + scale * (cond - uncond)
    torch.testing.assert_close(eps_dit[:, :3], guided[:, :3], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(eps_dit[:, 3], cond[:, 3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eps_std, guided[:, :4], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(var_dit, cond[:, 4:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var_std, cond[:, 4:], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        d = net(x_t, torch.tensor([1.0, 2.0, 3.0]), y, cfg_scale=scale, guidance="dit")
        d_cond = net(x_t, torch.tensor([1.0, 2.0, 3.0]), y)
    assert not torch.allclose(d[:, :3], d_cond[:, :3], atol=1e-2)
    torch.testing.assert_close(d[:, 3], d_cond[:, 3], rtol=1e-5, atol=1e-5)


def test_sigma_between_steps_interpolates_the_step_index(tmp_path):
    src, _ = _save(tmp_path, SIZES[0])
    convert_official_dit(src, tmp_path / "dit.safetensors", num_heads=2)
    net = load_checkpoint(tmp_path / "dit.safetensors")
    abar = dit_alphas_cumprod()
    sig = ((1 - abar) / abar).sqrt()
    mid = (sig[100].log() * 0.25 + sig[101].log() * 0.75).exp().float()  # 3/4 of the way from step 100 to 101
    x = torch.randn(1, 4, 8, 8)
    seen = []
    hook = net.model.t_embedder.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    with torch.no_grad():
        net(x, mid.view(1))
        net(x, torch.tensor([1e-4]))   # below sigma_0: step 0
        net(x, torch.tensor([500.0]))  # above sigma_999: step 999
    hook.remove()
    assert seen[0].item() == pytest.approx(100.75, abs=1e-4)
    assert seen[1].item() == 0 and seen[2].item() == 999


def test_infers_every_official_size_from_shapes_alone():
    """S/B/L/XL, patch 2/4/8, 256 and 512 px (latents 32 and 64), from shape-only (meta) tensors."""
    for name, (width, depth, heads) in {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16),
                                        "XL": (1152, 28, 16)}.items():
        for patch in (2, 4, 8):
            for latent in (32, 64):
                sd = {"pos_embed": torch.empty(1, (latent // patch) ** 2, width, device="meta"),
                      "x_embedder.proj.weight": torch.empty(width, 4, patch, patch, device="meta"),
                      "y_embedder.embedding_table.weight": torch.empty(1001, width, device="meta"),
                      "final_layer.linear.weight": torch.empty(patch * patch * 8, width, device="meta")}
                sd |= {f"blocks.{i}.attn.qkv.weight": torch.empty(3 * width, width, device="meta") for i in range(depth)}
                cfg = infer_dit_config(sd)
                assert (cfg.size, cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.patch_size, cfg.input_size) == \
                    (name, width, depth, heads, patch, latent)
                assert (cfg.num_classes, cfg.learn_sigma, cfg.null_class, cfg.diffusion) == (1000, True, "learned", "ddpm")


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_cli_converts_training_checkpoints_without_running_their_code(tmp_path, capsys):
    _, sd = _save(tmp_path, SIZES[0])
    marker = tmp_path / "pwned"
    torch.save({"model": sd, "ema": sd, "args": Payload(marker)}, tmp_path / "train.pt")
    with pytest.raises(pickle.UnpicklingError):  # a plain weights_only load refuses the payload
        torch.load(tmp_path / "train.pt", weights_only=True)
    assert convert_main(["official-dit", str(tmp_path / "train.pt"), str(tmp_path / "out.safetensors"),
                         "--num-heads", "2"]) == 0
    assert not marker.exists()
    assert "dit (ddpm) width 32" in capsys.readouterr().out
    state, cfg, _ = read_safetensors(tmp_path / "out.safetensors")
    torch.testing.assert_close(state["model.y_embedder.embedding.weight"], sd["y_embedder.embedding_table.weight"])
    assert state["model.y_embedder.embedding.weight"].shape == (6, 32)  # 5 classes + the learned null row
    settings = sample_settings(tmp_path / "out.safetensors")
    assert settings.sampler["solver"] == "ddpm" and settings.sampler["num_steps"] == 250
    assert settings.vae == "stabilityai/sd-vae-ft-ema"


def test_cli_names_a_file_that_is_not_a_dit(tmp_path, capsys):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "x.pt")
    with pytest.raises(SystemExit) as err:
        convert_main(["official-dit", str(tmp_path / "x.pt"), str(tmp_path / "o.safetensors")])
    assert err.value.code == 2 and "neither a DiT state dict" in capsys.readouterr().err
