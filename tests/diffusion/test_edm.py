import torch

from maskdit_fast.diffusion.edm import build_net
from tests.helpers import tiny_model_config


def random_net(**changes):
    net = build_net(tiny_model_config(**changes)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    return net


def test_preconditioning_coefficients():
    net = random_net()
    x, sigma, y = torch.randn(2, 1, 32, 32), torch.tensor([0.3, 4.0]), torch.tensor([1, 2])
    s = sigma.view(-1, 1, 1, 1)
    raw = net.model(x / (s**2 + 0.25).sqrt(), sigma.log() / 4, y)
    expected = 0.25 / (s**2 + 0.25) * x + s * 0.5 / (s**2 + 0.25).sqrt() * raw
    assert torch.allclose(net(x, sigma, y), expected, atol=1e-6)


def test_fresh_network_returns_c_skip_times_x():
    net = build_net(tiny_model_config())
    x = torch.randn(2, 1, 32, 32)
    assert torch.allclose(net(x, 2.0), 0.25 / 4.25 * x, atol=1e-6)


def test_guidance_extrapolates_from_the_unconditional_output():
    net = random_net()
    x, sigma, y = torch.randn(3, 1, 32, 32), torch.tensor([0.5, 1.0, 9.0]), torch.tensor([0, 4, 9])
    cond, uncond = net(x, sigma, y), net(x, sigma, None)
    assert torch.allclose(net(x, sigma, y, cfg_scale=2.5), uncond + 2.5 * (cond - uncond), atol=1e-5)
    assert torch.allclose(net(x, sigma, y, cfg_scale=1.0), cond)
    null = torch.full((3,), 10)
    assert torch.allclose(net(x, sigma, null), uncond)


def test_bad_labels_are_rejected():
    net = random_net()
    x = torch.randn(2, 1, 32, 32)
    for labels in (torch.tensor([0, 11]), torch.tensor([-1, 0]), torch.tensor([1, 2, 3])):
        try:
            net(x, 1.0, labels)
        except ValueError:
            continue
        raise AssertionError(f"labels {labels} were accepted")
