import pytest
import torch

from maskdit_fast.dydit import DyDiTBlock, RouterConfig
from maskdit_fast.models.layers import DiTBlock


def random_block(dim=24, heads=3, cond=16):
    block = DiTBlock(dim, heads, cond)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
    return block.eval()


def block_inputs(n=5, length=11, dim=24, cond=16):
    return torch.randn(n, length, dim), torch.randn(n, cond), torch.randn(n, cond)


@pytest.mark.parametrize("mode", ["masked", "fast"])
def test_all_on_block_equals_the_base_block_exactly(mode):
    base = random_block()
    block = DyDiTBlock.from_block(base, 16, RouterConfig()).eval()
    block.mode = mode
    x, c, t = block_inputs()
    with torch.no_grad():
        assert torch.equal(block(x, c, t), base(x, c))
    assert block.routing.heads.all() and block.routing.groups.all() and block.routing.tokens.all()


def test_all_on_block_equals_the_base_block_in_training_too():
    base = random_block()
    block = DyDiTBlock.from_block(base, 16, RouterConfig()).train()
    x, c, t = block_inputs()
    assert torch.equal(block(x, c, t), base(x, c))


def set_routers(block, heads, groups, token_scale=3.0):
    """Input-independent width decisions (given per head/group) and input-dependent token decisions."""
    with torch.no_grad():
        block.head_router.linear.weight.zero_()
        block.head_router.linear.bias.copy_(torch.tensor(heads, dtype=torch.float32) * 2 - 1)
        block.group_router.linear.weight.zero_()
        block.group_router.linear.bias.copy_(torch.tensor(groups, dtype=torch.float32) * 2 - 1)
        block.token_router.fc2.weight.normal_(0, token_scale)
        block.token_router.fc2.bias.zero_()


@pytest.mark.parametrize("heads,groups", [([1, 0, 1], [0, 1, 1]), ([0, 0, 0], [1, 0, 0]), ([1, 1, 1], [0, 0, 0]),
                                          ([0, 1, 0], [1, 1, 1])])
def test_fast_path_equals_masked_formulation(heads, groups):
    block = DyDiTBlock.from_block(random_block(), 16, RouterConfig(token_ratio=4)).eval()
    set_routers(block, heads, groups)
    x, c, t = block_inputs()
    with torch.no_grad():
        block.mode = "masked"
        masked = block(x, c, t)
        ref = block.routing
        block.mode = "fast"
        fast = block(x, c, t)
    assert torch.equal(block.routing.tokens, ref.tokens)
    assert 0 < ref.tokens.mean() < 1
    assert block.routing.heads[0].tolist() == [float(h) for h in heads]
    torch.testing.assert_close(fast, masked, rtol=1e-5, atol=1e-5)


def test_fast_path_with_no_tokens_or_all_tokens():
    block = DyDiTBlock.from_block(random_block(), 16, RouterConfig(token_ratio=4)).eval()
    x, c, t = block_inputs()
    for bias in (-50.0, 50.0):
        set_routers(block, [1, 0, 1], [1, 1, 0], token_scale=0.0)
        with torch.no_grad():
            block.token_router.fc2.bias.fill_(bias)
            block.mode = "masked"
            masked = block(x, c, t)
            block.mode = "fast"
            fast = block(x, c, t)
        assert block.routing.tokens.mean() == (bias > 0)
        torch.testing.assert_close(fast, masked, rtol=1e-5, atol=1e-5)


def test_fast_path_splits_a_batch_whose_samples_disagree():
    """Different timesteps in one batch: one sliced pass per distinct (heads, groups) pattern."""
    block = DyDiTBlock.from_block(random_block(), 16, RouterConfig(token_ratio=4)).eval()
    with torch.no_grad():
        for router in (block.head_router, block.group_router):
            router.linear.weight.normal_(0, 1.0)
            router.linear.bias.zero_()
    x, c, t = block_inputs(n=8)
    with torch.no_grad():
        block.mode = "masked"
        masked = block(x, c, t)
        patterns = torch.cat([block.routing.heads, block.routing.groups], 1).unique(dim=0)
        block.mode = "fast"
        fast = block(x, c, t)
    assert patterns.shape[0] > 1
    torch.testing.assert_close(fast, masked, rtol=1e-5, atol=1e-5)


def test_training_reaches_the_routers_and_refuses_the_fast_path():
    block = DyDiTBlock.from_block(random_block(), 16, RouterConfig(width_bias=1.0, token_bias=1.0)).train()
    x, c, t = block_inputs()
    block(x, c, t).square().mean().backward()
    for router in (block.head_router.linear, block.group_router.linear, block.token_router.fc2):
        assert router.bias.grad is not None and router.bias.grad.abs().sum() > 0
    block.mode = "fast"
    with pytest.raises(ValueError, match="eval mode"):
        block(x, c, t)
    with pytest.raises(ValueError, match="t_emb"):
        block.eval()(x, c)


def test_routers_can_be_switched_off():
    base = random_block()
    block = DyDiTBlock.from_block(base, 16, RouterConfig(tdw=False, sdt=False)).eval()
    assert block.head_router is None and block.token_router is None
    x, c, t = block_inputs()
    with torch.no_grad():
        assert torch.equal(block(x, c, t), base(x, c))
