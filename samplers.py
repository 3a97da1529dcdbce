"""Samplers (report §5). Each is a plain function of (model, x_T, schedule, ...) that walks the
schedule's steps from last to first (a respaced schedule for fewer steps) and returns x_0
and, for the samples indexed by trajectory_of (K,), their trajectories [x_T, ..., x_0] as
(K, S+1, C, H, W), kept on the CPU: only what a figure shows is held in memory."""
import math

import torch
from tqdm import tqdm

from helper import nearest_level, predict_x0_eps, q_posterior_mean


def denoise(model, x_t, i, sched, prediction, clip_x0):
    """One network call at step i of sched (an int, or (B,) steps), turned into (x_0, eps) via
    predict_x0_eps; x_0 optionally clipped to [-1, 1], eps then recomputed so the pair stays consistent."""
    i_batch = i if torch.is_tensor(i) else torch.full((x_t.shape[0],), i, device=x_t.device, dtype=torch.long)
    output = model(x_t, sched.timesteps.to(x_t.device)[i_batch]).float()
    x_0, eps = predict_x0_eps(output, x_t, i_batch, sched, prediction)
    if clip_x0:
        x_0 = x_0.clamp(-1, 1)
        _, eps = predict_x0_eps(x_0, x_t, i_batch, sched, "x0")
    return x_0, eps, i_batch


def noise_like(x, generator):
    return torch.randn(x.shape, generator=generator, device=x.device)


class Trajectory:
    """The states x_T, ..., x_0 of the samples indexed by `of` (K,), or nothing when `of` is None."""

    def __init__(self, x_T, of):
        self.of, self.states = of, []
        self.append(x_T)

    def append(self, x_t):
        if self.of is not None:
            self.states.append(x_t[self.of].cpu())

    def result(self, x_0):
        return x_0 if self.of is None else (x_0, torch.stack(self.states, 1))  # (K, S+1, C, H, W)


def ddpm_step(model, x_t, i, sched, prediction, sigmas, clip_x0, generator):
    """DDPM Algorithm 2's step i -> i-1: x_{t-1} = mu_theta(x_t, t) + sigma_t z, z = 0 at i = 0.
    mu_theta is DDPM eq. 7 evaluated at the predicted x_0; for eps-prediction without
    clipping this is exactly eq. 11, 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps)."""
    x_0, _, i_batch = denoise(model, x_t, i, sched, prediction, clip_x0)
    mean = q_posterior_mean(x_0, x_t, i_batch, sched)
    return mean + sigmas[i].item() * noise_like(x_t, generator) if i > 0 else mean


@torch.no_grad()
def ddpm_sample(model, x_T, sched, prediction="eps", variance="beta", clip_x0=False,
                generator=None, trajectory_of=None, progress=True):
    """DDPM Algorithm 2 (report §5): ddpm_step from x_T down to x_0."""
    sigmas = sched.sigmas(variance)
    x_t, trajectory = x_T, Trajectory(x_T, trajectory_of)
    for i in tqdm(range(sched.T - 1, -1, -1), desc="ddpm", disable=not progress, leave=False):
        x_t = ddpm_step(model, x_t, i, sched, prediction, sigmas, clip_x0, generator)
        trajectory.append(x_t)
    return trajectory.result(x_t)


def ddim_step(x_0, eps, alpha_bar_next, sigma=0.0):
    """DDIM eq. 12 (Song et al. 2021) without its noise term, from the (x_0, eps) implied at the
    current level to the level of alpha_bar_next (a number or (B, 1, 1, 1)):
    sqrt(a_next) x_0 + sqrt(1 - a_next - sigma^2) eps; sigma = 0 is the deterministic step."""
    return alpha_bar_next ** 0.5 * x_0 + torch.as_tensor(1 - alpha_bar_next - sigma ** 2).clamp(min=0).sqrt() * eps


@torch.no_grad()
def ddim_sample(model, x_T, sched, prediction="eps", eta=0.0, clip_x0=False,
                generator=None, trajectory_of=None, progress=True):
    """DDIM eq. 12 (Song et al. 2021), with a = alpha_bar_t and a' = alpha_bar_{t-1} of sched:
    x_{t-1} = sqrt(a') x_0 + sqrt(1 - a' - sigma^2) eps + sigma z,
    sigma = eta sqrt((1 - a') / (1 - a)) sqrt(1 - a / a')  (eq. 16; eta = 1 is DDPM's beta_tilde)."""
    x_t, trajectory = x_T, Trajectory(x_T, trajectory_of)
    for i in tqdm(range(sched.T - 1, -1, -1), desc="ddim", disable=not progress, leave=False):
        x_0, eps, _ = denoise(model, x_t, i, sched, prediction, clip_x0)
        alpha_bar, alpha_bar_prev = sched.alpha_bars[i].item(), sched.alpha_bars_prev[i].item()
        sigma = eta * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev))
        x_t = ddim_step(x_0, eps, alpha_bar_prev, sigma)
        if sigma > 0:
            x_t = x_t + sigma * noise_like(x_t, generator)
        trajectory.append(x_t)
    return trajectory.result(x_t)


def half_log_snr(alpha_bar):
    """lambda_t = log(alpha_t / sigma_t) of DPM-Solver, with alpha_t = sqrt(alpha_bar_t),
    sigma_t = sqrt(1 - alpha_bar_t); -inf at alpha_bar = 0 and +inf at alpha_bar = 1."""
    if alpha_bar <= 0.0:
        return -math.inf
    return math.inf if alpha_bar >= 1.0 else 0.5 * (math.log(alpha_bar) - math.log1p(-alpha_bar))


