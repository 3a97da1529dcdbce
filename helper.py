"""Noise schedules, the forward process q(x_t | x_0) and its loss, and the timestep embedding:
the report's §2, §4 and §6 as equations (the config: config.py; the samplers of §5: samplers.py).

Timestep convention: code indices t = 0, ..., T-1 stand for the paper's t = 1, ..., T,
so betas[t] is the paper's beta_{t+1} and alpha_bars_prev[0] = alpha_bar_0 = 1.
"""
import math

import torch

from config import UserError


# ----------------------------------------------------------------------------------------
# Noise schedules (report §2) and every constant derived from them.

def linear_betas(T, beta_start, beta_end):
    """Ho et al. 2020 §4: beta_t linear from beta_1 = beta_start to beta_T = beta_end. (T,)"""
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def cosine_betas(T, s=0.008, max_beta=0.999):
    """Nichol & Dhariwal 2021 eq. 17: alpha_bar(t) = f(t)/f(0), f(t) = cos^2((t/T + s)/(1 + s) pi/2);
    beta_t = 1 - alpha_bar(t)/alpha_bar(t-1), clipped at max_beta. (T,)"""
    t = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def rescale_zero_terminal_snr(betas):
    """Lin et al. 2024 Alg. 1: shift and scale sqrt(alpha_bar) so that alpha_bar_T = 0 while
    alpha_bar_1 is unchanged; returns the betas of the rescaled schedule. (T,)"""
    sqrt_alpha_bars = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_alpha_bars[0].clone(), sqrt_alpha_bars[-1].clone()
    sqrt_alpha_bars = (sqrt_alpha_bars - last) * first / (first - last)
    alpha_bars = sqrt_alpha_bars ** 2
    alphas = torch.cat([alpha_bars[:1], alpha_bars[1:] / alpha_bars[:-1]])
    return 1 - alphas


class Schedule:
    """The constants of a beta schedule, computed once and kept in float64.

    betas                beta_t
    alphas               alpha_t = 1 - beta_t
    alpha_bars           alpha_bar_t = prod_{s<=t} alpha_s
    alpha_bars_prev      alpha_bar_{t-1}, with alpha_bar_0 = 1
    posterior_variance   beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t  (DDPM eq. 7)
    posterior_mean_x0    sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t), mu_tilde's factor on x_0 (eq. 7)
    posterior_mean_xt    sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t), its factor on x_t
    timesteps            the network's timestep index for each step: 0..T-1, or the kept
                         steps of a respaced schedule
    """

    def __init__(self, betas, timesteps=None):
        assert betas.ndim == 1 and (betas > 0).all() and (betas <= 1).all(), "betas must lie in (0, 1]"
        self.T = len(betas)
        self.betas = betas.double()
        self.alphas = 1 - self.betas
        self.alpha_bars = torch.cumprod(self.alphas, 0)
        self.alpha_bars_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bars[:-1]])
        self.posterior_variance = (1 - self.alpha_bars_prev) / (1 - self.alpha_bars) * self.betas
        self.posterior_mean_x0 = self.alpha_bars_prev.sqrt() * self.betas / (1 - self.alpha_bars)
        self.posterior_mean_xt = self.alphas.sqrt() * (1 - self.alpha_bars_prev) / (1 - self.alpha_bars)
        self.timesteps = torch.arange(self.T) if timesteps is None else torch.as_tensor(timesteps)

    @classmethod
    def from_config(cls, diffusion):
        if diffusion["schedule"] == "linear":
            betas = linear_betas(diffusion["T"], diffusion["beta_start"], diffusion["beta_end"])
        else:
            betas = cosine_betas(diffusion["T"], diffusion["cosine_s"])
        if diffusion["zero_terminal_snr"]:
            betas = rescale_zero_terminal_snr(betas)
        return cls(betas)

    def respace(self, keep):
        """Nichol & Dhariwal 2021 §4: the schedule on the kept steps `keep` (ascending indices),
        with betas 1 - alpha_bar_{k_i} / alpha_bar_{k_(i-1)}, so alpha_bar is unchanged there."""
        keep = torch.as_tensor(keep)
        assert keep.ndim == 1 and (keep[1:] > keep[:-1]).all(), "keep must be ascending"
        alpha_bars = self.alpha_bars[keep]
        alpha_bars_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bars[:-1]])
        return Schedule(1 - alpha_bars / alpha_bars_prev, self.timesteps[keep])

    def sigmas(self, variance):
        """Sampler noise scale sigma_t: sqrt(beta_t) (the report's) or sqrt(beta_tilde_t). (T,)"""
        return (self.betas if variance == "beta" else self.posterior_variance).sqrt()

    def snr(self):
        """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t). (T,)"""
        return self.alpha_bars / (1 - self.alpha_bars)

    def edm_sigmas(self):
        """EDM's noise level of each step, sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) = 1 / sqrt(SNR_t):
        x_t / sqrt(alpha_bar_t) = x_0 + sigma_t eps (Karras et al. 2022 §2). (T,), ascending."""
        return self.snr().rsqrt()


