"""The official-checkpoint importer, checked against an independent functional implementation of
the official MaskDiT forward written from its documented semantics (one-hot class table, stored
pos embeddings, timm-style qkv layout, decoder with mask token)."""
import argparse
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from maskdit_fast import load_checkpoint
from maskdit_fast.diffusion.edm import build_net
from maskdit_fast.convert import convert_official, infer_model_config, native_to_official, read_official
from tests.helpers import tiny_model_config


def official_forward(sd, cfg, x, sigma, onehot):
    """D(x; sigma) of the official EDM-preconditioned MaskDiT (eval, no mask), from raw tensors."""
    W = lambda name: sd["model." + name + ".weight"]  # noqa: E731
    B = lambda name: sd["model." + name + ".bias"]  # noqa: E731
    s = sigma.view(-1, 1, 1, 1)
    c_in, c_skip = 1 / (s**2 + 0.25).sqrt(), 0.25 / (s**2 + 0.25)
    c_out = s * 0.5 / (s**2 + 0.25).sqrt()
    h = F.conv2d(c_in * x, W("x_embedder.proj"), B("x_embedder.proj"), stride=cfg.patch_size)
    h = h.flatten(2).transpose(1, 2) + sd["model.pos_embed"]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
    args = (sigma.log() / 4)[:, None] * freqs[None]
    t = torch.cat([torch.cos(args), torch.sin(args)], -1)
    t = F.linear(F.silu(F.linear(t, W("t_embedder.mlp.0"), B("t_embedder.mlp.0"))), W("t_embedder.mlp.2"), B("t_embedder.mlp.2"))
    c = t + onehot @ sd["model.y_embedder.embedding_table.weight"].t()

    def ln(v):
        return F.layer_norm(v, v.shape[-1:], eps=1e-6)

    def block(prefix, v, heads):
        mod = F.linear(F.silu(c), W(prefix + ".adaLN_modulation.1"), B(prefix + ".adaLN_modulation.1"))
        sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, dim=1)
        a = ln(v) * (1 + sc1[:, None]) + sh1[:, None]
        n, length, d = a.shape
        qkv = F.linear(a, W(prefix + ".attn.qkv"), B(prefix + ".attn.qkv"))
        q, k, vv = qkv.reshape(n, length, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        att = ((q @ k.transpose(-2, -1)) * (d // heads) ** -0.5).softmax(-1) @ vv
        att = F.linear(att.transpose(1, 2).reshape(n, length, d), W(prefix + ".attn.proj"), B(prefix + ".attn.proj"))
        v = v + g1[:, None] * att
        m = ln(v) * (1 + sc2[:, None]) + sh2[:, None]
        m = F.linear(F.gelu(F.linear(m, W(prefix + ".mlp.fc1"), B(prefix + ".mlp.fc1")), approximate="tanh"),
                     W(prefix + ".mlp.fc2"), B(prefix + ".mlp.fc2"))
        return v + g2[:, None] * m

    def modulated_linear(prefix, v):
        sh, sc = F.linear(F.silu(c), W(prefix + ".adaLN_modulation.1"), B(prefix + ".adaLN_modulation.1")).chunk(2, dim=1)
        return F.linear(ln(v) * (1 + sc[:, None]) + sh[:, None], W(prefix + ".linear"), B(prefix + ".linear"))

    for i in range(cfg.depth):
        h = block(f"blocks.{i}", h, cfg.num_heads)
    h = modulated_linear("decoder_layer", h) + sd["model.decoder_pos_embed"]
    for i in range(cfg.decoder_depth):
        h = block(f"decoder_blocks.{i}", h, cfg.decoder_num_heads)
    h = modulated_linear("final_layer", h)
    p, side, ch = cfg.patch_size, cfg.input_size // cfg.patch_size, cfg.in_channels
    out = torch.einsum("nhwpqc->nchpwq", h.reshape(-1, side, side, p, p, ch)).reshape(x.shape)
    return c_skip * x + c_out * out


class Payload:
    """An object that would run a command if unpickled naively."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture()
def official_file(tmp_path):
    cfg = tiny_model_config(mask_ratio=0.0)
    net = build_net(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.15)
    ema = native_to_official(net.state_dict(), cfg)
    path = tmp_path / "official.pt"
    marker = tmp_path / "pwned"
    model = {k: v if "pos_embed" in k else v + 1 for k, v in ema.items()}
    torch.save({"model": model, "ema": ema, "opt": {},
                "args": argparse.Namespace(model_type="custom", payload=Payload(marker))}, path)
    return path, ema, cfg, marker


def test_converted_model_matches_the_official_forward(official_file, tmp_path):
    path, ema, cfg, marker = official_file
    out = tmp_path / "net.safetensors"
    convert_official(path, out, num_heads=cfg.num_heads, decoder_num_heads=cfg.decoder_num_heads)
    assert not marker.exists(), "the converter executed a pickled object"
    net = load_checkpoint(out)
    assert not net.training
    x, sigma = torch.randn(3, 1, 32, 32), torch.tensor([0.05, 1.0, 30.0])
    labels = torch.tensor([2, 7, 10])  # 10 = no class
    onehot = F.one_hot(labels, 11)[:, :10].float()
    with torch.no_grad():
        expected = official_forward(ema, cfg, x, sigma, onehot)
        got = net(x, sigma, labels)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    # guidance on the network output: official semantics run cond and uncond halves together
    with torch.no_grad():
        uncond = official_forward(ema, cfg, x, sigma, torch.zeros_like(onehot))
        cond = official_forward(ema, cfg, x, sigma, F.one_hot(torch.tensor([2, 7, 1]), 10).float())
        guided = net(x, sigma, torch.tensor([2, 7, 1]), cfg_scale=1.5)
    assert torch.allclose(guided, uncond + 1.5 * (cond - uncond), atol=1e-5, rtol=1e-5)


def test_weights_choice_and_inference(official_file, tmp_path):
    path, ema, cfg, _ = official_file
    raw = read_official(path)
    assert torch.equal(raw["ema"]["model.mask_token"], ema["model.mask_token"])
    inferred = infer_model_config(ema, cfg.num_heads, cfg.decoder_num_heads)
    for key in ("hidden_size", "depth", "patch_size", "input_size", "in_channels", "num_classes",
                "decoder_hidden_size", "decoder_depth"):
        assert getattr(inferred, key) == getattr(cfg, key), key
    convert_official(path, tmp_path / "model.safetensors", weights="model",
                     num_heads=cfg.num_heads, decoder_num_heads=cfg.decoder_num_heads)
    got = load_checkpoint(tmp_path / "model.safetensors").state_dict()["model.mask_token"]
    assert torch.equal(got, ema["model.mask_token"] + 1)


def test_cli_round_trip_and_errors(official_file, tmp_path):
    path, _, cfg, _ = official_file
    out = tmp_path / "cli.safetensors"
    run = lambda *a: subprocess.run([sys.executable, "-m", "maskdit_fast.convert", *a],  # noqa: E731
                                    capture_output=True, text=True)
    ok = run("official-maskdit", str(path), str(out), "--num-heads", "2", "--decoder-num-heads", "2")
    assert ok.returncode == 0, ok.stderr
    assert load_checkpoint(out).model.cfg.hidden_size == cfg.hidden_size
    no_heads = run("official-maskdit", str(path), str(out))
    assert no_heads.returncode != 0 and "--num-heads" in no_heads.stderr
    missing = run("official-maskdit", str(tmp_path / "nope.pt"), str(out))
    assert missing.returncode != 0 and "no such file" in missing.stderr


def test_load_checkpoint_rejects_unconverted_files(tmp_path):
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="convert"):
        load_checkpoint(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.safetensors")
