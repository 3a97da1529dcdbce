"""What every script shares around the math of helper.py: the device, bf16 and compilation;
checkpoint files and the EMA model in them; drawing samples in batches with the sampler a
config names; the command line and the runner that turns bad input into one line."""
import argparse
import ctypes
import functools
import glob
import json
import os
import sys
import tempfile

import numpy as np
import torch
from tqdm import tqdm

import config
import data
import guidance
import helper
import samplers
from helper import Schedule
from config import UserError
from model import Model

PRETRAINED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained", "mnist-cpu.pt")


class RunError(Exception):
    """A run that cannot go on (a checkpoint that cannot be written): one line, exit code 1."""


# ----------------------------------------------------------------------------------------
# Devices, precision and compilation.

def resolve_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda") or (name == "cuda" and not torch.cuda.is_available()):
        raise UserError(f"device '{name}' is not available here (use cpu, cuda or auto)")
    return name


def cpu_has_bf16():
    """True when the CPU has native bf16 matmul units (AMX or AVX512-bf16)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def native_bf16(device):
    """Whether the device computes bf16 natively: CUDA, or a CPU with AMX or AVX512-bf16 (elsewhere,
    an AVX2 CPU say, bf16 is emulated, many times slower than fp32: docs/speed.md)."""
    return device == "cuda" or cpu_has_bf16()


def use_bf16(cfg, device):
    mode = cfg["training"]["bf16"]
    return mode == "on" or (mode == "auto" and native_bf16(device))


def compile_network(model, frozen=False, layouts=False):
    """torch.compile (inductor) of the network, falling back to eager where no compiler works.
    frozen=True is for sampling, which never changes the weights: they become constants of the
    compiled graph, so their bf16 casts and oneDNN layouts are computed once, not at every call.
    layouts=False keeps the activations NCHW where inductor would turn them channels_last for
    the convolutions, so that GroupNorm reduces contiguous groups: faster for a training step;
    sampling, without the backward pass, is faster with inductor's layouts (docs/speed.md)."""
    torch._dynamo.config.suppress_errors = True
    return torch.compile(model, dynamic=False, options={"freezing": frozen, "layout_optimization": layouts})


def autocast(device, enabled):
    """bf16 autocast for the network; losses and sampler arithmetic stay in fp32."""
    return torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=enabled)


# ----------------------------------------------------------------------------------------
# Checkpoint files and the EMA model in them.

def save_checkpoint(state, path):
    """Write atomically: to a temporary file of its own in the same folder, synced to disk, then
    renamed over `path`, so a crash, a kill or a power cut leaves either the previous checkpoint
    or the new one, whole. A write that fails (disk full, no permission) leaves the previous one
    and raises RunError naming the path and the cause."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's files are private; a checkpoint is not
        os.replace(tmp, path)
    except OSError as error:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        raise RunError(f"could not write {path}: {error.strerror or error}; the previous checkpoint is "
                       f"unchanged") from None


def save_weights(ema, cfg, step, path):
    """A weights file: the EMA network, its step and config (SAMPLING_KEYS), all that sampling reads."""
    save_checkpoint({"config": cfg, "step": step, "ema": ema.state_dict()}, path)


CHECKPOINT_KINDS = {"model": dict, "ema": dict, "optimizer": dict, "step": int, "config": dict, "rng": dict,
                    "losses": list, "lrs": list}
SAMPLING_KEYS = {"ema", "step", "config"}  # all that sampling needs: what a released weights file holds


def load_checkpoint(path, training=False):
    """Read a checkpoint written by main.py, tensors and plain types only (weights_only); for
    sampling, a weights file with just SAMPLING_KEYS will do, for training (resume) the whole state.
    Its config comes back resolved (config.checkpoint_config): defaults filled in, validated."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint '{path}' does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a truncated or foreign file
        raise UserError(f"'{path}' is not a readable checkpoint ({type(error).__name__})") from None
    needed = set(CHECKPOINT_KINDS) if training else SAMPLING_KEYS
    if not isinstance(state, dict) or not needed <= state.keys():
        what = "a training checkpoint (weights-only files cannot be resumed)" if training else "a checkpoint"
        raise UserError(f"'{path}' is not {what} written by main.py")
    for key in needed:
        if not isinstance(state[key], CHECKPOINT_KINDS[key]):
            raise UserError(f"'{path}' is damaged: its {key} is a {type(state[key]).__name__}, "
                            f"not a {CHECKPOINT_KINDS[key].__name__}")
    state["config"] = config.checkpoint_config(state)
    return state