def spaced_timesteps(T, steps, spacing, sigmas=None):
    """`steps` of the T timestep indices, ascending. trailing: evenly spaced and ending at T-1,
    where x_T lives (Lin et al. 2024 Table 2); uniform: evenly spaced from 0 (DDIM's "linear");
    quadratic: denser near t = 0 (DDIM's CIFAR-10 choice), one index apart at least; karras:
    EDM's (karras_timesteps) on the levels of noise sigmas (T,)."""
    if spacing == "karras":
        keep = karras_timesteps(sigmas, steps)
    elif spacing == "trailing":
        keep = [round(T - i * T / steps) - 1 for i in range(steps)]
    elif spacing == "uniform":
        keep = [round(i * T / steps) for i in range(steps)]
    else:
        keep = [i + round((i / max(1, steps - 1)) ** 2 * (T - steps)) for i in range(steps)]
    keep = sorted(set(keep))
    if len(keep) < steps:
        raise UserError(f"{spacing} spacing cannot place {steps} distinct steps in T={T}")
    return keep


def nearest_level(sigmas, sigma):
    """The index of the level in sigmas (ascending) whose noise is nearest sigma, in log sigma."""
    return int((sigmas.log() - math.log(sigma)).abs().argmin())


def karras_timesteps(sigmas, steps, rho=7.0, sigma_max=80.0):
    """EDM's discretisation (Karras et al. 2022 eq. 5) on the levels of noise sigmas (T,):
    T-1, where x_T lives, and the levels nearest, in log sigma,
        sigma_i = (sigma_max^(1/rho) + i / (steps - 2) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
    i = 0 .. steps - 2, with sigma_min the lowest level's; rho = 7 and sigma_max = 80 are EDM's.
    Levels that two sigma_i share are kept once (spaced_timesteps refuses too few)."""
    hi, lo = sigma_max ** (1 / rho), sigmas[0].item() ** (1 / rho)
    targets = [(hi + i / max(1, steps - 2) * (lo - hi)) ** rho for i in range(steps - 1)]
    return [nearest_level(sigmas, sigma) for sigma in targets] + [len(sigmas) - 1]


def extract(values, t, shape):
    """values[t] for a batch of timesteps t (B,), shaped (B, 1, 1, ...) to broadcast to `shape`."""
    assert t.ndim == 1 and t.shape[0] == shape[0], f"t {tuple(t.shape)} vs batch {tuple(shape)}"
    return values.to(t.device, torch.float32)[t].reshape(-1, *([1] * (len(shape) - 1)))  # (B,) -> (B, 1, 1, 1)


# ----------------------------------------------------------------------------------------
# Forward process and the three parameterisations (report §2, §4).

def q_sample(x_0, t, eps, sched):
    """DDPM eq. 4 in reparameterised form (report (*)):
    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.  x_0, eps: (B, C, H, W); t: (B,)"""
    alpha_bar = extract(sched.alpha_bars, t, x_0.shape)
    return alpha_bar.sqrt() * x_0 + (1 - alpha_bar).sqrt() * eps


