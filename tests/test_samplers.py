"""Samplers on a case with a known answer: Gaussian data and its exact optimal denoiser."""
import pytest
import torch

import helper
from helper import Schedule

MU, STD = 0.3, 0.5  # data: x_0 ~ N(MU, STD^2) in every pixel


class OptimalGaussianDenoiser(torch.nn.Module):
    """E[eps | x_t] for Gaussian data, in closed form, returned in the requested parameterisation:
    x_t ~ N(sqrt(a) MU, a STD^2 + 1 - a), so E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) MU) / (a STD^2 + 1 - a)."""

    def __init__(self, sched, prediction):
        super().__init__()
        self.sched, self.prediction = sched, prediction

    def forward(self, x_t, t):
        a = helper.extract(self.sched.alpha_bars.double(), t, x_t.shape)
        eps = (1 - a).sqrt() * (x_t - a.sqrt() * MU) / (a * STD ** 2 + 1 - a)
        x_0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
        return helper.training_target(x_0.float(), eps.float(), t, self.sched, self.prediction)


def x_T(n=20000, seed=0):
    return torch.randn(n, 1, 1, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_ddpm_recovers_gaussian_data(prediction, variance):
    sched = Schedule(helper.cosine_betas(200))
    samples = helper.ddpm_sample(OptimalGaussianDenoiser(sched, prediction), x_T().float(), sched, prediction,
                                 variance, generator=torch.Generator().manual_seed(1), progress=False)
    assert samples.mean().item() == pytest.approx(MU, abs=0.02)
    assert samples.std().item() == pytest.approx(STD, rel=0.05)


@pytest.mark.parametrize("steps", [50, 250])  # at 20 steps DDIM under-disperses by ~7%
def test_ddim_recovers_gaussian_data(steps):
    sched = Schedule(helper.cosine_betas(1000))
    samples = helper.ddim_sample(OptimalGaussianDenoiser(sched, "v"), x_T().float(), sched, steps, "v", progress=False)
    assert samples.mean().item() == pytest.approx(MU, abs=0.02)
    assert samples.std().item() == pytest.approx(STD, rel=0.05)


def test_ddim_eta_zero_is_deterministic_and_eta_one_is_not():
    sched = Schedule(helper.cosine_betas(100))
    model = OptimalGaussianDenoiser(sched, "eps")
    start = x_T(16).float()
    run = lambda eta, seed: helper.ddim_sample(model, start, sched, 10, "eps", eta=eta, progress=False,
                                               generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(run(0.0, 1), run(0.0, 2), rtol=0, atol=0)
    assert (run(1.0, 1) - run(1.0, 2)).abs().max() > 1e-3


def test_trajectory_runs_from_x_T_to_the_returned_sample():
    sched = Schedule(helper.linear_betas(10, 1e-4, 0.1))
    start = x_T(4).float()
    samples, trajectory = helper.ddpm_sample(OptimalGaussianDenoiser(sched, "eps"), start, sched,
                                             return_trajectory=True, progress=False)
    assert trajectory.shape == (4, 11, 1, 1, 1)
    assert torch.equal(trajectory[:, 0], start) and torch.equal(trajectory[:, -1], samples)


def test_ddim_timesteps_start_at_T_and_descend_to_zero():
    assert helper.ddim_timesteps(1000, 10) == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert helper.ddim_timesteps(50, 50) == list(range(49, -1, -1))
