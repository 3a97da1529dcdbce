"""Schedule constants and the forward process against their closed forms."""
import math

import pytest
import torch

import config
import helper
from forwardprocess import markov_chain
from helper import Schedule


def schedules():
    return {
        "linear": Schedule(helper.linear_betas(50, 1e-4, 1e-1)),
        "cosine": Schedule(helper.cosine_betas(1000)),
        "linear_zero_snr": Schedule(helper.rescale_zero_terminal_snr(helper.linear_betas(50, 1e-4, 1e-1))),
    }


@pytest.mark.parametrize("name", schedules().keys())
def test_alpha_bars_decrease_within_unit_interval(name):
    alpha_bars = schedules()[name].alpha_bars
    assert (alpha_bars[1:] < alpha_bars[:-1]).all()
    assert (alpha_bars >= 0).all() and (alpha_bars <= 1).all()


def test_linear_betas_match_formula():
    betas = helper.linear_betas(50, 1e-4, 1e-1)
    expected = torch.tensor([1e-4 + (1e-1 - 1e-4) * i / 49 for i in range(50)], dtype=torch.float64)
    torch.testing.assert_close(betas, expected)


def test_alpha_bars_are_cumulative_products_of_alphas():
    sched = schedules()["linear"]
    expected = [math.prod(1 - b for b in sched.betas.double().tolist()[:t + 1]) for t in range(sched.T)]
    torch.testing.assert_close(sched.alpha_bars.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)


def test_cosine_alpha_bars_match_nichol_dhariwal_formula():
    T, s = 1000, 0.008
    sched = Schedule(helper.cosine_betas(T, s))
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    expected = torch.tensor([f(t) / f(0) for t in range(1, T + 1)], dtype=torch.float64)
    # identical until beta hits its 0.999 clip in the last step
    torch.testing.assert_close(sched.alpha_bars[:-1], expected[:-1], rtol=1e-5, atol=1e-9)
    assert sched.betas.max().item() == pytest.approx(0.999)


def test_zero_terminal_snr_reaches_zero_and_keeps_first_step():
    betas = helper.linear_betas(50, 1e-4, 1e-1)
    rescaled = Schedule(helper.rescale_zero_terminal_snr(betas))
    assert rescaled.alpha_bars[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert rescaled.alpha_bars[0].item() == pytest.approx(Schedule(betas).alpha_bars[0].item(), rel=1e-6)


def test_the_zero_snr_preset_is_the_paper_preset_ending_in_pure_noise():
    paper, zero = config.get_config("paper"), config.get_config("paper-zero-snr")
    assert zero["diffusion"]["prediction"] == "v" and paper["diffusion"]["prediction"] == "eps"
    zero["diffusion"]["prediction"] = "eps"
    zero["diffusion"]["zero_terminal_snr"] = False
    assert zero == paper  # nothing else differs: same network, budget and sampler
    assert Schedule.from_config(config.get_config("paper-zero-snr")["diffusion"]).alpha_bars[-1].item() == 0.0
    assert Schedule.from_config(paper["diffusion"]).alpha_bars[-1].item() == pytest.approx(0.0749, abs=1e-4)


def test_posterior_variance_matches_closed_form_in_float64():
    sched = schedules()["cosine"]
    betas = helper.cosine_betas(1000)
    alpha_bars = torch.cumprod(1 - betas, 0)
    alpha_bars_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bars[:-1]])
    expected = (1 - alpha_bars_prev) / (1 - alpha_bars) * betas
    torch.testing.assert_close(sched.posterior_variance.double(), expected, rtol=1e-5, atol=1e-12)
    assert sched.posterior_variance[0].item() == 0.0  # q(x_0 | x_1, x_0) is a point mass


@pytest.mark.parametrize("t", [0, 10, 25, 49])
def test_q_sample_matches_closed_form_moments_on_real_digits(digits, t):
    sched = schedules()["linear"]
    x_0 = digits[:8].repeat(1000, 1, 1, 1)  # (8000, 1, 28, 28): 1000 draws per digit
    generator = torch.Generator().manual_seed(t)
    x_t = helper.q_sample(x_0, torch.full((len(x_0),), t), torch.randn(x_0.shape, generator=generator), sched)
    x_t = x_t.reshape(1000, 8, 1, 28, 28)
    alpha_bar = sched.alpha_bars[t].item()
    mean_error = x_t.mean(0) - math.sqrt(alpha_bar) * digits[:8]  # (8, 1, 28, 28)
    assert mean_error.abs().max() < 5 * math.sqrt((1 - alpha_bar) / 1000)  # 5 standard errors
    assert x_t.var(0).mean().item() == pytest.approx(1 - alpha_bar, rel=0.02)


