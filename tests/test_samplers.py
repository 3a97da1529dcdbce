"""Samplers on a case with a known answer: Gaussian data and its exact optimal denoiser."""
import pytest
import torch

import config
import helper
import runs
import samplers
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
    samples = samplers.ddpm_sample(OptimalGaussianDenoiser(sched, prediction), x_T().float(), sched, prediction,
                                 variance, generator=torch.Generator().manual_seed(1), progress=False)
    assert samples.mean().item() == pytest.approx(MU, abs=0.02)
    assert samples.std().item() == pytest.approx(STD, rel=0.05)


def respaced(T, steps, spacing="trailing"):
    full = Schedule(helper.cosine_betas(T))
    return full, full.respace(helper.spaced_timesteps(T, steps, spacing))


@pytest.mark.parametrize("steps", [50, 250])  # at 20 steps DDIM under-disperses by ~7%
@pytest.mark.parametrize("spacing", ["trailing", "quadratic"])
def test_ddim_recovers_gaussian_data(steps, spacing):
    full, sched = respaced(1000, steps, spacing)
    samples = samplers.ddim_sample(OptimalGaussianDenoiser(full, "v"), x_T().float(), sched, "v", progress=False)
    assert samples.mean().item() == pytest.approx(MU, abs=0.02)
    assert samples.std().item() == pytest.approx(STD, rel=0.05)


@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_dpm_solver_pp_recovers_gaussian_data_in_few_steps(steps, prediction):
    full, sched = respaced(1000, steps)
    samples = samplers.dpm_solver_pp_sample(OptimalGaussianDenoiser(full, prediction), x_T().float(), sched,
                                          prediction, progress=False)
    assert samples.mean().item() == pytest.approx(MU, abs=0.02)
    assert samples.std().item() == pytest.approx(STD, rel=0.05)


@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_sde_dpm_solver_pp_recovers_gaussian_data_in_few_steps(steps, prediction):
    full, sched = respaced(1000, steps)
    samples = samplers.dpm_solver_pp_sample(OptimalGaussianDenoiser(full, prediction), x_T().float(), sched,
                                          prediction, eta=1.0, generator=torch.Generator().manual_seed(1),
                                          progress=False)
    assert samples.mean().item() == pytest.approx(MU, abs=0.02)
    assert samples.std().item() == pytest.approx(STD, rel=0.05)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_heun_recovers_gaussian_data_in_eleven_stops(eta, prediction):
    """EDM's sampler at 20 evaluations, deterministic (Heun on the ODE) and with the most churn."""
    full = Schedule(helper.cosine_betas(1000))
    samples = samplers.heun_sample(OptimalGaussianDenoiser(full, prediction), x_T().float(), full, prediction,
                                 eta=eta, generator=torch.Generator().manual_seed(1), progress=False,
                                 stops=helper.spaced_timesteps(1000, 11, "trailing"))
    assert samples.mean().item() == pytest.approx(MU, abs=0.02)
    assert samples.std().item() == pytest.approx(STD, rel=0.05)


class Recorder(torch.nn.Module):
    """Wraps a network and records the timesteps of every call."""

    def __init__(self, network):
        super().__init__()
        self.network, self.calls = network, []

    def forward(self, x_t, t):
        self.calls.append(int(t[0]))
        return self.network(x_t, t)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_heun_spends_two_evaluations_per_stop_and_churns_between_levels(eta):
    """sampling.steps = 20 gives heun 11 stops and 20 evaluations: one at the top stop, two at
    each of the next nine (the second, Heun's correction, at the next stop down), one at the last.
    With churn the first evaluation at a stop sits at a noisier level sigma_hat ~ sqrt(2) sigma,
    without it at the stop itself."""
    cfg = config.get_config("smoke")
    cfg = config.merge_config(cfg, {"diffusion": {"T": 1000, "schedule": "cosine"},
                                    "sampling": {"sampler": "heun", "steps": 20, "eta": eta}})
    sched = runs.sampling_schedule(cfg)
    stops = helper.spaced_timesteps(1000, 11, "trailing")
    assert sched.timesteps.tolist() == stops
    model = Recorder(OptimalGaussianDenoiser(Schedule.from_config(cfg["diffusion"]), "eps"))
    runs.run_sampler(model, x_T(8).float(), sched, cfg, torch.Generator().manual_seed(0), progress=False)
    assert len(model.calls) == 20 == runs.sampler_evaluations("heun", len(stops))
    assert model.calls[0] == stops[-1] == 999  # the top: no level above it to churn to
    corrections = model.calls[2:-1:2]  # Heun's evaluations, each at the next stop down
    assert corrections == stops[-3::-1]
    sigmas = Schedule.from_config(cfg["diffusion"]).snr().rsqrt()
    churned = model.calls[1::2]  # the first evaluation at every stop below the top
    if eta == 0:
        assert churned == stops[-2::-1]
    else:
        for level, stop in zip(churned, stops[-2::-1]):
            assert level > stop
            assert (sigmas[level] / sigmas[stop]).item() == pytest.approx(2 ** 0.5, rel=0.02)


