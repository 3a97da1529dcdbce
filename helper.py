"""Configuration, noise schedules, the forward process q(x_t | x_0), the timestep
embedding and the samplers: everything the report's §2, §4 and §5 write as equations.

Timestep convention: code indices t = 0, ..., T-1 stand for the paper's t = 1, ..., T,
so betas[t] is the paper's beta_{t+1} and alpha_bars_prev[0] = alpha_bar_0 = 1.
"""
import copy
import math

import torch
from tqdm import tqdm

# ----------------------------------------------------------------------------------------
# Configuration: every default once, presets are small override dicts.

config = {
    "data": {
        "name": "mnist",           # a torchvision dataset (data.DATASETS), a folder of images or an .npz
        "root": "data",            # where torchvision datasets live (MNIST/raw/ for mnist)
        "image_size": 28,          # S x S the model sees: the data's own, or what --set data.image_size=S resizes to
        "channels": 1,             # 1 (greyscale) or 3 (RGB), as the data's
    },
    "model": {
        "ch": 128,                 # base channel width of the U-Net
        "ch_mult": [1, 2, 2],      # width multiplier per resolution level: 28 -> 14 -> 7
        "num_res_blocks": 2,       # ResnetBlocks per level on the way down (+1 on the way up)
        "attn_resolutions": [1],   # resolutions with self-attention; [1]: bottleneck only
        "dropout": 0.1,            # inside every ResnetBlock, before its second conv
        "resamp_with_conv": True,  # strided conv down / conv after nearest-neighbour up
        "num_classes": 0,          # 0: unconditional; else class-conditional (10 for the MNIST digit)
        "norm_group_channels": 4,  # channels per GroupNorm group (at most 32 groups per layer)
        "guidance_embedding": False,  # the guidance weight w is an input (a guidance-distilled student)
    },
    "diffusion": {
        "T": 50,                   # number of diffusion steps
        "schedule": "linear",      # linear (Ho et al.) or cosine (Nichol & Dhariwal)
        "beta_start": 1e-4,        # linear schedule: beta_1
        "beta_end": 1e-1,          # linear schedule: beta_T
        "cosine_s": 0.008,         # cosine schedule offset, keeps beta_1 from being ~0
        "zero_terminal_snr": False,  # rescale betas so alpha_bar_T = 0 (Lin et al. 2024)
        "prediction": "eps",       # what the network outputs: eps, x0 or v
    },
    "training": {
        "seed": 0,                 # seeds model init, data order, t and eps draws
        "batch_size": 16,
        "epochs": 3,               # used unless steps > 0
        "steps": 0,                # optimiser steps; 0 means the time budget, else epochs of the training images
        "minutes": 0.0,            # time budget (compilation and final grid included) that fixes steps
                                   # from the step rate measured at the start; 0 = none
        "optimizer": "adam",       # adam or adamw
        "lr": 2e-4,                # peak learning rate
        "weight_decay": 0.0,       # decoupled weight decay (adamw only)
        "warmup_steps": 0,         # linear LR warm-up from 0 to lr
        "lr_decay": "constant",    # constant, or cosine decay to min_lr_ratio * lr at the end
        "min_lr_ratio": 0.0,
        "grad_clip": 0.0,          # clip the global grad norm to this; 0 disables
        "ema_decay": 0.9999,       # EMA of weights, ramped as min(decay, (1+n)/(10+n))
        "extra_ema_decays": [],    # more EMA copies kept in ckpt.pt, for evaluate.py --ema to compare
        "min_snr_gamma": 0.0,      # min-SNR-gamma loss weighting (Hang et al. 2023); 0 = off
        "p_uncond": 0.1,           # conditional models: share of labels replaced by the null label
        "bf16": "auto",            # bf16 autocast: auto (CPU with AMX/AVX512-bf16, or CUDA), on, off
        "compile": False,          # torch.compile the training network (inductor)
        "checkpoint_every": 1000,  # optimiser steps between checkpoints
        "guides": [],              # fractions of the run's steps at which the EMA is saved as out/guide-F.pt,
                                   # a guide for autoguidance (--guide; docs/quality.md)
        "device": "auto",          # auto: cuda if available, else cpu
    },
    "sampling": {
        "sampler": "ddpm",         # ddpm (ancestral, report §5), ddim, dpm++ (DPM-Solver++(2M)) or heun (EDM's)
        "steps": 0,                # network evaluations; fewer than T respaces the schedule; 0 = T
        "spacing": "trailing",     # which steps are kept: trailing, uniform, quadratic or karras (EDM's)
        "variance": "beta",        # ddpm sigma_t^2: beta (the report's) or beta_tilde
        "eta": 0.0,                # ddim, dpm++, heun noise: 0 deterministic (the ODE), 1 DDPM-like / EDM's most churn
        "clip_x0": False,          # clip the implied x_0 to [-1, 1] at every step
        "guidance": 1.5,           # guidance w: 0 unconditional (or the guide alone), 1 conditional, >1 guided
                                   # (the least w whose samples are the requested digit; docs/control.md)
        "guide": "",               # autoguidance's guide (Karras et al. 2024), a weights file beside the checkpoint
                                   # (training.guides saves them); "": classifier-free guidance (docs/quality.md)
        "guidance_interval": [],   # [lo, hi]: guide only where sigma = sqrt((1 - alpha_bar) / alpha_bar)
                                   # lies in (lo, hi], w = 1 elsewhere (Kynkäänniemi et al. 2024); []: everywhere
        "compile": False,          # torch.compile the sampling network, weights frozen (see benchmark.py)
        "num_samples": 64,         # samples in the grid main.py writes at the end
    },
    "distill": {                   # what distill.py made of a teacher (docs/distill.md)
        "stage": "",               # "": trained by main.py; guidance: w is an input (Meng et al. 2023);
                                   # progressive: a few-step student (Salimans & Ho 2022);
                                   # consistency: a one- or two-step student (Song et al. 2023)
        "steps": 0,                # progressive, consistency: the DDIM steps the student samples with
        "guidance_range": [0.0, 2.0],  # guidance stage: w drawn uniformly from this range
        "guide": "",               # guidance stage: the teacher's guide it learnt autoguidance from; "": CFG
        "lr": 3e-4,                # students' peak learning rate (AdamW as training, cosine decay per stage)
    },
}

