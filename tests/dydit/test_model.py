import pytest
import torch

from maskdit_fast.dydit import DyDiTBlock, DyMaskDiT, RouterConfig, routing_of, to_dydit
from maskdit_fast.models.layers import DiTBlock

from .helpers import inputs, random_base, random_dydit


@pytest.mark.parametrize("arch", ["dit", "maskdit"])
@pytest.mark.parametrize("mode", ["auto", "masked", "fast"])
def test_converted_model_equals_the_base_model_exactly(arch, mode):
    base = random_base(arch)
    dyn = to_dydit(base).eval()
    dyn.model.set_mode(mode)
    x, sigma, labels = inputs()
    with torch.no_grad():
        assert torch.equal(dyn(x, sigma, labels), base(x, sigma, labels))
        assert torch.equal(dyn(x, sigma, labels, cfg_scale=1.7), base(x, sigma, labels, cfg_scale=1.7))
    assert all(r.heads.all() and r.groups.all() and r.tokens.all() for r in routing_of(dyn))


@pytest.mark.parametrize("arch", ["dit", "maskdit"])
def test_converted_model_equals_the_base_model_in_training(arch):
    base = random_base(arch, class_dropout=0.0).train()
    dyn = to_dydit(base)
    assert dyn.training
    x, sigma, labels = inputs()
    assert torch.equal(dyn(x, sigma, labels), base(x, sigma, labels))


@pytest.mark.parametrize("arch", ["dit", "maskdit"])
def test_fast_model_equals_masked_model(arch):
    dyn = random_dydit(arch, RouterConfig(token_ratio=4)).eval()
    x, _, labels = inputs(n=6)
    for sigma in (torch.full((6,), 0.3), torch.tensor([0.01, 0.1, 1.0, 10.0, 10.0, 80.0])):
        with torch.no_grad():
            dyn.model.set_mode("masked")
            masked = dyn(x, sigma, labels)
            ref = routing_of(dyn)
            dyn.model.set_mode("fast")
            fast = dyn(x, sigma, labels)
        rates = torch.stack([torch.stack([r.heads.mean(), r.groups.mean(), r.tokens.mean()]) for r in ref])
        assert (rates < 1).any() and (rates > 0).any()
        for a, b in zip(routing_of(dyn), ref):
            assert torch.equal(a.heads, b.heads) and torch.equal(a.groups, b.groups) and torch.equal(a.tokens, b.tokens)
        torch.testing.assert_close(fast, masked, rtol=1e-5, atol=1e-5)


def test_maskdit_decoder_routers_are_optional():
    base = random_base("maskdit")
    with_decoder = to_dydit(base, RouterConfig(decoder=True))
    without = to_dydit(base, RouterConfig(decoder=False))
    assert isinstance(without.model, DyMaskDiT)
    assert all(isinstance(b, DyDiTBlock) for b in with_decoder.model.decoder_blocks)
    assert all(type(b) is DiTBlock for b in without.model.decoder_blocks)
    x, sigma, labels = inputs()
    with torch.no_grad():
        without.eval()(x, sigma, labels)
    assert len(routing_of(without)) == base.model.cfg.depth


def test_conversion_leaves_the_base_untouched_and_refuses_masks_and_reconversion():
    base = random_base("maskdit")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    dyn = to_dydit(base)
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())
    assert dyn.model.blocks[0].attn.qkv.weight.data_ptr() != base.model.blocks[0].attn.qkv.weight.data_ptr()
    with pytest.raises(TypeError, match="already a DyDiT"):
        to_dydit(dyn)
    x, sigma, labels = inputs()
    with pytest.raises(ValueError, match="ids_keep"):
        dyn(x, sigma, labels, ids_keep=torch.zeros(4, 8, dtype=torch.long))


def test_reinitialising_keeps_the_routers_on():
    dyn = to_dydit(random_base("dit"))
    dyn.model.initialize_weights()
    block = dyn.model.blocks[0]
    assert (block.head_router.linear.bias == 15).all() and (block.token_router.fc2.bias == 35).all()
