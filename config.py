"""Configuration: every default once, presets as small override dicts, and the checks that
refuse settings that cannot work (UserError: one line, exit 2)."""
import copy


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
                                   # consistency: a one- or two-step student (Song et al. 2023);
                                   # adversarial: a one- or two-step student finished against a discriminator
        "steps": 0,                # progressive, consistency, adversarial: the DDIM steps the student samples with
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
           ("distill", "stage"): ("", "guidance", "progressive", "consistency", "adversarial")}


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
