import math

import torch

from maskdit_fast.diffusion.edm import build_net
from maskdit_fast.config import LossConfig
from maskdit_fast.diffusion.loss import dsm_loss, edm_loss, edm_weight, mae_loss
from maskdit_fast.models.masking import mask_from_ids, random_masking
from tests.helpers import tiny_model_config


def test_edm_weight_definition():
    sigma = torch.tensor([0.1, 0.5, 3.0])
    assert torch.allclose(edm_weight(sigma, 0.5), (sigma**2 + 0.25) / (sigma * 0.5) ** 2)


def test_dsm_loss_averages_patches_then_kept_patches():
    err = torch.rand(2, 3, 8, 8)
    ids = random_masking(2, 4, 0.5)
    mask = mask_from_ids(ids, 4)
    got = dsm_loss(err, 4, mask)
    for n in range(2):
        per_patch = [err[n, :, r * 4:(r + 1) * 4, c * 4:(c + 1) * 4].mean() for r in range(2) for c in range(2)]
        kept = [per_patch[i] for i in ids[n].tolist()]
        assert math.isclose(got[n].item(), sum(kept).item() / len(kept), rel_tol=1e-6)
    assert torch.allclose(dsm_loss(err, 4, None), err.mean(dim=(1, 2, 3)))


def test_mae_loss_uses_per_patch_normalised_noisy_target_on_masked_patches():
    noisy, denoised = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    ids = random_masking(2, 4, 0.5)
    mask = mask_from_ids(ids, 4)
    got = mae_loss(noisy, denoised, 4, mask)
    for n in range(2):
        losses = []
        for i in range(4):
            if mask[n, i] == 0:
                continue
            r, c = divmod(i, 2)
            t = noisy[n, 0, r * 4:(r + 1) * 4, c * 4:(c + 1) * 4].flatten()
            p = denoised[n, 0, r * 4:(r + 1) * 4, c * 4:(c + 1) * 4].flatten()
            t = (t - t.mean()) / (t.var(unbiased=True) + 1e-6).sqrt()
            losses.append(((p - t) ** 2).mean())
        assert math.isclose(got[n].item(), (sum(losses) / len(losses)).item(), rel_tol=1e-5)


def test_edm_loss_pieces_combine_with_the_mae_coefficient():
    model = tiny_model_config()
    net = build_net(model)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    x, y = torch.randn(4, 1, 32, 32), torch.randint(0, 10, (4,))
    terms = edm_loss(net, x, y, 0.5, LossConfig(mae_coef=0.1), model)
    assert terms.loss.shape == (4,)
    assert torch.allclose(terms.loss, terms.dsm + 0.1 * terms.mae)
    assert torch.all(terms.mae > 0)
    unmasked = edm_loss(net, x, y, 0.0, LossConfig(mae_coef=0.1), model)
    assert torch.all(unmasked.mae == 0) and torch.equal(unmasked.loss, unmasked.dsm)


def test_unmasked_loss_matches_the_edm_definition():
    model = tiny_model_config(arch="dit", mask_ratio=0.0)
    net = build_net(model).eval()
    x = torch.randn(3, 1, 32, 32)
    torch.manual_seed(5)
    terms = edm_loss(net, x, None, 0.0, LossConfig(), model)
    torch.manual_seed(5)
    sigma = (torch.randn(3) * 1.2 - 1.2).exp().view(-1, 1, 1, 1)
    noisy = x + torch.randn_like(x) * sigma
    denoised = net(noisy, sigma.flatten())
    expected = ((sigma**2 + 0.25) / (sigma * 0.5) ** 2 * (denoised - x) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(terms.loss, expected, rtol=1e-5)
