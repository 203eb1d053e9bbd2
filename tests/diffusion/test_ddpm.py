"""DDPM on DiT's schedule: respacing, one reverse step with the learned variance, DDIM, and whole
sampling runs on a Gaussian data set whose exact eps-predictor is known."""
import math

import numpy as np
import pytest
import torch

from maskdit_fast.diffusion.ddpm import Schedule, sigma_to_step, space_timesteps
from maskdit_fast.diffusion.ddpm_samplers import ddim_sample, ddpm_sample, eps_model, p_mean_log_variance


def reference_respaced(count: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept original steps, their betas) of DiT's linear schedule respaced to ``count`` steps, in float64."""
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    steps = np.unique(np.round(np.arange(count) * 999 / (count - 1)).astype(int))
    kept = abar[steps]
    return steps, 1 - kept / np.concatenate([[1.0], kept[:-1]])


def test_respacing_keeps_250_steps_from_0_to_999():
    steps = space_timesteps(1000, 250)
    assert len(steps) == 250 and steps[0] == 0 and steps[-1] == 999
    ref_steps, ref_betas = reference_respaced(250)
    spaced = Schedule.dit().respaced(250)
    assert spaced.steps.tolist() == ref_steps.tolist()
    np.testing.assert_allclose(spaced.betas.numpy(), ref_betas, rtol=1e-12)
    # the retained steps keep their abar: the respaced process is the same process
    np.testing.assert_allclose(spaced.alphas_cumprod.numpy(), Schedule.dit().alphas_cumprod[ref_steps].numpy(), rtol=1e-12)
    with pytest.raises(ValueError, match="1..1000"):
        space_timesteps(1000, 1001)