def load_weights(model, weights, new_layers_allowed=False):
    """Load a state dict into model, a UserError if it does not fit. new_layers_allowed: layers
    of model that `weights` lacks keep their initialisation (a student's new input layers)."""
    try:
        missing, unexpected = model.load_state_dict(weights, strict=not new_layers_allowed)
    except (RuntimeError, TypeError, AttributeError):  # wrong shapes or names, or not a state dict at all
        raise UserError("checkpoint weights do not match the model its config describes") from None
    if unexpected:
        raise UserError("checkpoint weights do not match the model its config describes")


class RunLock:
    """A lock file out/.lock holding the owner's pid, so two runs never write one folder. A lock
    whose pid no longer runs (the owner was killed) is stale and taken over."""

    def __init__(self, out):
        self.path = os.path.join(out, ".lock")

    def __enter__(self):
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = self.owner()
                if owner is not None and pid_alive(owner):
                    raise UserError(f"another run (pid {owner}) is writing {os.path.dirname(self.path)}; "
                                    f"wait for it or pick another --out") from None
                try:
                    os.remove(self.path)  # stale: its owner is gone
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            for leftover in glob.glob(os.path.join(glob.escape(os.path.dirname(self.path)), "*.pt.*.tmp")):
                os.remove(leftover)  # a temporary checkpoint of a killed run: never renamed, never needed
            return self
        raise UserError(f"could not take the lock {self.path}; another run is starting there")

    def owner(self):
        try:
            with open(self.path) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None  # unreadable or half-written: treated as stale

    def __exit__(self, *exc):
        if self.owner() == os.getpid():
            os.remove(self.path)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def with_sampling_flags(cfg, guidance=None, guidance_interval=None, guide=None, **chosen):
    """cfg with the sampling flags given (None keeps the checkpoint's); --guidance and
    --guidance-interval only for a conditional checkpoint or with a --guide."""
    guided = guide not in (None, "none")
    if (guidance is not None or guidance_interval is not None) and cfg["model"]["num_classes"] == 0 and not guided:
        raise UserError("--guidance needs a conditional checkpoint (python main.py --conditional) or a --guide; "
                        "this one is neither")
    return config.with_sampling(cfg, guidance=guidance, guidance_interval=guidance_interval, **chosen)


def load_ema_model(path, device, decay=None):
    """The EMA network of a checkpoint (or its extra EMA of that decay) and the config stored with it."""
    state = load_checkpoint(path)
    cfg = state["config"]
    model = Model.from_config(cfg)
    weights, decays = state["ema"], cfg["training"]["extra_ema_decays"]
    if decay is not None and decay != cfg["training"]["ema_decay"]:
        if decay not in decays or "extra_emas" not in state:
            kept = ", ".join(f"{d:g}" for d in [cfg["training"]["ema_decay"], *decays])
            raise UserError(f"'{path}' keeps the EMA of decay {kept}, not {decay:g}")
        prefix = f"{decays.index(decay)}."  # the extra EMAs are saved as one ModuleList
        weights = {name[len(prefix):]: w for name, w in state["extra_emas"].items() if name.startswith(prefix)}
    load_weights(model, weights)
    return model.to(device).eval(), cfg