presets = {
    # The report's table (§7), verbatim.
    "paper": {},
    # The report's table with alpha_bar_T = 0, so that x_T ~ N(0, I) is what training ends at;
    # v-prediction, since eps cannot give x_0 there (docs/recipe.md).
    "paper-zero-snr": {"diffusion": {"zero_terminal_snr": True, "prediction": "v"}},
    # The best samples a 2-core CPU gets from `python main.py` in 30 minutes (docs/quality.md):
    # conditional, since guidance beats unconditional sampling at the same budget (docs/control.md);
    # EDM's stochastic sampler with the most churn, autoguided by the run's EMA at 1/16 of its steps
    # at w = 1.2, better in FID and precision than classifier-free guidance (docs/quality.md); one res
    # block per level, attention at the bottleneck only and eager bf16: each buys steps (docs/speed.md).
    "cpu": {
        "model": {"ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 1,
                  "attn_resolutions": [], "dropout": 0.0, "num_classes": 10},
        "diffusion": {"T": 1000, "schedule": "cosine", "prediction": "v"},
        "training": {"batch_size": 128, "minutes": 30.0, "optimizer": "adamw", "lr": 2e-3,
                     "warmup_steps": 100, "lr_decay": "cosine", "grad_clip": 1.0,
                     "ema_decay": 0.995, "min_snr_gamma": 5.0, "checkpoint_every": 250, "guides": [0.0625]},
        "sampling": {"sampler": "heun", "steps": 20, "eta": 1.0, "guidance": 1.2, "guide": "guide-0.0625.pt",
                     "clip_x0": True},
    },
    # Seconds-long runs for tests.
    "smoke": {
        "model": {"ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1,
                  "attn_resolutions": [14], "dropout": 0.0},
        "diffusion": {"T": 20},
        "training": {"batch_size": 16, "steps": 8, "lr": 1e-3, "ema_decay": 0.9,
                     "checkpoint_every": 4, "bf16": "off"},
        "sampling": {"num_samples": 4},
    },
}