@pytest.mark.parametrize("position", [0, 1, 120, 249])
def test_one_reverse_step_with_the_learned_variance(position):
    """Mean and log variance of p(x_{i-1} | x_i) against the formulas written out in float64."""
    steps, betas = reference_respaced(250)
    abar = np.cumprod(1 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    post_log = np.log(np.concatenate([[post_var[1]], post_var[1:]]))
    g = torch.Generator().manual_seed(0)
    x_t, eps = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    values = torch.rand(3, 4, 5, 5, generator=g) * 2 - 1
    i = position
    x0 = (x_t.double() - math.sqrt(1 - abar[i]) * eps.double()) / math.sqrt(abar[i])
    mean = (betas[i] * math.sqrt(abar_prev[i]) * x0
            + (1 - abar_prev[i]) * math.sqrt(1 - betas[i]) * x_t.double()) / (1 - abar[i])
    frac = (values.double() + 1) / 2
    log_var = frac * math.log(betas[i]) + (1 - frac) * post_log[i]
    ours_mean, ours_log_var = p_mean_log_variance(Schedule.dit().respaced(250), x_t, torch.full((3,), i), eps, values)
    torch.testing.assert_close(ours_mean, mean.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_log_var, log_var.float(), rtol=1e-6, atol=1e-5)
    _, fixed = p_mean_log_variance(Schedule.dit().respaced(250), x_t, torch.full((3,), i), eps, None)
    torch.testing.assert_close(fixed, torch.full((3, 1, 1, 1), post_log[i], dtype=torch.float32))


def test_samplers_call_the_network_with_the_original_step_indices():
    calls = []

    def model(x, t):
        calls.append(t.clone())
        return torch.zeros_like(x), None

    ddpm_sample(model, torch.randn(2, 1, 2, 2), num_steps=250)
    assert [int(c[0]) for c in calls] == space_timesteps(1000, 250)[::-1]
    assert all(c.dtype == torch.long and c.shape == (2,) and (c == c[0]).all() for c in calls)
    calls.clear()
    ddim_sample(model, torch.randn(2, 1, 2, 2), num_steps=10)
    assert [int(c[0]) for c in calls] == space_timesteps(1000, 10)[::-1]


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_one_ddim_step(eta):
    steps, betas = reference_respaced(50)
    abar = np.cumprod(1 - betas)
    g = torch.Generator().manual_seed(1)
    x_T, eps, z = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    out = ddim_sample(lambda x, t: (eps, None), x_T, num_steps=2, eta=eta, step_noise=lambda i: z,
                      schedule=Schedule(torch.from_numpy(betas[:2].copy()), torch.from_numpy(steps[:2].copy())))
    # two steps: i = 1 (to abar_0, with noise), then i = 0 (to x_0, none)
    x0 = (x_T.double() - math.sqrt(1 - abar[1]) * eps.double()) / math.sqrt(abar[1])
    s = eta * math.sqrt((1 - abar[0]) / (1 - abar[1])) * math.sqrt(1 - abar[1] / abar[0])
    x1 = math.sqrt(abar[0]) * x0 + math.sqrt(1 - abar[0] - s**2) * eps.double() + s * z.double()
    expected = (x1 - math.sqrt(1 - abar[0]) * eps.double()) / math.sqrt(abar[0])
    torch.testing.assert_close(out, expected.float(), rtol=1e-5, atol=1e-5)


class GaussianDenoiser(torch.nn.Module):
    """EDM interface of the exact denoiser of data ~ N(0, s^2 I): D(x; sigma) = x s^2 / (s^2 + sigma^2)."""

    def __init__(self, s: float):
        super().__init__()
        self.s = s

    def forward(self, x, sigma, class_labels=None, cfg_scale=None):
        return x * self.s**2 / (self.s**2 + sigma.view(-1, 1, 1, 1) ** 2)


S = 0.5


def exact_eps(x_t: torch.Tensor, t: torch.Tensor):
    """The exact eps-predictor of data ~ N(0, S^2 I): sqrt(1 - abar) x_t / (abar S^2 + 1 - abar)."""
    abar = Schedule.dit().alphas_cumprod[t].float().view(-1, 1, 1, 1)
    return (1 - abar).sqrt() * x_t / (abar * S**2 + 1 - abar), None


def exact_with_variance(count: int):
    """The exact eps and the exact reverse variance of the ``count``-step respaced process, expressed as
    learned-variance values v: Var(x_prev | x_t) = beta-tilde + c^2 Var(x_0 | x_t), c the posterior's
    x_0 coefficient, Var(x_0 | x_t) = S^2 (1 - abar) / (abar S^2 + 1 - abar)."""
    spaced = Schedule.dit().respaced(count)
    position = {int(s): i for i, s in enumerate(spaced.steps)}
    abar_all, prev_all = spaced.alphas_cumprod, spaced.alphas_cumprod_prev

    def model(x_t, t):
        eps, _ = exact_eps(x_t, t)
        i = position[int(t[0])]
        abar, prev, beta = abar_all[i], prev_all[i], spaced.betas[i]
        c = beta * prev.sqrt() / (1 - abar)
        var = spaced.posterior_variance[i] + c**2 * S**2 * (1 - abar) / (abar * S**2 + 1 - abar)
        lo, hi = spaced.posterior_log_variance_clipped[i], beta.log()
        v = 2 * (var.log() - lo) / (hi - lo) - 1
        return eps, torch.full_like(x_t, float(v.clamp(-1, 1)))

    return model


@pytest.mark.parametrize("sampler,source,steps", [
    ("ddpm", "eps+learned variance", 100),
    ("ddpm", "edm-denoiser", 1000),  # fixed small variance: under-disperses with few steps (0.486 S at 250)
    ("ddim", "eps", 250),  # first order: 0.474 S at 50 steps, 0.4965 S at 250
    ("ddim", "edm-denoiser", 250),
])
def test_sampling_with_the_exact_predictor_recovers_the_data_distribution(sampler, source, steps):
    torch.manual_seed(0)
    noise = torch.randn(4000, 1, 2, 2)
    model = {"eps+learned variance": exact_with_variance(steps), "eps": exact_eps,
             "edm-denoiser": eps_model(GaussianDenoiser(S), None)}[source]
    x = (ddpm_sample if sampler == "ddpm" else ddim_sample)(model, noise, num_steps=steps)
    assert x.std().item() == pytest.approx(S, rel=0.015)
    assert abs(x.mean().item()) < 0.02


def test_sigma_to_step_is_exact_at_the_steps_and_monotone_between():
    sigmas = Schedule.dit().sigmas
    t = sigma_to_step(sigmas.float(), sigmas)
    assert torch.equal(t, torch.arange(1000, dtype=torch.float32))
    between = sigma_to_step((sigmas[:-1] * sigmas[1:]).sqrt().float(), sigmas)
    assert ((between > torch.arange(999)) & (between < torch.arange(1, 1000))).all()
