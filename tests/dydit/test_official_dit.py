"""DyDiT from an official DiT checkpoint (converted, official layout, random weights): DiT's own
objective in the fine-tune, a few CPU steps on MNIST-shaped data, sampling it with DDPM; and the
paper's FLOPs convention on the static DiT sizes."""
import json

import pytest
import torch

from maskdit_fast import load_checkpoint
from maskdit_fast.diffusion.edm import build_net
from maskdit_fast.cli import sample_main
from maskdit_fast.config import ModelConfig
from maskdit_fast.convert import convert_official_dit
from maskdit_fast.diffusion.ddpm_loss import ddpm_loss
from maskdit_fast.diffusion.ddpm_precond import DDPMPrecond
from maskdit_fast.dydit import load_dydit, load_dydit_config, model_flops, to_dydit
from maskdit_fast.dydit.__main__ import main
from maskdit_fast.dydit.finetune import dydit_loss, sampler_sigmas
from maskdit_fast.dydit.flops import paper_gmacs
from tests.dit_reference import official_dit_state

TINY_RUN = ["train.max_steps=3", "train.global_batch=8", "train.log_every=1", "train.ckpt_every=2",
            "sample.num_steps=2", "sample.grid_per_class=1", "dydit.lambda_warmup=2",
            "dydit.width_bias=1", "dydit.token_bias=1", "dydit.token_ratio=4"]


@pytest.fixture
def official_mnist_dit(tmp_path):
    """An official-layout DiT (learned variance, learned null row) shaped for the bundled MNIST."""
    torch.save(official_dit_state(32, 2, 4, 32, 1, 10, learn_sigma=True, seed=11), tmp_path / "DiT-mnist.pt")
    convert_official_dit(tmp_path / "DiT-mnist.pt", tmp_path / "dit.safetensors", num_heads=2)
    return tmp_path / "dit.safetensors"


def test_dydit_loss_of_a_ddpm_base_is_dits_loss(official_mnist_dit):
    """Routers all on (converted): the diffusion term is DiT's hybrid loss of the base on the same draws."""
    cfg = load_dydit_config("dydit-dit-xl-0.5", ["dydit.width_bias=30", "dydit.token_bias=60"])
    base = load_checkpoint(official_mnist_dit)
    net = to_dydit(base, cfg.dydit.router()).train()
    net.model.y_embedder.dropout = 0.0
    cfg.model = base.model.cfg
    images, labels = torch.rand(4, 1, 32, 32) * 2 - 1, torch.tensor([0, 3, 5, 9])
    torch.manual_seed(0)
    terms = dydit_loss(net, images, labels, 0.5, cfg, model_flops(net), sampler_sigmas(cfg.sample))
    torch.manual_seed(0)
    drop = torch.rand(4) < base.model.cfg.class_dropout  # dydit_loss's label dropout draw, then the loss's
    dropped = torch.where(drop, torch.full_like(labels, 10), labels)
    with torch.no_grad():
        expected = ddpm_loss(base, images, dropped, 0.0, cfg.loss, base.model.cfg).loss.mean()
    assert terms["dsm"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms["flops_ratio"].item() > 1.0  # all on, routers counted


def test_dydit_finetune_from_an_official_dit_then_ddpm_sampling(official_mnist_dit, tmp_path):
    out = tmp_path / "run"
    assert main(["finetune", "--init", str(official_mnist_dit), "--out", str(out), "--no-progress",
                 "--config", "dydit-dit-xl-0.5", "data.dataset=mnist", "data.vae=null", "train.lr=1e-3", *TINY_RUN]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["dsm"] > 0 for r in rows)
    net = load_dydit(out / "ema.safetensors")
    assert isinstance(net, DDPMPrecond) and net.model.cfg.learn_sigma and net.model.cfg.null_class == "learned"
    samples = tmp_path / "samples"
    assert sample_main(["--ckpt", str(out / "ema.safetensors"), "--out", str(samples), "--n", "2",
                        "--sampler", "ddpm", "--steps", "3", "--device", "cpu"]) == 0
    flops = json.loads((samples / "flops.json").read_text())
    assert flops["rows"] == 2 * 3 * 2  # guidance doubles the rows; one evaluation per DDPM step
    # the 3 respaced steps are 999, 500, 0: their noise levels, decreasing
    sigmas = [r["sigma"] for r in flops["per_evaluation"]]
    assert sigmas[0] == pytest.approx(157.4, rel=1e-3) and sigmas[2] == pytest.approx(0.01, rel=1e-3)
    assert json.loads((samples / "settings.json").read_text())["solver"] == "ddpm"


def test_distillation_is_refused_for_a_ddpm_base(official_mnist_dit, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        main(["finetune", "--init", str(official_mnist_dit), "--out", str(tmp_path / "r"), "--no-progress",
              "--config", "dydit-dit-xl-0.5", "data.dataset=mnist", "data.vae=null", "dydit.distill_coef=0.5", *TINY_RUN])
    assert err.value.code == 2 and "distill_coef" in capsys.readouterr().err


@pytest.mark.parametrize("size,paper", [("S", 6.07), ("B", 23.02), ("XL", 118.69)])
def test_static_dit_flops_match_the_dydit_paper(size, paper):
    """The DyDiT paper's table (DiT-S/2, B/2, XL/2 at 256 px: latents 4x32x32, learned variance)."""
    cfg = ModelConfig(arch="dit", size=size, input_size=32, in_channels=4, num_classes=1000, diffusion="ddpm",
                      learn_sigma=True, null_class="learned", mask_ratio=0.0)
    with torch.device("meta"):  # shapes only: no XL-sized allocation
        net = build_net(cfg)
    assert round(paper_gmacs(net), 2) == paper
    assert paper_gmacs(net) > model_flops(net).static / 2 / 1e9  # the LayerNorm elements on top of the MACs