def guide_path(flag, cfg, checkpoint):
    """Autoguidance's guide file: --guide, else the checkpoint's sampling.guide beside it; None for
    classifier-free guidance (--guide none, or a config without a guide)."""
    if flag:
        return None if flag == "none" else flag
    if not cfg["sampling"]["guide"]:
        return None
    path = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), cfg["sampling"]["guide"])
    if not os.path.exists(path):
        raise UserError(f"'{checkpoint}' samples autoguided by {cfg['sampling']['guide']} beside it, which is not "
                        f"there; --guide none samples with classifier-free guidance instead")
    return path


def load_guide(path, cfg, device):
    """Autoguidance's guide (guidance.Guided), or None without a path: the EMA network of a weights
    file (main.py's out/guide-F.pt snapshots, or another run's ema.pt) that denoises the data of cfg's
    network on the same schedule, conditioned alike."""
    if path is None:
        return None
    if cfg["model"]["guidance_embedding"]:
        raise UserError("a guidance-distilled student takes w as its input: it cannot be guided by --guide")
    guide, guide_cfg = load_ema_model(path, device)
    for section, key in [("data", "image_size"), ("data", "channels"), ("model", "num_classes"),
                         ("model", "guidance_embedding"), ("diffusion", None)]:
        ours, theirs = (c[section] if key is None else c[section][key] for c in (cfg, guide_cfg))
        if ours != theirs:
            raise UserError(f"the guide '{path}' cannot guide this checkpoint: its {section}{'.' + key if key else ''} "
                            f"is {theirs}, not {ours}")
    return guide


def default_checkpoint(path):
    """The checkpoint to sample: the one given, else out/ckpt.pt of a local run, else the
    weights shipped with the repo (said in one line)."""
    if path is not None:
        return path
    local = os.path.join("out", "ckpt.pt")
    if os.path.exists(local) or not os.path.exists(PRETRAINED):
        return local
    print(f"no out/ckpt.pt yet: sampling the shipped weights {os.path.relpath(PRETRAINED)} (python main.py trains your own)")
    return PRETRAINED


def output_folder(out, checkpoint):
    """--out, else the checkpoint's folder (out/ for the shipped weights, which stay as they are)."""
    if out:
        return out
    return "out" if os.path.abspath(checkpoint) == PRETRAINED else os.path.dirname(os.path.abspath(checkpoint))


# ----------------------------------------------------------------------------------------
# Drawing samples: the sampler a config names, the network as it calls it, in batches of bounded memory.

def guided_network(network, cfg, labels, guide=None):
    """The network as the samplers call it, model(x_t, t): for a conditional model, Guided
    towards `labels` (B,) with cfg's weight and interval (labels None: the null label, i.e.
    unconditional samples), by its unconditional output or by `guide` (autoguidance); an
    unconditional model guided by `guide`, or as it is."""
    num_classes = cfg["model"]["num_classes"]
    if labels is not None and num_classes == 0:
        raise UserError("this checkpoint is unconditional: it cannot be asked for a digit")
    if num_classes == 0 and guide is None:
        return network
    guided_at, interval = None, cfg["sampling"]["guidance_interval"]
    if interval:
        sigmas = Schedule.from_config(cfg["diffusion"]).edm_sigmas()
        guided_at = (sigmas > interval[0]) & (sigmas <= interval[1])
    return guidance.Guided(network, labels, cfg["sampling"]["guidance"], num_classes, guided_at,
                         takes_w=cfg["model"]["guidance_embedding"], guide=guide)


def run_sampler(model, x_T, sched, cfg, generator, trajectory_of=None, progress=True):
    """The sampler cfg["sampling"] names, from x_T down the (possibly respaced) schedule sched."""
    s, prediction = cfg["sampling"], cfg["diffusion"]["prediction"]
    common = dict(prediction=prediction, clip_x0=s["clip_x0"], trajectory_of=trajectory_of, progress=progress)
    if s["sampler"] == "ddpm":
        return samplers.ddpm_sample(model, x_T, sched, variance=s["variance"], generator=generator, **common)
    if s["sampler"] == "ddim":
        return samplers.ddim_sample(model, x_T, sched, eta=s["eta"], generator=generator, **common)
    if s["sampler"] == "heun":  # stops at sched's levels; its churn may reach any of the T levels between them
        return samplers.heun_sample(model, x_T, Schedule.from_config(cfg["diffusion"]), eta=s["eta"], generator=generator,
                           stops=sched.timesteps.tolist(), **common)
    return samplers.dpm_solver_pp_sample(model, x_T, sched, eta=s["eta"], generator=generator, **common)


