"""What every script shares around the math of helper.py: the device and its bf16, compilation,
the data (MNIST, another torchvision dataset, a folder of images, an .npz) and the conversion of
images, drawing many samples in batches, checkpoint files, the command line, a training run's
folder (guard, lock, time budget, Ctrl-C and SIGTERM) and the script runner that turns bad input
into one line."""
import argparse
import copy
import ctypes
import functools
import glob
import json
import math
import os
import signal
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
from tqdm import tqdm

import helper
from helper import UserError


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


def use_bf16(cfg, device):
    mode = cfg["training"]["bf16"]
    return mode == "on" or (mode == "auto" and (device == "cuda" or cpu_has_bf16()))


def compile_network(model, frozen=False, layouts=False):
    """torch.compile (inductor) of the network, falling back to eager where no compiler works.
    frozen=True is for sampling, which never changes the weights: they become constants of the
    compiled graph, so their bf16 casts and oneDNN layouts are computed once, not at every call.
    layouts=False keeps the activations NCHW where inductor would turn them channels_last for
    the convolutions: GroupNorm then reduces contiguous groups, and on a Zen 4 a training step
    is 8% faster; sampling, without the backward pass, keeps inductor's layouts, which were
    10% faster in evaluate.py's batches (docs/speed.md)."""
    torch._dynamo.config.suppress_errors = True
    return torch.compile(model, dynamic=False, options={"freezing": frozen, "layout_optimization": layouts})


def autocast(device, enabled):
    """bf16 autocast for the network; losses and sampler arithmetic stay in fp32."""
    return torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=enabled)


# ----------------------------------------------------------------------------------------
# Data: a torchvision dataset by name, a folder of images, or an .npz; and the conversion of images.

DATASETS = {  # --data name -> torchvision class, its keyword arguments, its folder under --data-root
    "mnist": ("MNIST", {}, "MNIST/raw"),
    "fashion-mnist": ("FashionMNIST", {}, "FashionMNIST/raw"),
    "kmnist": ("KMNIST", {}, "KMNIST/raw"),
    "emnist-letters": ("EMNIST", {"split": "letters"}, "EMNIST/raw"),
    "cifar10": ("CIFAR10", {}, "cifar-10-batches-py"),
}
MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
HELD_OUT = 0.1  # the share of a folder or an .npz kept out of training, to score against


class Images:
    """A dataset's split in memory: images uint8 (N, C, H, W) (a list of (C, H, W) when the sizes
    differ), labels int64 (N,) or None when unlabelled, the class names, and where each image
    came from (a folder's files; None otherwise)."""

    def __init__(self, images, labels, classes, files=None):
        self.images, self.labels, self.classes, self.files = images, labels, classes, files

    @property
    def sizes(self):
        return {tuple(image.shape[-2:]) for image in self.images}


def read_torchvision(name, root, train):
    import torchvision
    kind, extra, folder = DATASETS[name]
    try:
        dataset = getattr(torchvision.datasets, kind)(root=root, train=train, download=True, **extra)
    except (RuntimeError, OSError) as error:
        files = ", ".join(MNIST_FILES) if kind in ("MNIST", "FashionMNIST", "KMNIST") else "its files"
        raise UserError(f"{kind} not found under {os.path.join(root, folder)} and could not be downloaded "
                        f"({type(error).__name__}); put {files} there, or pass --data-root DIR") from None
    images, labels = torch.as_tensor(dataset.data), torch.as_tensor(dataset.targets)
    if images.ndim == 3:  # greyscale (N, H, W)
        images = images.unsqueeze(1)
    else:  # CIFAR-10's (N, H, W, 3)
        images = images.permute(0, 3, 1, 2).contiguous()
    classes = list(dataset.classes)
    if name == "emnist-letters":  # stored transposed, labelled 1-26 (class 0 is unused)
        images, labels, classes = images.transpose(-1, -2).contiguous(), labels - 1, classes[1:]
    return Images(images, labels.long(), classes)


