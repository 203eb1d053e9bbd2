"""The sampler against a closed form: for Gaussian data N(mu, s^2) the exact EDM denoiser is
D(x; sigma) = (s^2 x + sigma^2 mu) / (s^2 + sigma^2); integrating the ODE with it must map
N(0, sigma_max^2) noise back to N(mu, s^2)."""
import pytest
import torch

from maskdit_fast.diffusion.samplers import edm_sample, edm_time_steps

MU, STD = 0.7, 0.3


def exact_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s2 = sigma.view(-1, *([1] * (x.dim() - 1))).double() ** 2
    return ((STD**2 * x.double() + s2 * MU) / (STD**2 + s2)).float()


def test_time_steps_follow_the_edm_schedule():
    t = edm_time_steps(18)
    assert t.shape == (19,) and t[-1] == 0
    assert torch.isclose(t[0], torch.tensor(80.0, dtype=torch.float64))
    assert torch.isclose(t[-2], torch.tensor(0.002, dtype=torch.float64))
    assert torch.all(t[1:] < t[:-1])
    i = 7
    expected = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert torch.isclose(t[i], torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("solver,steps,tol", [("heun", 32, 0.01), ("euler", 256, 0.02)])
def test_sampler_reproduces_gaussian_data(solver, steps, tol):
    noise = torch.randn(20000, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    x = edm_sample(exact_denoiser, noise, num_steps=steps, solver=solver)
    assert abs(x.mean().item() - MU) < tol
    assert abs(x.std().item() - STD) < tol


def test_heun_converges_faster_than_euler():
    noise = torch.randn(5000, 4, generator=torch.Generator().manual_seed(1))
    # the exact flow from sigma_max = 80 ends at mu + s / sqrt(s^2 + 80^2) * (80 * noise - mu)
    target = MU + STD / (STD**2 + 80.0**2) ** 0.5 * (80.0 * noise - MU)

    def error(solver, steps):
        return (edm_sample(exact_denoiser, noise, num_steps=steps, solver=solver) - target).abs().mean().item()

    heun24, heun48, euler24, euler48 = error("heun", 24), error("heun", 48), error("euler", 24), error("euler", 48)
    assert heun24 < 0.5 * euler24 and heun48 < 0.004
    assert heun24 / heun48 > 2.5  # second order: about 4x per doubling once in the asymptotic range
    assert 1.5 < euler24 / euler48 < 2.5  # first order: about 2x


def test_bad_solver_is_rejected():
    with pytest.raises(ValueError, match="solver"):
        edm_sample(exact_denoiser, torch.randn(2, 3), num_steps=2, solver="rk4")
