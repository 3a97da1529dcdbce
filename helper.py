"""Configuration, noise schedules, the forward process q(x_t | x_0) and its loss, and the
timestep embedding: the report's §2, §4 and §6 as equations (the samplers of §5: samplers.py).

Timestep convention: code indices t = 0, ..., T-1 stand for the paper's t = 1, ..., T,
so betas[t] is the paper's beta_{t+1} and alpha_bars_prev[0] = alpha_bar_0 = 1.
"""
import copy
import math

import torch

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