def test_sde_dpm_solver_pp_first_order_step_is_ddpm_with_beta_tilde():
    """On two steps both updates of SDE-DPM-Solver++ are first order, so with eta = 1 it is
    DDPM Algorithm 2 with sigma^2 = beta_tilde, noise draw for noise draw."""
    full, sched = respaced(1000, 2)
    model, start = OptimalGaussianDenoiser(full, "eps"), x_T(64).float()
    sde = samplers.dpm_solver_pp_sample(model, start, sched, "eps", eta=1.0,
                                      generator=torch.Generator().manual_seed(3), progress=False)
    ddpm = samplers.ddpm_sample(model, start, sched, "eps", "beta_tilde",
                              generator=torch.Generator().manual_seed(3), progress=False)
    torch.testing.assert_close(sde, ddpm, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler", [samplers.ddim_sample, samplers.dpm_solver_pp_sample, samplers.heun_sample])
def test_stochastic_samplers_without_noise_are_their_deterministic_solvers(sampler):
    """eta = 0 ignores the generator; eta > 0 uses it."""
    full, sched = respaced(100, 10)
    model, start = OptimalGaussianDenoiser(full, "eps"), x_T(16).float()
    run = lambda eta, seed: sampler(model, start, sched, "eps", eta=eta, progress=False,
                                    generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(run(0.0, 1), run(0.0, 2), rtol=0, atol=0)
    torch.testing.assert_close(run(0.0, 1), sampler(model, start, sched, "eps", progress=False), rtol=0, atol=0)
    assert (run(1.0, 1) - run(1.0, 2)).abs().max() > 1e-3


def test_respaced_ddpm_recovers_gaussian_data():
    full, sched = respaced(1000, 100)
    samples = samplers.ddpm_sample(OptimalGaussianDenoiser(full, "eps"), x_T().float(), sched, "eps", "beta_tilde",
                                 generator=torch.Generator().manual_seed(1), progress=False)
    assert samples.mean().item() == pytest.approx(MU, abs=0.02)
    assert samples.std().item() == pytest.approx(STD, rel=0.05)


def test_respacing_keeps_alpha_bar_at_the_kept_steps():
    full, sched = respaced(1000, 10)
    keep = helper.spaced_timesteps(1000, 10, "trailing")
    torch.testing.assert_close(sched.alpha_bars, full.alpha_bars[keep])
    assert sched.timesteps.tolist() == keep


def test_trajectory_runs_from_x_T_to_the_returned_sample():
    sched = Schedule(helper.linear_betas(10, 1e-4, 0.1))
    start = x_T(4).float()
    samples, trajectory = samplers.ddpm_sample(OptimalGaussianDenoiser(sched, "eps"), start, sched,
                                             trajectory_of=torch.tensor([3, 1]), progress=False)
    assert trajectory.shape == (2, 11, 1, 1, 1)
    assert torch.equal(trajectory[:, 0], start[[3, 1]]) and torch.equal(trajectory[:, -1], samples[[3, 1]])


def test_ddim_with_many_steps_is_invertible():
    """Run the eta = 0 ODE from x_0 up to x_T (DDIM eq. 13 in reverse) and back down."""
    full, sched = respaced(1000, 500)
    model = OptimalGaussianDenoiser(full, "eps")
    x_0 = (MU + STD * x_T(64, seed=5)).float()
    x_t = x_0
    for i in range(sched.T):  # encode: step i-1 -> i along the same deterministic update
        _, eps, _ = samplers.denoise(model, x_t, i, sched, "eps", False)
        a, a_prev = sched.alpha_bars[i].item(), sched.alpha_bars_prev[i].item()
        x_0_hat = (x_t - (1 - a_prev) ** 0.5 * eps) / a_prev ** 0.5
        x_t = a ** 0.5 * x_0_hat + (1 - a) ** 0.5 * eps
    decoded = samplers.ddim_sample(model, x_t, sched, "eps", progress=False)
    torch.testing.assert_close(decoded, x_0, rtol=0, atol=0.02)


def test_spacings_place_the_requested_steps():
    assert helper.spaced_timesteps(1000, 10, "trailing") == [99, 199, 299, 399, 499, 599, 699, 799, 899, 999]
    assert helper.spaced_timesteps(1000, 4, "uniform") == [0, 250, 500, 750]
    quadratic = helper.spaced_timesteps(1000, 10, "quadratic")
    assert quadratic[0] == 0 and quadratic[-1] == 999 and quadratic[1] < 100
    assert helper.spaced_timesteps(50, 50, "trailing") == list(range(50))


def test_karras_spacing_follows_edm_eq5_on_the_levels():
    """The cosine schedule's levels nearest EDM's sigma_i for 11 stops: T-1, then 80 down to the
    lowest level's sigma (0.0064), each within 4% of its target."""
    full = Schedule(helper.cosine_betas(1000))
    sigmas = full.snr().rsqrt()
    keep = helper.spaced_timesteps(1000, 11, "karras", sigmas)
    assert keep == [0, 20, 117, 377, 697, 870, 941, 971, 984, 991, 999]
    rho, hi, lo = 7, 80 ** (1 / 7), sigmas[0].item() ** (1 / 7)
    targets = [(hi + i / 9 * (lo - hi)) ** rho for i in range(10)]
    for level, target in zip(keep[-2::-1], targets):
        assert sigmas[level].item() == pytest.approx(target, rel=0.04)
    cfg = config.merge_config(config.get_config("cpu"), {"sampling": {"spacing": "karras"}})
    assert runs.sampling_schedule(cfg).timesteps.tolist() == keep  # heun's 20 evaluations: 11 stops
    with pytest.raises(config.UserError, match="karras spacing cannot place 30 distinct steps in T=20"):
        helper.spaced_timesteps(20, 30, "karras", Schedule(helper.cosine_betas(20)).snr().rsqrt())


def test_heun_is_refused_where_sampling_starts_at_infinite_sigma():
    with pytest.raises(config.UserError, match="sigma = infinity"):
        config.with_sampling(config.get_config("paper-zero-snr"), sampler="heun")
    config.with_sampling(config.get_config("paper"), sampler="heun")  # alpha_bar_T > 0: fine