def q_sample_step(x_prev, t, eps, sched):
    """One Markov step of DDPM eq. 2: x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps."""
    beta = extract(sched.betas, t, x_prev.shape)
    return (1 - beta).sqrt() * x_prev + beta.sqrt() * eps


def training_target(x_0, eps, t, sched, prediction):
    """What the network learns to output at x_t: eps (DDPM), x_0, or v = sqrt(alpha_bar_t) eps -
    sqrt(1 - alpha_bar_t) x_0 (Salimans & Ho 2022 §4)."""
    if prediction != "v":
        return eps if prediction == "eps" else x_0
    alpha_bar = extract(sched.alpha_bars, t, x_0.shape)
    return alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x_0


def predict_x0_eps(model_output, x_t, t, sched, prediction):
    """Turn a network output (eps, x0 or v) into the pair (x_0, eps) it implies at x_t.
    From (*): x_0 = (x_t - sqrt(1 - a) eps) / sqrt(a), and for v:
    x_0 = sqrt(a) x_t - sqrt(1 - a) v, eps = sqrt(1 - a) x_t + sqrt(a) v, with a = alpha_bar_t."""
    alpha_bar = extract(sched.alpha_bars, t, x_t.shape)
    if prediction == "eps":
        eps = model_output
        return (x_t - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt(), eps
    if prediction == "v":
        v = model_output
        return alpha_bar.sqrt() * x_t - (1 - alpha_bar).sqrt() * v, (1 - alpha_bar).sqrt() * x_t + alpha_bar.sqrt() * v
    x_0 = model_output
    return x_0, (x_t - alpha_bar.sqrt() * x_0) / (1 - alpha_bar).sqrt()  # eps from (*)


def q_posterior_mean(x_0, x_t, t, sched):
    """DDPM eq. 7: mu_tilde_t(x_t, x_0) = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x_0
    + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t, its two factors formed in
    float64 by Schedule (at t = 1 they are exactly 1 and 0).  Shapes (B, C, H, W)."""
    return (extract(sched.posterior_mean_x0, t, x_t.shape) * x_0
            + extract(sched.posterior_mean_xt, t, x_t.shape) * x_t)


def diffusion_loss(network, x_0, t, eps, sched, prediction, min_snr_gamma=0.0, labels=None):
    """DDPM Algorithm 1 / L_simple (eq. 14) for the draws t (B,) and eps (B, C, H, W): the network
    at x_t = q_sample(x_0, t, eps) regresses its target (eps, x_0 or v), the squared error
    averaged (not summed) over pixels, so the loss scale and the useful learning rate do not
    depend on batch or image size. A conditional network also sees the labels (B,). With
    min_snr_gamma > 0 each t is weighted min(SNR_t, gamma) in x_0 units (Hang et al. 2023),
    divided by what the target already weighs (SNR for eps, SNR + 1 for v)."""
    x_t = q_sample(x_0, t, eps, sched)
    output = network(x_t, t) if labels is None else network(x_t, t, labels)
    target = training_target(x_0, eps, t, sched, prediction)
    per_sample = (output.float() - target).pow(2).mean(dim=(1, 2, 3))  # (B,), in fp32
    if min_snr_gamma > 0:
        snr = sched.snr().to(x_0.device)[t]
        divisor = {"eps": snr, "v": snr + 1, "x0": torch.ones_like(snr)}[prediction]
        per_sample = per_sample * snr.clamp(max=min_snr_gamma) / divisor
    return per_sample.mean()


# ----------------------------------------------------------------------------------------
# Timestep embedding (report §6).

def get_timestep_embedding(timesteps, embedding_dim):
    """Sinusoidal embedding of Vaswani et al. 2017 §3.5: timesteps (B,) -> (B, embedding_dim)."""
    assert timesteps.ndim == 1
    half_dim = embedding_dim // 2
    frequencies = torch.exp(torch.arange(half_dim, device=timesteps.device) * -(math.log(10000) / (half_dim - 1)))
    args = timesteps.float()[:, None] * frequencies[None, :]  # (B, half_dim)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # (B, 2 * half_dim)
    return torch.nn.functional.pad(emb, (0, embedding_dim % 2))  # (B, embedding_dim)
