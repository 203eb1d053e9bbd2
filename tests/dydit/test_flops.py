import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import kernels
from maskdit_fast.config import SampleConfig
from maskdit_fast.dydit import FlopsMeter, RouterConfig, model_flops, routing_of, to_dydit
from maskdit_fast.generate import generate, seed_labels

from .helpers import inputs, random_base, random_dydit, scramble_routers


@pytest.fixture
def matmul_attention():
    """FlopCounterMode does not count CPU SDPA: count the matmul reference attention instead."""
    kernels.set_attention_backend("reference")
    yield
    kernels.set_attention_backend(None)


def counted(net, *args) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(*args)
    return counter.get_total_flops()


@pytest.mark.parametrize("arch,changes", [("dit", {}), ("maskdit", {}), ("dit", {"mlp_ratio": 2.0, "patch_size": 8}),
                                          ("maskdit", {"num_heads": 4, "decoder_num_heads": 3})])
def test_static_count_matches_flop_counter(matmul_attention, arch, changes):
    base = random_base(arch, **changes)
    x, sigma, labels = inputs()
    assert model_flops(base).static * 4 == counted(base, x, sigma, labels)


@pytest.mark.parametrize("arch", ["dit", "maskdit"])
@pytest.mark.parametrize("pattern", ["all-on", "random", "no-heads-no-tokens", "mixed-sigmas"])
def test_dynamic_count_matches_flop_counter_on_the_fast_path(matmul_attention, arch, pattern):
    dyn = to_dydit(random_base(arch), RouterConfig(token_ratio=4)).eval()
    sigma = 0.5
    if pattern == "random":
        scramble_routers(dyn)
    elif pattern == "no-heads-no-tokens":
        with torch.no_grad():
            for block in dyn.model.dynamic_blocks():
                block.head_router.linear.bias.fill_(-1.0)
                block.token_router.fc2.bias.fill_(-1.0)
    elif pattern == "mixed-sigmas":
        scramble_routers(dyn)
        sigma = [0.02, 0.5, 5.0, 50.0]
    x, sigma, labels = inputs(sigma=sigma)
    executed = counted(dyn, x, sigma, labels)
    per_sample = model_flops(dyn).dynamic(routing_of(dyn))
    assert per_sample.shape == (4,)
    assert per_sample.sum().item() == executed
    if pattern == "all-on":  # the routers' own cost on top of the base model
        assert executed > model_flops(dyn).static * 4
        assert (model_flops(dyn).ratio(routing_of(dyn)) < 1.05).all()
    else:
        assert executed < model_flops(dyn).static * 4


def test_guidance_doubles_the_rows_counted(matmul_attention):
    dyn = random_dydit("dit").eval()
    x, sigma, labels = inputs()
    executed = counted(dyn, x, sigma, labels, 2.0)
    routing = routing_of(dyn)
    assert routing[0].heads.shape[0] == 8
    assert model_flops(dyn).dynamic(routing).sum().item() == executed


def test_flops_are_differentiable_in_the_decisions():
    dyn = to_dydit(random_base("dit"), RouterConfig(width_bias=1.0, token_bias=1.0)).train()
    x, sigma, labels = inputs()
    dyn(x, sigma, labels)
    model_flops(dyn).ratio(routing_of(dyn)).mean().backward()
    bias = dyn.model.blocks[0].head_router.linear.bias
    assert bias.grad is not None and (bias.grad > 0).all()  # descending the ratio lowers the bias


@pytest.mark.parametrize("kind", ["fast", "masked", "base"])
def test_flops_meter_totals_what_a_sampling_run_executes(matmul_attention, kind):
    """What sample.py reports (FlopsMeter over a guided Heun run) = FlopCounterMode over the same run."""
    net = random_base("maskdit") if kind == "base" else random_dydit("maskdit").eval()
    if kind == "masked":  # computes everything whatever the decisions: the routers' cost on top of the base
        net.model.set_mode("masked")
    seeds = list(range(3))
    cfg = SampleConfig(num_steps=3, cfg_scale=1.5)
    with FlopsMeter(net) as meter, FlopCounterMode(display=False) as counter:
        generate(net, seeds, seed_labels(seeds, 10), cfg, batch_size=2)
    summary = meter.summary(images=3)
    assert summary["total_flops"] == counter.get_total_flops()
    assert summary["rows"] == 2 * 3 * 5 and len(summary["per_evaluation"]) == 2 * 5  # 2 batches, 5 Heun evaluations
    assert {"fast": summary["ratio"] < 1, "masked": summary["ratio"] > 1, "base": summary["ratio"] == 1}[kind]
    assert all(0 < e["tokens"] < 1 for e in summary["per_evaluation"]) == (kind != "base")