@torch.no_grad()
def dpm_solver_pp_sample(model, x_T, sched, prediction="eps", eta=0.0, clip_x0=False,
                         generator=None, trajectory_of=None, progress=True):
    """DPM-Solver++(2M), Lu et al. 2022 Alg. 2, and with eta > 0 its SDE form (ibid. §5,
    SDE-DPM-Solver++(2M)). With h = lambda_{t-1} - lambda_t, alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar):
    x_{t-1} = (sigma_{t-1} / sigma_t) e^{-eta h} x_t + alpha_{t-1} (1 - e^{-(1 + eta) h}) D
              + sigma_{t-1} sqrt(1 - e^{-2 eta h}) z,
    D = (1 + 1/(2r)) x_0(t) - 1/(2r) x_0(t+1), r = h_prev / h; first order (D = x_0(t)) at the
    first step and at the last one, which lands on x_0 exactly (sigma = 0). eta = 0 is the
    probability-flow ODE solver; eta = 1 makes a first-order step DDPM's with sigma^2 = beta_tilde."""
    x_t, trajectory = x_T, Trajectory(x_T, trajectory_of)
    x_0_next, h_next = None, None  # the previous (noisier) step's x_0 prediction and h
    for i in tqdm(range(sched.T - 1, -1, -1), desc="dpm++", disable=not progress, leave=False):
        x_0, _, _ = denoise(model, x_t, i, sched, prediction, clip_x0)
        alpha_bar, alpha_bar_prev = sched.alpha_bars[i].item(), sched.alpha_bars_prev[i].item()
        h = half_log_snr(alpha_bar_prev) - half_log_snr(alpha_bar)
        if x_0_next is None or i == 0:
            D = x_0
        else:
            r = h_next / h
            D = (1 + 1 / (2 * r)) * x_0 - 1 / (2 * r) * x_0_next
        eta_h = eta * h if eta > 0 else 0.0  # 0, not nan, when h is infinite
        sigma_ratio = math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
        x_t = sigma_ratio * math.exp(-eta_h) * x_t - math.sqrt(alpha_bar_prev) * math.expm1(-h - eta_h) * D
        noise_scale = math.sqrt(1 - alpha_bar_prev) * math.sqrt(-math.expm1(-2 * eta_h))
        if noise_scale > 0:
            x_t = x_t + noise_scale * noise_like(x_t, generator)
        x_0_next, h_next = x_0, h
        trajectory.append(x_t)
    return trajectory.result(x_t)


@torch.no_grad()
def heun_sample(model, x_T, sched, prediction="eps", eta=0.0, clip_x0=False,
                generator=None, trajectory_of=None, progress=True, stops=None):
    """Karras et al. 2022 Alg. 2 (EDM's stochastic sampler) on the levels of sched, in their
    variables x = x_t / sqrt(a), sigma = sqrt((1 - a) / a), a = alpha_bar, where x = x_0 + sigma eps
    and dx/dsigma = eps. It stops at the levels `stops` (ascending indices; default: all) and
    last at sigma = 0. From the stop at sigma to the next one at sigma':
        churn  x_hat = x + sqrt(sigma_hat^2 - sigma^2) z, sigma_hat the level nearest sigma (1 + gamma),
               gamma = eta (sqrt(2) - 1)  (EDM's S_churn / N, at its cap for eta = 1; S_noise = 1)
        Euler  x' = x_hat + (sigma' - sigma_hat) eps(x_hat, sigma_hat)
        Heun   x' = x_hat + (sigma' - sigma_hat) (eps(x_hat, sigma_hat) + eps(x', sigma')) / 2.
    Heun's correction is skipped on the last step (sigma' = 0) and on the first: from sigma_T
    (about 2e4 on the cosine schedule) eps changes over orders of magnitude of sigma, and the
    trapezoid rule lands far off where Euler's step is DDIM's. 2 len(stops) - 2 network
    evaluations. eta = 0 is Heun's method on the probability-flow ODE (Alg. 1); sigma_hat is a
    level of sched, as EDM rounds it for discrete-time models."""
    stops = list(range(sched.T)) if stops is None else list(stops)
    sigmas = sched.edm_sigmas()  # (T,) ascending, float64
    gamma = eta * (math.sqrt(2) - 1)
    trajectory = Trajectory(x_T, trajectory_of)
    scale = lambda level: sched.alpha_bars[level].sqrt().item()  # x_t = sqrt(a) x at a level
    eps_at = lambda x, level: denoise(model, scale(level) * x, level, sched, prediction, clip_x0)[1]
    x = x_T / scale(stops[-1])
    for n in tqdm(range(len(stops) - 1, -1, -1), desc="heun", disable=not progress, leave=False):
        k = stops[n]
        j = max(k, nearest_level(sigmas, sigmas[k].item() * (1 + gamma)))
        sigma, sigma_hat = sigmas[k].item(), sigmas[j].item()
        if j > k:
            x = x + math.sqrt(sigma_hat ** 2 - sigma ** 2) * noise_like(x, generator)
        eps_hat = eps_at(x, j)
        if n == 0:  # Euler to sigma = 0: x_0 = x_hat - sigma_hat eps
            x = x - sigma_hat * eps_hat
            trajectory.append(x)
            break
        sigma_next = sigmas[stops[n - 1]].item()
        x_euler = x + (sigma_next - sigma_hat) * eps_hat
        if n == len(stops) - 1:
            x = x_euler
        else:
            x = x + (sigma_next - sigma_hat) * (eps_hat + eps_at(x_euler, stops[n - 1])) / 2
        trajectory.append(scale(stops[n - 1]) * x)
    return trajectory.result(x)
