"""DiT's training loss (eps MSE + the variance's bound term with the mean frozen), against the
formulas written out in float64 around the official forward, and DDPM training of DiT / MaskDiT."""
import json
import math

import numpy as np
import pytest
import torch

from maskdit_fast import load_checkpoint
from maskdit_fast.config import LossConfig
from maskdit_fast.convert import convert_official_dit
from maskdit_fast.diffusion.ddpm_loss import ddpm_loss
from maskdit_fast.diffusion.ddpm_precond import DDPMPrecond
from maskdit_fast.train.trainer import train
from tests.dit_reference import dit_alphas_cumprod, official_dit_forward, official_dit_state
from tests.helpers import tiny_config, tiny_model_config


def normal_cdf_tanh(x):
    return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def reference_loss(sd, heads, x0, y, t, noise):
    """Per-sample mse + vb (bits/dim) of DiT's hybrid loss; the schedule in float64, each coefficient
    cast to float32 when applied, the rest in float32 (as the official code: the decoder term's
    tails saturate in float32, so float64 would be a different number there)."""
    betas = torch.from_numpy(np.linspace(1e-4, 0.02, 1000))
    abar = dit_alphas_cumprod()
    prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    post_var = betas * (1 - prev) / (1 - abar)
    post_log = torch.cat([post_var[1:2], post_var[1:]]).log()
    b = lambda v: v[t].float().view(-1, 1, 1, 1)  # noqa: E731
    x_t = b(abar.sqrt()) * x0 + b((1 - abar).sqrt()) * noise
    out = official_dit_forward(sd, heads, x_t, t, y)
    c = x0.shape[1]
    eps, v = out[:, :c], out[:, c:]
    mse = ((noise - eps) ** 2).mean(dim=(1, 2, 3))
    x0_hat = b((1 / abar).sqrt()) * x_t - b((1 / abar - 1).sqrt()) * eps
    coef0, coeft = b(betas * prev.sqrt() / (1 - abar)), b((1 - prev) * (1 - betas).sqrt() / (1 - abar))
    mean = coef0 * x0_hat + coeft * x_t
    frac = (v + 1) / 2
    log_var = frac * b(betas.log()) + (1 - frac) * b(post_log)
    true_mean = coef0 * x0 + coeft * x_t
    true_log = b(post_log)
    kl = 0.5 * (-1 + log_var - true_log + (true_log - log_var).exp() + (true_mean - mean) ** 2 * (-log_var).exp())
    inv = (-0.5 * log_var).exp()
    hi, lo = normal_cdf_tanh(inv * (x0 - mean + 1 / 255)), normal_cdf_tanh(inv * (x0 - mean - 1 / 255))
    log_p = torch.where(x0 < -0.999, hi.clamp(min=1e-12).log(),
                        torch.where(x0 > 0.999, (1 - lo).clamp(min=1e-12).log(), (hi - lo).clamp(min=1e-12).log()))
    vb = torch.where((t == 0).view(-1, 1, 1, 1), -log_p, kl).mean(dim=(1, 2, 3)) / math.log(2)
    return mse, vb


def test_ddpm_loss_is_dits_hybrid_loss(tmp_path):
    sd = official_dit_state(32, 2, 2, 8, 4, 5, learn_sigma=True, seed=7)
    torch.save(sd, tmp_path / "dit.pt")
    convert_official_dit(tmp_path / "dit.pt", tmp_path / "dit.safetensors", num_heads=2)
    net = load_checkpoint(tmp_path / "dit.safetensors")
    g = torch.Generator().manual_seed(0)
    n = 8
    x0 = (torch.rand(n, 4, 8, 8, generator=g) * 2 - 1)
    x0[0, 0, 0] = 1.0  # the decoder's end bins, for t = 0
    x0[0, 0, 1] = -1.0
    y = torch.randint(0, 5, (n,), generator=g)
    torch.manual_seed(3)
    t = torch.randint(0, 1000, (n,))
    t[0] = 0  # the t = 0 decoder term
    noise = torch.randn_like(x0)
    draws = iter([t, noise])
    randint, randn_like = torch.randint, torch.randn_like
    torch.randint = lambda *a, **k: next(draws)  # the loss's own draws, made known
    torch.randn_like = lambda *a, **k: next(draws)
    try:
        with torch.no_grad():
            terms = ddpm_loss(net, x0, y, 0.0, LossConfig(), net.model.cfg)
    finally:
        torch.randint, torch.randn_like = randint, randn_like
    mse, vb = reference_loss(sd, 2, x0, y, t, noise)
    torch.testing.assert_close(terms.dsm, mse + vb, rtol=2e-4, atol=1e-5)
    assert (vb[1:] > 0).all() and vb[0] > 0


class FixedOutput(torch.nn.Module):
    """Stands in for a DDPMPrecond: its raw output is a parameter, so the loss's gradient is visible."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = torch.nn.Parameter(out)

    def forward(self, x, sigma, class_labels=None, ids_keep=None, raw=False):
        assert raw
        return self.out


def test_the_bound_term_trains_the_variance_only():
    """d loss / d eps is the MSE's alone (the mean is frozen in the bound); the variance values get a gradient."""
    g = torch.Generator().manual_seed(1)
    n, c = 4, 4
    net = FixedOutput(torch.randn(n, 2 * c, 8, 8, generator=g) * 0.5)
    x0 = torch.rand(n, c, 8, 8, generator=g) * 2 - 1
    t, noise = torch.tensor([0, 3, 400, 999]), torch.randn(n, c, 8, 8, generator=g)
    draws = iter([t, noise])
    randint, randn_like = torch.randint, torch.randn_like
    torch.randint = lambda *a, **k: next(draws)
    torch.randn_like = lambda *a, **k: next(draws)
    try:
        ddpm_loss(net, x0, None, 0.0, LossConfig(), tiny_model_config(patch_size=2)).loss.mean().backward()
    finally:
        torch.randint, torch.randn_like = randint, randn_like
    eps = net.out.detach()[:, :c]
    torch.testing.assert_close(net.out.grad[:, :c], 2 * (eps - noise) / (n * c * 64))
    assert (net.out.grad[:, c:].abs().sum(dim=(1, 2, 3)) > 0).all()


@pytest.mark.parametrize("arch", ["dit", "maskdit"])
def test_ddpm_training_lowers_the_loss_and_saves_a_ddpm_network(tmp_path, arch):
    """DiT with the hybrid loss (learned variance, learned null class); MaskDiT masked, eps MSE + MAE."""
    model = (["model.learn_sigma=true", "model.null_class=learned"] if arch == "dit"
             else ["model.arch=maskdit", "model.mask_ratio=0.5"])
    cfg = tiny_config(f"model.arch={arch}", "model.mask_ratio=0.0", *model, "model.diffusion=ddpm",
                      "train.max_steps=40", "train.lr=2e-3", "train.log_every=10", "train.global_batch=16",
                      "sample.solver=ddpm", "sample.num_steps=4")
    final = train(cfg, tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"]
    net = load_checkpoint(final)
    assert isinstance(net, DDPMPrecond)
    assert net.model.out_channels == (2 if arch == "dit" else 1)
    assert net.model.y_embedder.embedding.weight.shape[0] == (11 if arch == "dit" else 10)