def sampler_stops(sampler, steps):
    """How many levels a sampler stops at for `steps` network evaluations: one evaluation per
    level, but heun's two except at its first and last (sampler_evaluations)."""
    return steps // 2 + 1 if sampler == "heun" else steps


def sampler_evaluations(sampler, stops):
    """Network evaluations of a sampler on `stops` levels: heun_sample's 2 n - 2 (one for n = 1)."""
    return max(1, 2 * stops - 2) if sampler == "heun" else stops


def sampling_schedule(cfg):
    """The schedule the sampler walks: cfg's, respaced to the sampler's stops for sampling.steps
    network evaluations when fewer than T."""
    s = cfg["sampling"]
    sched = Schedule.from_config(cfg["diffusion"])
    stops = sampler_stops(s["sampler"], s["steps"])
    if stops and stops < sched.T:
        sched = sched.respace(helper.spaced_timesteps(sched.T, stops, s["spacing"], sched.edm_sigmas()))
    return sched


def requested_labels(digit, num_samples, cfg):
    """The label of each sample (N,) int64, or None for unconditional samples."""
    if digit is None:
        return None
    classes = cfg["model"]["num_classes"]
    if classes == 0:
        raise UserError("--digit needs a conditional checkpoint (python main.py --conditional); this one is not")
    if cfg["sampling"]["guidance"] == 0:
        raise UserError("guidance w = 0 samples unconditionally: it cannot be asked for a digit (drop --digit)")
    if digit != "all":
        if digit >= classes:
            raise UserError(f"--digit {digit}: this checkpoint knows the classes 0-{classes - 1}")
        return torch.full((num_samples,), digit, dtype=torch.long)
    if num_samples % classes:
        raise UserError(f"--digit all draws N/{classes} of each class: --num-samples must be a multiple of "
                        f"{classes}, got {num_samples}")
    return torch.arange(classes).repeat_interleave(num_samples // classes)


def sampling_network(model, cfg, labels, guide=None):
    """The network as the samplers call it, model(x_t, t): eval mode, compiled when
    sampling.compile is set (its guide too), and guided towards `labels` (B,) (guided_network)."""
    networks = [network.eval() for network in (model, guide) if network is not None]
    if cfg["sampling"]["compile"]:  # no backward: channels-last convolutions pay
        networks = [compile_network(network, frozen=True, layouts=True) for network in networks]
    return guided_network(networks[0], cfg, labels, *networks[1:])


def sample(model, cfg, num_samples, seed, device, labels=None, x_T=None, trajectory_of=None, progress=True,
           sampler=None, guide=None):
    """Draw x_T ~ N(0, I) with `seed` (unless x_T is given) and run the sampler cfg["sampling"]
    names, or `sampler(network, x_T, generator, progress) -> x_0` if given (edit.py's RePaint);
    a conditional model is guided towards `labels` (B,), or samples unconditionally; `guide`,
    a weaker network, guides in place of the unconditional output (autoguidance)."""
    generator = torch.Generator(device).manual_seed(seed)
    size = cfg["data"]["image_size"]
    if x_T is None:
        x_T = torch.randn(num_samples, cfg["data"]["channels"], size, size, generator=generator, device=device)
    if labels is None and cfg["model"]["num_classes"] > 0:
        labels = torch.full((len(x_T),), cfg["model"]["num_classes"], dtype=torch.long)
    network = sampling_network(model, cfg, None if labels is None else labels.to(device), guide)
    with autocast(device, use_bf16(cfg, device)):
        if sampler is not None:
            return sampler(network, x_T, generator, progress)
        return run_sampler(network, x_T, sampling_schedule(cfg), cfg, generator, trajectory_of, progress)


SAMPLE_BATCH = 500  # digits per batch when sampling many: larger CPU batches lose time to page faults


def sample_digits(model, cfg, num_samples, seed, device, labels=None, trajectory_of=(), batch_size=SAMPLE_BATCH,
                  desc="sampling", sampler=None, guide=None):
    """num_samples digits drawn batch by batch (batch k seeded seed + k), so memory does not grow
    with N: returns uint8 digits (N, S, S, C) and the trajectories (K, S+1, C, H, W) of the
    samples indexed by trajectory_of (None when it is empty). `sampler(network, x_T, generator,
    progress, part) -> x_0`, if given, replaces cfg's sampler; `part` is the slice of the N digits
    in the batch, to pair them with inputs of their own. `guide`: as sample's."""
    digits, trajectories = [], []
    starts = range(0, num_samples, batch_size)
    for k, first in enumerate(tqdm(starts, desc=desc, leave=False, disable=len(starts) == 1)):
        n = min(batch_size, num_samples - first)
        keep = torch.tensor([i - first for i in trajectory_of if first <= i < first + n], dtype=torch.long)
        out = sample(model, cfg, n, seed + k, device, None if labels is None else labels[first:first + n],
                     trajectory_of=keep if len(keep) else None, progress=len(starts) == 1,
                     sampler=None if sampler is None else functools.partial(sampler, part=slice(first, first + n)),
                     guide=guide)
        if len(keep):
            out, trajectory = out
            trajectories.append(trajectory)
        digits.append(data.to_digits(out))
    return np.concatenate(digits), torch.cat(trajectories) if trajectories else None


# ----------------------------------------------------------------------------------------
# The command line and the script runner.

class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line, exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def parse_setting(setting):
    """'section.key=value' as the override {section: {key: value}}; the value is read as JSON
    (numbers, lists, true/false), else kept as a string."""
    name, equals, raw = setting.partition("=")
    section, dot, key = name.partition(".")
    if not (equals and dot and section and key):
        raise UserError(f"--set wants SECTION.KEY=VALUE, got '{setting}'")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return {section: {key: value}}


def keep_freed_memory():
    """Ask glibc's malloc to keep freed memory for reuse. By default it hands every block over
    32 MB straight back to the kernel, so a sampling batch whose activations are larger (500
    guided digits of the cpu preset) page-faults them in again at every network call, a large
    share of sampling's CPU time on a 2-core machine (docs/speed.md). Elsewhere than glibc
    (macOS, Windows) this does nothing."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    mallopt(M_MMAP_MAX, 0)  # large blocks from the heap, not from mmap
    mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)  # and the heap not shrunk after each free


def run(main):
    """Run a script's main() with keep_freed_memory(), turning UserError into one line on
    stderr and exit code 2 and RunError into one line and exit code 1 (Ctrl-C outside the
    training loop, which checkpoints first, exits 130 quietly)."""
    keep_freed_memory()
    speaks = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 says what all processes hit
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr) if speaks else None
        sys.exit(2)
    except RunError as error:
        print(f"error: {error}", file=sys.stderr) if speaks else None
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def digit_choice(text):
    if text == "all":
        return text
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a class (0-9 for MNIST's digits) or 'all', got {text!r}")
    return int(text)


ETA_HELP = ("ddim, dpm++ and heun noise: 0 deterministic (the ODE), 1 DDPM-like or, for heun, EDM's most "
            "churn (default: the checkpoint's)")
GUIDE_HELP = ("autoguidance: guide by this weaker network instead of the unconditional output, "
              "output = guide + w (network - guide); a weights file of the same data and schedule, e.g. "
              "main.py's out/guide-F.pt snapshot of the run; none: classifier-free guidance (default: the "
              "checkpoint's sampling.guide beside it, the cpu preset's guide-0.0625.pt)")
INTERVAL_HELP = ("guide only at the noise levels sigma = sqrt((1 - alpha_bar) / alpha_bar) in (LO, HI], "
                 "w = 1 elsewhere (default: the checkpoint's; 0 inf: everywhere)")