def test_x_T_is_standard_normal_for_cosine_schedule(digits):
    sched = schedules()["cosine"]
    x_0 = digits.repeat(8, 1, 1, 1)
    x_T = helper.q_sample(x_0, torch.full((len(x_0),), sched.T - 1), torch.randn_like(x_0), sched)
    assert x_T.mean().item() == pytest.approx(0.0, abs=0.01)
    assert x_T.var().item() == pytest.approx(1.0, abs=0.01)


def test_posterior_mean_eps_form_equals_x0_form():
    sched = schedules()["linear"]
    generator = torch.Generator().manual_seed(0)
    x_0 = torch.rand(50, 1, 4, 4, generator=generator) * 2 - 1
    eps = torch.randn(x_0.shape, generator=generator)
    t = torch.arange(50)
    x_t = helper.q_sample(x_0, t, eps, sched)
    # DDPM eq. 11 (the report's boxed mu_theta), written independently
    alphas, betas, alpha_bars = (v.float().reshape(-1, 1, 1, 1) for v in (sched.alphas, sched.betas, sched.alpha_bars))
    eps_form = (x_t - betas / (1 - alpha_bars).sqrt() * eps) / alphas.sqrt()
    torch.testing.assert_close(helper.q_posterior_mean(x_0, x_t, t, sched), eps_form, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_network_output_converts_back_to_true_x0_and_eps(prediction):
    sched = schedules()["cosine"]
    generator = torch.Generator().manual_seed(1)
    x_0 = torch.rand(64, 1, 4, 4, generator=generator) * 2 - 1
    eps = torch.randn(x_0.shape, generator=generator)
    t = torch.linspace(0, 990, 64).long()  # away from the clipped last step, where 1/sqrt(alpha_bar) explodes
    x_t = helper.q_sample(x_0, t, eps, sched)
    target = helper.training_target(x_0, eps, t, sched, prediction)
    x_0_hat, eps_hat = helper.predict_x0_eps(target, x_t, t, sched, prediction)
    torch.testing.assert_close(x_0_hat, x_0, rtol=0, atol=2e-3)
    torch.testing.assert_close(eps_hat, eps, rtol=0, atol=2e-3)


def test_v_is_the_rotation_of_eps_and_x0():
    sched = schedules()["cosine"]
    t = torch.tensor([100, 500, 900])
    x_0, eps = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    phi = torch.atan2((1 - sched.alpha_bars[t]).sqrt(), sched.alpha_bars[t].sqrt()).float().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(helper.training_target(x_0, eps, t, sched, "v"), phi.cos() * eps - phi.sin() * x_0)


@pytest.mark.parametrize("preset", ["paper", "cpu"])
def test_at_t_1_the_posterior_mean_is_x_0_to_float32_precision(preset):
    """DDPM eq. 7 at the paper's t = 1 (code index 0): alpha_bar_0 = 1, so mu_tilde = x_0 exactly,
    whatever x_t is; its factors are formed in float64 before the cast."""
    sched = Schedule.from_config(config.get_config(preset)["diffusion"])
    assert sched.posterior_mean_x0[0].float().item() == 1.0 and sched.posterior_mean_xt[0].item() == 0.0
    generator = torch.Generator().manual_seed(0)
    x_0, x_t = torch.rand(8, 1, 4, 4, generator=generator) * 2 - 1, 10 * torch.randn(8, 1, 4, 4, generator=generator)
    torch.testing.assert_close(helper.q_posterior_mean(x_0, x_t, torch.zeros(8, dtype=torch.long), sched), x_0,
                               rtol=1.2e-7, atol=0)


def test_posterior_mean_factors_match_ddpm_eq_7_in_float64():
    for sched in schedules().values():
        ab, ab_prev = sched.alpha_bars, sched.alpha_bars_prev
        torch.testing.assert_close(sched.posterior_mean_x0, ab_prev.sqrt() * sched.betas / (1 - ab), rtol=1e-12, atol=0)
        torch.testing.assert_close(sched.posterior_mean_xt, sched.alphas.sqrt() * (1 - ab_prev) / (1 - ab),
                                   rtol=1e-12, atol=0)


@pytest.mark.parametrize("t", [4, 24, 49])
def test_markov_chain_and_closed_form_agree_in_distribution(digits, t):
    sched = schedules()["linear"]
    x_0 = digits[:1].repeat(4000, 1, 1, 1)
    chain = markov_chain(x_0, sched, torch.Generator().manual_seed(t))[:, t + 1]  # x_t after t+1 steps
    closed = helper.q_sample(x_0, torch.full((4000,), t), torch.randn_like(x_0), sched)
    assert (chain.mean(0) - closed.mean(0)).abs().max() < 5 * math.sqrt(2 / 4000)
    assert chain.var(0).mean().item() == pytest.approx(closed.var(0).mean().item(), rel=0.03)