def read_folder(path):
    """Every image in `path`: in class subfolders (sorted names give the labels 0, 1, ...) or
    directly in it (unlabelled). Greyscale unless some image has colour; alpha is dropped."""
    from PIL import Image
    subfolders = sorted(entry.name for entry in os.scandir(path) if entry.is_dir() and not entry.name.startswith("."))
    files = [(None, name) for name in sorted(os.listdir(path)) if name.lower().endswith(IMAGE_SUFFIXES)]
    if subfolders and not files:
        files = [(k, os.path.join(sub, name)) for k, sub in enumerate(subfolders)
                 for name in sorted(os.listdir(os.path.join(path, sub))) if name.lower().endswith(IMAGE_SUFFIXES)]
    if not files:
        raise UserError(f"'{path}' holds no {'/'.join(IMAGE_SUFFIXES)} images, directly or in class subfolders")
    images = []
    for _, name in tqdm(files, desc=f"reading {path}", leave=False, disable=len(files) < 5000):
        try:
            with Image.open(os.path.join(path, name)) as image:
                image = image.convert("RGB" if image.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr") else "L")
                pixels = torch.from_numpy(np.array(image))  # (H, W) or (H, W, 3) uint8; alpha dropped
        except OSError as error:
            raise UserError(f"'{os.path.join(path, name)}' is not a readable image ({error})") from None
        images.append(pixels[None] if pixels.ndim == 2 else pixels.permute(2, 0, 1))
    channels = max(len(image) for image in images)
    images = [image.expand(channels, -1, -1) for image in images]
    labelled = files[0][0] is not None
    return Images(images, torch.tensor([k for k, _ in files]) if labelled else None, subfolders if labelled else [],
                  [os.path.join(path, name) for _, name in files])


def read_npz_images(path):
    """An .npz with uint8 arr_0 (N, H, W, C), C 1 or 3, and optional integer labels (N,)."""
    try:
        with np.load(path) as archive:
            if "arr_0" not in archive:
                raise UserError(f"'{path}' has no array arr_0 (keys: {', '.join(archive.files)})")
            images, labels = archive["arr_0"], archive["labels"] if "labels" in archive else None
    except (OSError, ValueError) as error:
        raise UserError(f"'{path}' is not a readable .npz ({type(error).__name__})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3) or len(images) < 2:
        raise UserError(f"'{path}' arr_0 must be uint8 of shape (N >= 2, H, W, 1 or 3), got {images.dtype} "
                        f"{images.shape}")
    if labels is not None and (labels.shape != (len(images),) or labels.dtype.kind not in "iu" or labels.min() < 0):
        raise UserError(f"'{path}' labels must be integers >= 0 of shape ({len(images)},), got {labels.dtype} "
                        f"{labels.shape}")
    images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    if labels is None:
        return Images(images, None, [])
    labels = torch.from_numpy(labels).long()
    return Images(images, labels, [str(k) for k in range(int(labels.max()) + 1)])


def held_out_split(data, train):
    """A fixed 90/10 split of data that has no test split of its own."""
    order = torch.randperm(len(data.images), generator=torch.Generator().manual_seed(0))
    n_test = max(1, round(HELD_OUT * len(order)))
    keep = (order[n_test:] if train else order[:n_test]).sort().values
    images = data.images[keep] if torch.is_tensor(data.images) else [data.images[i] for i in keep]
    return Images(images, None if data.labels is None else data.labels[keep], data.classes,
                  data.files and [data.files[i] for i in keep])


@functools.lru_cache(maxsize=2)
def read_images(path):
    """A folder of images or an .npz, whole (read once for both of its splits)."""
    if path.endswith(".npz") and os.path.isfile(path):
        return read_npz_images(path)
    if os.path.isdir(path):
        return read_folder(path)
    raise UserError(f"--data '{path}' is neither a dataset ({', '.join(DATASETS)}), a folder of images nor "
                    f"an .npz file")


@functools.lru_cache(maxsize=4)
def read_data(name, root, train):
    """The data `--data` names, at its own size(s): a torchvision dataset (its train or test
    split), or a folder of images or an .npz (all but a held-out tenth, or that tenth)."""
    if name in DATASETS:
        return read_torchvision(name, root, train)
    return held_out_split(read_images(name), train)


def load_data(data_cfg, train=True):
    """The images of cfg["data"] as uint8 (N, C, S, S), resized to data.image_size S where their
    own size differs, their labels (N,) (None when unlabelled) and class names."""
    data = read_data(data_cfg["name"], data_cfg["root"], train)
    size = data_cfg["image_size"]
    if data.sizes == {(size, size)}:
        images = data.images if torch.is_tensor(data.images) else torch.stack(data.images)
    else:
        import torchvision.transforms.v2.functional as F
        images = torch.stack([F.resize(image, [size, size], antialias=True) for image in data.images])
    return images, data.labels, data.classes


def to_model_range(images_uint8):
    """uint8 images (B, C, H, W) -> float in [-1, 1]."""
    return images_uint8.float().div(127.5).sub(1)


def to_uint8(x):
    """Model-range images (..., C, H, W) in [-1, 1] -> uint8 (..., H, W, C)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).movedim(-3, -1).cpu()


def to_digits(samples):
    """Samples (N, C, S, S) in [-1, 1] -> uint8 images (N, S, S, C), as numpy (the .npz layout)."""
    return to_uint8(samples).numpy()


def shown(image):
    """uint8 (H, W, C) -> what matplotlib's imshow takes: (H, W) greyscale (cmap gray), RGB as it is."""
    return image[..., 0] if image.shape[-1] == 1 else image


def tile(images, nrow, padding=2):
    """uint8 images (N, H, W, C) as one uint8 picture (H', W', C): nrow per row, `padding`
    white pixels between and around them."""
    N, H, W, C = images.shape
    rows, cols = math.ceil(N / nrow), min(nrow, N)
    cells = np.full((rows * cols, H + padding, W + padding, C), 255, dtype=np.uint8)
    cells[:N, padding:, padding:] = images  # each image after its top and left border
    picture = cells.reshape(rows, cols, H + padding, W + padding, C).swapaxes(1, 2)
    picture = picture.reshape(rows * (H + padding), cols * (W + padding), C)
    return np.pad(picture, ((0, padding), (0, padding), (0, 0)), constant_values=255)  # the bottom and right border


def save_grid(digits, path, nrow):
    """Save uint8 images (N, H, W, C) (to_digits of samples) as one PNG grid of nrow per row."""
    from PIL import Image
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(shown(tile(digits, nrow))).save(path)


# ----------------------------------------------------------------------------------------
# Drawing samples: the network as the samplers call it, in batches of bounded memory.

def sampling_network(model, cfg, labels):
    """The network as the samplers call it, model(x_t, t): eval mode, compiled when
    sampling.compile is set, and guided towards `labels` (B,) (helper.guided_network)."""
    model.eval()
    if cfg["sampling"]["compile"]:
        model = compile_network(model, frozen=True, layouts=True)  # no backward: channels-last convolutions pay
    return helper.guided_network(model, cfg, labels)


def sample(model, cfg, num_samples, seed, device, labels=None, x_T=None, trajectory_of=None, progress=True,
           sampler=None):
    """Draw x_T ~ N(0, I) with `seed` (unless x_T is given) and run the sampler cfg["sampling"]
    names, or `sampler(network, x_T, generator, progress) -> x_0` if given (edit.py's RePaint);
    a conditional model is guided towards `labels` (B,), or samples unconditionally."""
    generator = torch.Generator(device).manual_seed(seed)
    size = cfg["data"]["image_size"]
    if x_T is None:
        x_T = torch.randn(num_samples, cfg["data"]["channels"], size, size, generator=generator, device=device)
    if labels is None and cfg["model"]["num_classes"] > 0:
        labels = torch.full((len(x_T),), cfg["model"]["num_classes"], dtype=torch.long)
    network = sampling_network(model, cfg, None if labels is None else labels.to(device))
    with autocast(device, use_bf16(cfg, device)):
        if sampler is not None:
            return sampler(network, x_T, generator, progress)
        return helper.run_sampler(network, x_T, helper.sampling_schedule(cfg), cfg, generator, trajectory_of, progress)


SAMPLE_BATCH = 500  # digits per batch when sampling many: larger CPU batches lose time to page faults


def sample_digits(model, cfg, num_samples, seed, device, labels=None, trajectory_of=(), batch_size=SAMPLE_BATCH,
                  desc="sampling", sampler=None):
    """num_samples digits drawn batch by batch (batch k seeded seed + k), so memory does not grow
    with N: returns uint8 digits (N, 28, 28, C) and the trajectories (K, S+1, C, H, W) of the
    samples indexed by trajectory_of (None when it is empty). `sampler(network, x_T, generator,
    progress, part) -> x_0`, if given, replaces cfg's sampler; `part` is the slice of the N digits
    in the batch, to pair them with inputs of their own."""
    digits, trajectories = [], []
    starts = range(0, num_samples, batch_size)
    for k, first in enumerate(tqdm(starts, desc=desc, leave=False, disable=len(starts) == 1)):
        n = min(batch_size, num_samples - first)
        keep = torch.tensor([i - first for i in trajectory_of if first <= i < first + n], dtype=torch.long)
        out = sample(model, cfg, n, seed + k, device, None if labels is None else labels[first:first + n],
                     trajectory_of=keep if len(keep) else None, progress=len(starts) == 1,
                     sampler=None if sampler is None else functools.partial(sampler, part=slice(first, first + n)))
        if len(keep):
            out, trajectory = out
            trajectories.append(trajectory)
        digits.append(to_digits(out))
    return np.concatenate(digits), torch.cat(trajectories) if trajectories else None


# ----------------------------------------------------------------------------------------
# Checkpoint files.

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


CHECKPOINT_KINDS = {"model": dict, "ema": dict, "optimizer": dict, "step": int, "config": dict, "rng": dict,
                    "losses": list, "lrs": list}
SAMPLING_KEYS = {"ema", "step", "config"}  # all that sampling needs: what a released weights file holds


def load_checkpoint(path, training=False):
    """Read a checkpoint written by main.py, tensors and plain types only (weights_only); for
    sampling, a weights file with just SAMPLING_KEYS will do, for training (resume) the whole state.
    Its config comes back resolved (helper.checkpoint_config): defaults filled in, validated."""
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
    state["config"] = helper.checkpoint_config(state)
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
    guided digits of the cpu preset: about 100 MB each) page-faults them in again at every
    network call: on a 2-core Zen 4 that was 30% of sampling's CPU time (docs/speed.md).
    Elsewhere than glibc (macOS, Windows) this does nothing."""
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


# ----------------------------------------------------------------------------------------
# A training run's folder: one run per folder, a time budget, stopping cleanly.

def same_run(cfg_a, cfg_b):
    """Whether two configs describe one run: equal but for where the data lives and what runs it
    (and, for a time budget, the step count it chose on its machine)."""
    def essence(cfg):
        cfg = helper.merge_config(helper.config, cfg)
        cfg["data"].pop("root"), cfg["training"].pop("device")
        if cfg["training"]["minutes"] > 0:
            cfg["training"].pop("steps")
        return cfg
    return essence(cfg_a) == essence(cfg_b)


def total_steps_of(cfg):
    """The run's optimiser steps: training.steps, else (a time budget not yet fixed) None, else
    the epochs' worth."""
    tr = cfg["training"]
    if tr["steps"]:
        return tr["steps"]
    return None if tr["minutes"] > 0 else tr["epochs"] * (60000 // tr["batch_size"])


BUDGET_STEPS = 20  # steps timed to fix a time budget's step count, after one that compiles
BUDGET_RESERVE = 0.07  # share of a time budget kept for checkpoints, previews, the final grid and
                       # steps slower than the timed ones (5% on a Zen 4: data, checkpoints, progress bar)


def budgeted_steps(minutes, seconds_so_far, seconds_per_step):
    """The step count that ends a run within `minutes`, given the seconds already spent
    (start-up and compilation) and the measured seconds per step, keeping BUDGET_RESERVE."""
    seconds_left = minutes * 60 * (1 - BUDGET_RESERVE) - seconds_so_far
    return max(1, int(seconds_left / seconds_per_step))


def measure_seconds_per_step(step_once, snapshot_of):
    """Seconds per training step, timed over BUDGET_STEPS calls of step_once() after a first
    one (which compiles), on a throw-away copy of the run: everything `snapshot_of` names
    (model, EMA, optimiser, generators) is restored afterwards, so the run that follows is
    the same as one started with its step count fixed."""
    saved = {name: copy.deepcopy(get()) for name, (get, _) in snapshot_of.items()}
    step_once()
    start = time.perf_counter()
    for _ in range(BUDGET_STEPS):
        step_once()
    seconds = (time.perf_counter() - start) / BUDGET_STEPS
    for name, (_, restore) in snapshot_of.items():
        restore(saved[name])
    return seconds


def guard_run_folder(cfg, state, out, overwrite):
    """What to do with a checkpoint already in `out`: resume it when it is this run unfinished,
    refuse when it is another run, and never silently redo a finished one. Returns the config
    and the state to continue (None to start from scratch); a time-budgeted run resumed from
    the folder keeps the step count it chose."""
    ckpt_path = os.path.join(out, "ckpt.pt")
    if state is None and os.path.exists(ckpt_path) and not overwrite:
        existing = load_checkpoint(ckpt_path, training=True)
        if not same_run(existing["config"], cfg):
            raise UserError(f"{ckpt_path} holds another run; continue it with --resume {ckpt_path}, "
                            f"pick a new --out DIR, or pass --overwrite to start over")
        state = existing
        cfg = helper.merge_config(cfg, {"training": {"steps": existing["config"]["training"]["steps"]}})
        if state["step"] < total_steps_of(cfg):
            print(f"{ckpt_path} is this run, unfinished at step {state['step']}; resuming it")
    if state is not None and state["step"] >= total_steps_of(cfg):
        raise RunComplete(f"{ckpt_path} is complete at step {state['step']} of {total_steps_of(cfg)}; "
                          f"nothing to do (more steps: --resume {ckpt_path} --steps N)")
    return cfg, state


class RunComplete(Exception):
    """The run in the folder has already reached its step count."""


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


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM sets a flag; the loop finishes the current step, checkpoints
    and exits with 128 + the signal's number (130, 143)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None

    def __enter__(self):
        self.previous = {signum: signal.signal(signum, self.handle) for signum in self.SIGNALS}
        return self

    def handle(self, signum, frame):
        self.signum = signum
        for other, handler in self.previous.items():
            signal.signal(other, handler)  # a second signal interrupts at once

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


# ----------------------------------------------------------------------------------------
# Several processes: torchrun's data parallelism.

class Processes:
    """The processes that train one run: this one alone (`python main.py`), or those torchrun
    started (it sets RANK, WORLD_SIZE and LOCAL_RANK), one per device, joined in a process group
    (gloo on CPU, NCCL on CUDA) for DistributedDataParallel. Each process trains on its own rows
    of every global batch; rank 0 alone writes files and prints. As a context manager it sets
    the group up and takes it down; alone, it does nothing."""

    def __init__(self, device="cpu", environ=os.environ):
        self.launched = "RANK" in environ and "WORLD_SIZE" in environ
        self.rank, self.count = int(environ.get("RANK", 0)), int(environ.get("WORLD_SIZE", 1))
        self.local_rank, self.per_machine = int(environ.get("LOCAL_RANK", 0)), int(environ.get("LOCAL_WORLD_SIZE", 1))
        self.device = device

    def check_batch(self, batch_size):
        """A UserError when a global batch does not split into equal parts, one per process."""
        if batch_size % self.count:
            raise UserError(f"the batch of {batch_size} does not divide over {self.count} processes; "
                            f"use a process count that divides it, or --set training.batch_size=N")

    def rows(self, batch):
        """This process's rows of a global batch (a tensor indexed by its first dimension)."""
        size = len(batch) // self.count
        return batch[self.rank * size:(self.rank + 1) * size]

    def __enter__(self):
        if self.launched:
            if self.device == "cuda":
                if self.per_machine > torch.cuda.device_count():  # every process says so, rank 0 prints it
                    raise UserError(f"torchrun started {self.per_machine} processes on a machine with "
                                    f"{torch.cuda.device_count()} CUDA device(s): one process per GPU "
                                    f"(--nproc_per_node {torch.cuda.device_count()}), or --device cpu")
                torch.cuda.set_device(self.local_rank)
            torch.distributed.init_process_group("nccl" if self.device == "cuda" else "gloo")
            if self.rank:
                sys.stdout = open(os.devnull, "w")  # rank 0 prints for the run
        return self

    def __exit__(self, kind, error, trace):
        if self.launched:
            if kind is None or issubclass(kind, SystemExit):  # every rank is here: leave together
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()

    def parallel(self, model):
        """`model` under DistributedDataParallel, which averages the gradients over the processes
        in backward (and makes every process start from rank 0's weights); `model` itself when alone."""
        if not self.launched:
            return model
        # attention's proj_out reads a transposed view, so its 1x1 weight's gradient comes with
        # other (equivalent) strides and DDP copies it into its bucket: a few KB, not worth a warning
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[self.local_rank] if self.device == "cuda" else None)

    def agree(self, loss, signum):
        """The mean of the processes' losses and the largest stop signal any received (0: none), so
        every process logs the same loss and all stop at the same step."""
        if not self.launched:
            return loss, signum
        values = torch.tensor([loss, float(signum)], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(values[:1])
        torch.distributed.all_reduce(values[1:], op=torch.distributed.ReduceOp.MAX)
        return values[0].item() / self.count, int(values[1].item())

    def from_rank_0(self, number):
        """Rank 0's `number` (an int) on every process."""
        if not self.launched:
            return number
        value = torch.tensor([number], dtype=torch.int64, device=self.device)
        torch.distributed.broadcast(value, src=0)
        return int(value.item())