SAMPLERS = ("ddpm", "ddim", "dpm++", "heun")
SPACINGS = ("trailing", "uniform", "quadratic", "karras")
CHOICES = {("diffusion", "schedule"): ("linear", "cosine"), ("diffusion", "prediction"): ("eps", "x0", "v"),
           ("training", "optimizer"): ("adam", "adamw"), ("training", "lr_decay"): ("constant", "cosine"),
           ("training", "bf16"): ("auto", "on", "off"), ("sampling", "sampler"): SAMPLERS,
           ("sampling", "spacing"): SPACINGS, ("sampling", "variance"): ("beta", "beta_tilde"),
           ("distill", "stage"): ("", "guidance", "progressive", "consistency")}


class UserError(Exception):
    """Bad input from the user: reported as one line and exit code 2, no traceback."""


def merge_config(base, overrides, where="config"):
    """Return base with overrides applied; unknown keys and wrong types are refused."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if key not in merged:
            raise UserError(f"unknown {where} key '{key}'")
        if isinstance(merged[key], dict):
            if not isinstance(value, dict):
                raise UserError(f"{where}.{key} must be a section, got {value!r}")
            merged[key] = merge_config(merged[key], value, f"{where}.{key}")
        else:
            default_type = type(merged[key])
            ok = isinstance(value, default_type) or (default_type is float and type(value) is int)
            if not ok or (default_type is int and isinstance(value, bool)):
                raise UserError(f"{where}.{key} must be {default_type.__name__}, got {value!r}")
            merged[key] = float(value) if default_type is float else copy.deepcopy(value)
    return merged


# Options that measurement retired (docs/quality.md), at the one value this code runs: a
# checkpoint that holds that value loads, any other is refused (commit b230bd5 still had them).
RETIRED = {"training": {"loss": "mse", "huber_delta": 1.0, "timesteps": "uniform", "p_mean": -1.2, "p_std": 1.2,
                        "channels_last": False}}


def checkpoint_config(state):
    """The config a checkpoint was written with, defaults filled in for keys it predates and
    retired ones dropped, validated: one this code can run, or a UserError saying what is wrong."""
    saved = copy.deepcopy(state["config"])
    for section, retired in RETIRED.items():
        for key, value in retired.items():
            if isinstance(saved.get(section), dict) and saved[section].pop(key, value) != value:
                raise UserError(f"checkpoint trained with {section}.{key}, an option retired after commit b230bd5")
    cfg = merge_config(config, saved, where="checkpoint config")
    validate_config(cfg)
    return cfg


def get_config(preset):
    """The default config with preset `preset` applied, validated."""
    if preset not in presets:
        raise UserError(f"unknown preset '{preset}' (choose from {', '.join(presets)})")
    cfg = merge_config(config, presets[preset])
    validate_config(cfg)
    return cfg


def with_sampling(cfg, **chosen):
    """cfg with the sampling settings given (None keeps cfg's own), validated."""
    cfg = merge_config(cfg, {"sampling": {k: v for k, v in chosen.items() if v is not None}})
    validate_config(cfg)
    return cfg


def validate_config(cfg):
    """Refuse settings that cannot work, with a message saying which."""
    def check(ok, message):
        if not ok:
            raise UserError(message)
    m, d, tr, s = cfg["model"], cfg["diffusion"], cfg["training"], cfg["sampling"]
    for section, key in [("model", "ch"), ("model", "num_res_blocks"), ("diffusion", "T"),
                         ("training", "batch_size"), ("training", "checkpoint_every"),
                         ("sampling", "num_samples"), ("data", "image_size"), ("data", "channels")]:
        check(cfg[section][key] > 0, f"{section}.{key} must be positive, got {cfg[section][key]}")
    check(tr["epochs"] > 0 or tr["steps"] > 0, "training needs epochs > 0 or steps > 0")
    check(tr["steps"] >= 0 and tr["epochs"] >= 0 and tr["minutes"] >= 0,
          "training steps/epochs/minutes must not be negative")
    for key in ("ch_mult", "attn_resolutions"):
        check(all(type(k) is int and k > 0 for k in m[key]), f"model.{key} must be a list of positive ints")
    check(m["norm_group_channels"] > 0 and m["ch"] % m["norm_group_channels"] == 0,
          "model.ch must be a multiple of model.norm_group_channels (channels per GroupNorm group)")
    check(len(m["ch_mult"]) > 0, "model.ch_mult must not be empty")
    check(cfg["data"]["channels"] in (1, 3), f"data.channels must be 1 or 3, got {cfg['data']['channels']}")
    check(cfg["data"]["image_size"] % 2 ** (len(m["ch_mult"]) - 1) == 0,
          f"data.image_size {cfg['data']['image_size']} cannot be halved {len(m['ch_mult']) - 1} times")
    check(0.0 <= m["dropout"] < 1.0, "model.dropout must be in [0, 1)")
    for (section, key), allowed in CHOICES.items():
        check(cfg[section][key] in allowed, f"unknown {section}.{key} '{cfg[section][key]}' (choose from {allowed})")
    check(all(type(f) in (int, float) and 0 < f < 1 for f in tr["guides"]), "training.guides must be fractions in (0, 1)")
    check(all(type(d) in (int, float) and 0 <= d < 1 for d in tr["extra_ema_decays"]),
          "training.extra_ema_decays must be numbers in [0, 1)")
    check(not (d["zero_terminal_snr"] and d["prediction"] == "eps"),
          "zero_terminal_snr needs prediction v or x0: eps cannot give x_0 at alpha_bar_T = 0")
    check(not (s["sampler"] == "heun" and d["zero_terminal_snr"]),
          "the heun sampler cannot start at sigma = infinity (zero_terminal_snr): use ddim or dpm++")
    check(not (s["sampler"] == "heun" and s["eta"] > 1), "the heun sampler's eta must be in [0, 1]")
    check(s["eta"] >= 0, "sampling.eta must not be negative")
    check(s["guidance"] >= 0, f"sampling.guidance must not be negative, got {s['guidance']}")
    interval = s["guidance_interval"]
    check(interval == [] or (len(interval) == 2 and all(type(v) in (int, float) for v in interval)
                             and 0 <= interval[0] < interval[1]),
          f"sampling.guidance_interval must be [] or [lo, hi] with 0 <= lo < hi, got {interval}")
    check(m["num_classes"] >= 0, "model.num_classes must not be negative")
    check(0.0 <= tr["p_uncond"] <= 1.0, "training.p_uncond must be in [0, 1]")
    check(0 <= s["steps"] <= d["T"], f"sampling.steps must be in [0, T={d['T']}]")
    ds = cfg["distill"]
    check(not m["guidance_embedding"] or m["num_classes"] > 0, "model.guidance_embedding needs a conditional model")
    check(ds["steps"] == 0 or (ds["steps"] & (ds["steps"] - 1) == 0 and ds["steps"] <= d["T"]),
          f"distill.steps must be 0 or a power of two up to T, got {ds['steps']}")
    low_high = ds["guidance_range"]
    check(len(low_high) == 2 and 0 <= low_high[0] <= low_high[1],
          f"distill.guidance_range must be [low, high] with 0 <= low <= high, got {low_high}")


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


# ----------------------------------------------------------------------------------------
# Samplers (report §5). Each is a plain function of (model, x_T, schedule, ...) that walks the
# schedule's steps from last to first (a respaced schedule for fewer steps) and returns x_0
# and, for the samples indexed by trajectory_of (K,), their trajectories [x_T, ..., x_0] as
# (K, S+1, C, H, W), kept on the CPU: only what a figure shows is held in memory.

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


def nearest_level(sigmas, sigma):
    """The index of the level in sigmas (ascending) whose noise is nearest sigma, in log sigma."""
    return int((sigmas.log() - math.log(sigma)).abs().argmin())


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
