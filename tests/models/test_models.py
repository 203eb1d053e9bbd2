import pytest
import torch

from maskdit_fast.diffusion.edm import build_net
from maskdit_fast.config import DIT_SIZES, ModelConfig
from maskdit_fast.models import DiT, MaskDiT, build_model
from maskdit_fast.models.layers import patchify, sincos_pos_embed_2d, unpatchify
from maskdit_fast.models.masking import random_masking
from tests.helpers import tiny_model_config


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Zero-initialised layers hide bugs: give every parameter random values."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("size", list(DIT_SIZES))
@pytest.mark.parametrize("patch", [2, 4, 8])
def test_presets_match_the_dit_paper(size, patch):
    cfg = ModelConfig(arch="dit", size=size, patch_size=patch, mask_ratio=0.0)
    width, depth, heads = DIT_SIZES[size]
    with torch.device("meta"):
        model = build_model(cfg)
    assert (cfg.hidden_size, cfg.depth, cfg.num_heads) == (width, depth, heads)
    assert len(model.blocks) == depth and model.blocks[0].attn.num_heads == heads
    assert model.num_patches == (32 // patch) ** 2


def test_maskdit_xl2_has_the_official_parameter_count():
    # 730,541,200 elements in the official file, of which the frozen pos embeddings
    # (256x1152 + 256x512) are recomputed here instead of stored.
    with torch.device("meta"):
        model = build_model(ModelConfig())
    assert sum(p.numel() for p in model.parameters()) == 730_541_200 - 256 * 1152 - 256 * 512


def test_dit_initialisation_outputs_zero_and_embeddings_are_frozen():
    model = build_model(tiny_model_config(arch="dit", mask_ratio=0.0))
    x = torch.randn(2, 1, 32, 32)
    out = model(x, torch.randn(2), torch.tensor([1, 2]))
    assert out.shape == x.shape and torch.all(out == 0)
    for block in model.blocks:
        assert torch.all(block.adaLN_modulation[-1].weight == 0)
    assert "pos_embed" not in dict(model.named_parameters())


def test_sincos_embedding_layout():
    pe = sincos_pos_embed_2d(8, 3)
    # token (row 1, col 2) = index 5: first half encodes the column, second half the row
    assert pe.shape == (9, 8)
    assert torch.allclose(pe[5, :4], torch.tensor([torch.sin(torch.tensor(2.0)), torch.sin(torch.tensor(0.02)),
                                                  torch.cos(torch.tensor(2.0)), torch.cos(torch.tensor(0.02))]))
    assert torch.allclose(pe[5, 4:], torch.tensor([torch.sin(torch.tensor(1.0)), torch.sin(torch.tensor(0.01)),
                                                  torch.cos(torch.tensor(1.0)), torch.cos(torch.tensor(0.01))]))


def test_patchify_roundtrip():
    x = torch.randn(2, 3, 8, 8)
    tokens = patchify(x, 4)
    assert tokens.shape == (2, 4, 48)
    assert torch.equal(tokens[0, 1].view(4, 4, 3)[:, :, 0], x[0, 0, 0:4, 4:8])
    assert torch.equal(unpatchify(tokens, 4, 3), x)


def test_maskdit_with_every_token_kept_equals_the_unmasked_path():
    model = randomize(MaskDiT(tiny_model_config())).eval()
    x, t, y = torch.randn(3, 1, 32, 32), torch.randn(3), torch.tensor([0, 5, 9])
    ids_all = torch.stack([torch.randperm(model.num_patches) for _ in range(3)])
    full = model(x, t, y)
    assert torch.allclose(model(x, t, y, ids_keep=ids_all), full, atol=1e-5)


def test_masked_tokens_do_not_reach_the_encoder():
    model = randomize(MaskDiT(tiny_model_config())).eval()
    x, t, y = torch.randn(1, 1, 32, 32), torch.randn(1), torch.tensor([3])
    ids = random_masking(1, model.num_patches, 0.5)
    kept_pixels = torch.zeros(1, 1, 32, 32)
    p = model.patch_size
    for i in ids[0].tolist():
        r, c = divmod(i, 32 // p)
        kept_pixels[..., r * p:(r + 1) * p, c * p:(c + 1) * p] = 1
    changed = x + (1 - kept_pixels) * torch.randn_like(x)  # only masked patches differ
    assert torch.allclose(model(x, t, y, ids_keep=ids), model(changed, t, y, ids_keep=ids), atol=1e-6)
    assert not torch.allclose(model(x, t, y), model(changed, t, y), atol=1e-3)


def test_plain_dit_refuses_masks():
    model = DiT(tiny_model_config(arch="dit", mask_ratio=0.0))
    with pytest.raises(ValueError, match="no decoder"):
        model(torch.randn(1, 1, 32, 32), torch.randn(1), None, ids_keep=torch.zeros(1, 4, dtype=torch.long))


def test_null_label_embeds_to_zero_and_dropout_only_in_training():
    model = build_model(tiny_model_config())
    emb = model.y_embedder
    assert torch.all(emb(torch.tensor([10])) == 0)
    emb.dropout = 0.5
    labels = torch.zeros(4000, dtype=torch.long)
    dropped = (emb.train()(labels) == 0).all(dim=1).float().mean()
    assert 0.45 < dropped < 0.55
    assert not (emb.eval()(labels) == 0).all(dim=1).any()


def test_unconditional_model_has_no_label_embedder():
    net = build_net(tiny_model_config(num_classes=0))
    assert net.model.y_embedder is None
    assert net(torch.randn(2, 1, 32, 32), 1.0).shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match="unconditional"):
        net(torch.randn(2, 1, 32, 32), 1.0, torch.tensor([1, 2]))


def test_noise_embed_scale_scales_the_timestep_embedders_input():
    """model.noise_embed_scale=s feeds s * c_noise to the sinusoids: the same as scaling t by hand."""
    embedder = randomize(build_model(tiny_model_config(noise_embed_scale=250.0))).eval().t_embedder
    t = torch.tensor([-1.3, 0.0, 0.4])
    scaled = embedder(t)
    embedder.input_scale = 1.0
    torch.testing.assert_close(scaled, embedder(250.0 * t))
    assert not torch.allclose(scaled, embedder(t))
