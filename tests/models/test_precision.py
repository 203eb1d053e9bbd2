"""One precision policy: under bf16 autocast every architecture's blocks see the same residual dtype."""
import pytest
import torch

from maskdit_fast.diffusion.edm import build_net
from maskdit_fast.dydit import to_dydit
from maskdit_fast.models import RESIDUAL_DTYPE, precision_policy
from maskdit_fast.models.layers import DiTBlock
from maskdit_fast.models.masking import random_masking
from tests.helpers import tiny_model_config


def block_input_dtypes(net, masked: bool) -> set[torch.dtype]:
    """The dtypes of the residual stream entering every block (encoder and decoder) in one forward."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda _, args: seen.append(args[0].dtype))
             for m in net.modules() if isinstance(m, DiTBlock)]
    x, sigma, y = torch.randn(2, 1, 32, 32), torch.rand(2) + 0.1, torch.tensor([1, 7])
    ids_keep = random_masking(2, net.model.num_patches, 0.5) if masked else None
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        net(x, sigma, y, ids_keep=ids_keep)
    for hook in hooks:
        hook.remove()
    assert len(seen) == sum(isinstance(m, DiTBlock) for m in net.modules())
    return set(seen)


@pytest.mark.parametrize("variant", ["dit", "maskdit-masked", "maskdit-unmasked", "dydit-dit", "dydit-maskdit"])
def test_blocks_see_the_same_residual_dtype_under_bf16_autocast(variant):
    arch = "dit" if variant.endswith("dit") and not variant.endswith("maskdit") else "maskdit"
    net = build_net(tiny_model_config(arch=arch, mask_ratio=0.0 if arch == "dit" else 0.5)).eval()
    if variant.startswith("dydit"):
        net = to_dydit(net)
    assert block_input_dtypes(net, masked=variant == "maskdit-masked") == {RESIDUAL_DTYPE}


def test_the_policy_is_named_for_benchmark_rows():
    assert "fp32 residual stream" in precision_policy("bf16")
    assert precision_policy("fp32") != precision_policy("bf16")
    with pytest.raises(ValueError, match="precision must be one of"):
        precision_policy("fp8")


@pytest.mark.parametrize("autocast", [True, False])
def test_normed_outputs_reach_their_linears_in_the_autocast_dtype(autocast):
    """The LayerNorm+modulate kernels write the dtype the next Linear computes in (``out_dtype``), so
    autocast has nothing to cast; without autocast they stay in the stream's dtype."""
    from maskdit_fast.models.layers import Attention, Mlp, ModulatedLinear

    net = build_net(tiny_model_config(arch="maskdit", mask_ratio=0.5)).eval()
    readers = [m.qkv if isinstance(m, Attention) else m.fc1 if isinstance(m, Mlp) else m.linear
               for m in net.modules() if isinstance(m, (Attention, Mlp, ModulatedLinear))]
    seen = []
    hooks = [m.register_forward_pre_hook(lambda _, args: seen.append(args[0].dtype)) for m in readers]
    x, sigma, y = torch.randn(2, 1, 32, 32), torch.rand(2) + 0.1, torch.tensor([1, 7])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        net(x, sigma, y, ids_keep=random_masking(2, net.model.num_patches, 0.5))
    for hook in hooks:
        hook.remove()
    assert len(seen) == len(readers) > 0
    assert set(seen) == {torch.bfloat16 if autocast else RESIDUAL_DTYPE}
