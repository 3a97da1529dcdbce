"""The training loop main.py and distill.py share (report §4 Algorithm 1, §7): the draws of a
step, the optimiser step with its EMA, resume, the time budget and the checkpoint cadence; a
training run's folder (guard, lock, Ctrl-C and SIGTERM). torchrun's processes: processes.py."""
import collections
import copy
import dataclasses
import math
import os
import signal
import sys
import time

import torch
from tqdm import tqdm

import config
import data
import helper
import runs
from processes import Processes
from helper import Schedule
from config import UserError
from model import Model
from runs import RunError

# ----------------------------------------------------------------------------------------
# One step: its draws, the loss, the update and the EMA.

Draws = collections.namedtuple("Draws", "t eps labels w progress")


def draw(cfg, generator, shape, rows, labels=None, progress=0.0):
    """The randomness of one training step, drawn for the whole global batch of `shape`
    (B, C, S, S) as one process would, this process's `rows` (a slice) kept, so n processes
    train on the draws of one: t uniform over the stage's levels (T, or a progressive or
    adversarial student's steps); eps ~ N(0, I); each label (B / n,) replaced by the null label with probability
    training.p_uncond (Ho & Salimans 2022 Alg. 1); a guidance student's w ~ U(distill.guidance_range).
    `progress`, the share of the run's steps done, rides along for losses that change over the run."""
    B, device, ds = shape[0], generator.device, cfg["distill"]
    levels = ds["steps"] if ds["stage"] in ("progressive", "adversarial") else cfg["diffusion"]["T"]
    t = torch.randint(0, levels, (B,), generator=generator, device=device)[rows]
    eps = torch.randn(shape, generator=generator, device=device)[rows]
    if labels is not None:
        dropped = torch.rand(B, generator=generator, device=device)[rows] < cfg["training"]["p_uncond"]
        labels = torch.where(dropped, torch.full_like(labels, cfg["model"]["num_classes"]), labels)
    w = None
    if cfg["model"]["guidance_embedding"]:
        low, high = ds["guidance_range"]
        w = (low + (high - low) * torch.rand(B, generator=generator, device=device))[rows]
    return Draws(t, eps, labels, w, progress)


def algorithm_1(cfg):
    """main.py's loss of (network, x_0, draws): helper.diffusion_loss on the config's schedule."""
    sched, d = Schedule.from_config(cfg["diffusion"]), cfg["diffusion"]
    return lambda network, x_0, draws: helper.diffusion_loss(
        network, x_0, draws.t, draws.eps, sched, d["prediction"], cfg["training"]["min_snr_gamma"], draws.labels)


@dataclasses.dataclass
class Training:
    """A run in memory: what a step needs and changes, and (state_dict) what a checkpoint keeps.
    `network` is `model` or its DistributedDataParallel or compiled wrapper (DDP averages the
    gradients in backward, so every process steps alike); loss_of(network, x_0, draws) -> loss,
    and a loss with a state of its own (distill_losses.AdversarialLoss's discriminator) gives it to the
    checkpoint through its state_dict and load_state_dict."""
    cfg: dict
    model: torch.nn.Module
    ema: torch.nn.Module  # the exponential moving average of model's weights: what sampling uses
    extra_emas: torch.nn.ModuleList  # EMAs of training.extra_ema_decays, for evaluate.py --ema
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # the draws of every step
    network: torch.nn.Module
    loss_of: object
    processes: "Processes"
    bf16: bool
    step: int = 0
    losses: list = dataclasses.field(default_factory=list)
    lrs: list = dataclasses.field(default_factory=list)

    def state_dict(self):
        rng = {"torch": torch.get_rng_state(), "noise": self.generator.get_state()}
        if self.generator.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state()
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "extra_emas": self.extra_emas.state_dict(), "optimizer": self.optimizer.state_dict(),
                "step": self.step, "config": self.cfg, "rng": rng, "losses": list(self.losses),
                "lrs": list(self.lrs), "processes": self.processes.count,
                **({"loss": self.loss_of.state_dict()} if hasattr(self.loss_of, "state_dict") else {})}

    def load_state_dict(self, state):
        """Continue from a checkpoint's state, exactly: weights, optimiser, step, curves, generators."""
        runs.load_weights(self.model, state["model"])
        runs.load_weights(self.ema, state["ema"])
        if len(self.extra_emas):
            runs.load_weights(self.extra_emas, state["extra_emas"])
        self.optimizer.load_state_dict(state["optimizer"])
        if hasattr(self.loss_of, "load_state_dict"):
            self.loss_of.load_state_dict(state["loss"])
        self.step, self.losses, self.lrs = state["step"], list(state["losses"]), list(state["lrs"])
        torch.set_rng_state(state["rng"]["torch"])
        self.generator.set_state(state["rng"]["noise"])
        if "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"])


def train_step(training, x_0, labels=None, progress=0.0):
    """One optimiser step on this process's rows x_0 (B / processes, C, S, S) of a global batch
    (labels (B / processes,) for a conditional model), `progress` of the way through the run:
    draws, loss, backward, clipping, update, EMAs. Returns this process's loss, a float."""
    tr = training.cfg["training"]
    B = len(x_0) * training.processes.count  # the global batch
    draws = draw(training.cfg, training.generator, (B, *x_0.shape[1:]), training.processes.rows(B), labels,
                 progress)
    with runs.autocast(x_0.device.type, training.bf16):
        loss = training.loss_of(training.network, x_0, draws)
    training.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if tr["grad_clip"] > 0:
        torch.nn.utils.clip_grad_norm_(training.model.parameters(), tr["grad_clip"])
    training.optimizer.step()
    warmed_up = (1 + training.step) / (10 + training.step)  # the decay's warm-up, as TF's num_updates
    for average, decay in zip([training.ema, *training.extra_emas], [tr["ema_decay"], *tr["extra_ema_decays"]]):
        update_ema(average, training.model, min(decay, warmed_up))
    return loss.item()


@torch.no_grad()
def update_ema(ema, model, decay):
    for ema_param, param in zip(ema.parameters(), model.parameters()):
        ema_param.lerp_(param, 1 - decay)


def lr_at(step, tr, total_steps):
    """Linear warm-up to tr['lr'], then constant or cosine decay to min_lr_ratio * lr."""
    if step < tr["warmup_steps"]:
        return tr["lr"] * (step + 1) / tr["warmup_steps"]
    if tr["lr_decay"] == "constant":
        return tr["lr"]
    progress = (step - tr["warmup_steps"]) / max(1, total_steps - tr["warmup_steps"])
    return tr["lr"] * (tr["min_lr_ratio"] + (1 - tr["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model, tr):
    """Adam or AdamW with tr's rate and decay, as one fused kernel over all parameters."""
    optimizer_class = torch.optim.AdamW if tr["optimizer"] == "adamw" else torch.optim.Adam
    return optimizer_class(model.parameters(), lr=tr["lr"], weight_decay=tr["weight_decay"], fused=True)


def compiled(model, cfg):
    """The network the training step calls: `model`, or its torch.compile wrapper when
    training.compile is set. Activations stay NCHW (runs.compile_network's layouts=False) at
    MNIST's 28 x 28, where that was measured faster; other sizes take inductor's own layouts,
    since the NCHW bf16 graph with attention over an 8 x 8 bottleneck returned NaN (docs/speed.md)."""
    if not cfg["training"]["compile"]:
        return model
    return runs.compile_network(model, layouts=cfg["data"]["image_size"] != 28)


def new_training(cfg, device, processes, loss_of, start_from=None):
    """A run at step 0: the model initialised from training.seed (or, for a student, from the
    weights `start_from`; layers they lack keep their initialisation), its EMAs copies of it."""
    tr = cfg["training"]
    torch.manual_seed(tr["seed"])
    model = Model.from_config(cfg).to(device)
    if start_from is not None:
        runs.load_weights(model, start_from, new_layers_allowed=True)
    ema = copy.deepcopy(model).requires_grad_(False)
    extra_emas = torch.nn.ModuleList(copy.deepcopy(ema) for _ in tr["extra_ema_decays"])
    return Training(cfg, model, ema, extra_emas, make_optimizer(model, tr),
                    torch.Generator(device).manual_seed(tr["seed"]), compiled(processes.parallel(model), cfg),
                    loss_of, processes, runs.use_bf16(cfg, device))


# ----------------------------------------------------------------------------------------
# The loop.

def train(cfg, out, state=None, loss_of=None, start_from=None, processes=None, progress=True):
    """Train until cfg's step count (continuing the checkpoint `state` if given), checkpointing to
    out/ckpt.pt; returns the EMA model and the per-step losses and learning rates. `loss_of`
    (network, x_0, draws) -> loss is Algorithm 1's by default (distill.py passes its own, and
    `start_from`, the weights its student starts from). A time budget (training.minutes, steps 0)
    is turned into a step count first, recorded in cfg. Under torchrun (`processes`, entered)
    each process trains on its rows of every global batch and rank 0 writes the checkpoints."""
    started = time.perf_counter()
    tr, device = cfg["training"], runs.resolve_device(cfg["training"]["device"])
    processes = processes or Processes(device)
    processes.check_batch(tr["batch_size"])
    images, labels, _ = data.load_data(cfg["data"], train=True)  # uint8 (N, C, S, S); (N,) or None
    images, labels = images.to(device), labels.to(device) if cfg["model"]["num_classes"] else None
    per_epoch, training = steps_per_epoch(cfg), new_training(cfg, device, processes, loss_of or algorithm_1(cfg),
                                                             start_from)
    if state is not None:
        resume(training, state)
    total_steps = total_steps_of(cfg)  # None until a time budget is fitted
    print(f"training {sum(p.numel() for p in training.model.parameters()) / 1e6:.2f}M parameters on {device}"
          f"{' (bf16 autocast)' if training.bf16 else ''}: steps {training.step} -> "
          f"{total_steps or 'what the time budget fits'}, {per_epoch} per epoch"
          f"{'; compiling the network first (about a minute, less when cached)' if tr['compile'] else ''}")
    total_steps = total_steps or fit_budget(training, images, labels, started)
    ckpt_path, order, smoothed, tick = os.path.join(out, "ckpt.pt"), None, None, time.perf_counter()
    training.model.train()
    with StopRequest() as stop, tqdm(total=total_steps, initial=training.step, dynamic_ncols=True,
                                     disable=not (progress and processes.rank == 0)) as bar:
        while training.step < total_steps:
            epoch, index = divmod(training.step, per_epoch)
            if order is None or index == 0:  # a function of (seed, epoch) alone: resume needs no state
                order = torch.randperm(len(images), generator=torch.Generator().manual_seed(tr["seed"] * 100003 + epoch))
            batch = order[index * tr["batch_size"]:(index + 1) * tr["batch_size"]]  # the global batch
            batch = batch[processes.rows(len(batch))].to(device)
            lr = lr_at(training.step, tr, total_steps)
            for group in training.optimizer.param_groups:
                group["lr"] = lr
            loss = train_step(training, data.to_model_range(images[batch]), labels[batch] if labels is not None else None,
                              training.step / total_steps)
            loss, signum = processes.agree(loss, stop.signum or 0)
            if not math.isfinite(loss):  # the weights in memory are spoilt; the file is not
                kept = f"last good checkpoint: {ckpt_path}" if os.path.exists(ckpt_path) else "no checkpoint yet"
                raise RunError(f"loss is {loss} at step {training.step}; stopping ({kept})")
            training.step += 1
            training.losses.append(loss)
            training.lrs.append(lr)
            smoothed = loss if smoothed is None else 0.98 * smoothed + 0.02 * loss
            now = time.perf_counter()
            bar.set_postfix(loss=f"{smoothed:.4f}", lr=f"{lr:.2e}", img_s=f"{tr['batch_size'] / (now - tick):.0f}",
                            refresh=False)
            tick = now
            bar.update(1)
            save_guides(training, out, total_steps)
            if checkpoint_due(training.step, total_steps, tr["checkpoint_every"]) or signum:
                checkpoint(training, out)
            if signum:
                bar.close()
                stopped(signum, training.step, ckpt_path, processes)
    return training.ema, training.losses, training.lrs


def resume(training, state):
    """Continue `training` from a checkpoint, on any process count (another count sums gradients
    in another order)."""
    training.load_state_dict(state)
    trained_on = state.get("processes", 1)
    if trained_on != training.processes.count:
        print(f"resuming a run of {trained_on} process{'es' * (trained_on > 1)} on {training.processes.count}: the "
              f"same images and noise per step, but gradients summed in another order, so not bit for bit")


def checkpoint_due(step, total_steps, every):
    """A checkpoint after every `every` steps, and at the end."""
    return step % every == 0 or step == total_steps


def checkpoint(training, out):
    """Rank 0 writes out/ckpt.pt (every process holds the same state) and a preview grid."""
    if training.processes.rank == 0:
        runs.save_checkpoint(training.state_dict(), os.path.join(out, "ckpt.pt"))
        device = training.generator.device.type
        save_preview(training.ema, training.cfg, device, os.path.join(out, f"samples_step{training.step}.png"))


def save_guides(training, out, total_steps):
    """Autoguidance's guides (Karras et al. 2024): the EMA at each training.guides fraction of the
    run's steps, as out/guide-F.pt, a weights file like ema.pt."""
    for fraction in training.cfg["training"]["guides"]:
        if training.step == max(1, round(fraction * total_steps)) and training.processes.rank == 0:
            runs.save_weights(training.ema, training.cfg, training.step, os.path.join(out, f"guide-{fraction:g}.pt"))


def stopped(signum, step, ckpt_path, processes):
    """After the checkpoint a signal asked for: say how to continue, exit 128 + its number."""
    if processes.rank == 0:
        again = "the same torchrun command" if processes.launched else f"python main.py --resume {ckpt_path}"
        print(f"interrupted ({signal.Signals(signum).name}) at step {step}; saved {ckpt_path}; "
              f"continue with {again}", file=sys.stderr)
    sys.exit(128 + signum)


# ----------------------------------------------------------------------------------------
# How long: epochs of the data, a step count, or a time budget.

def steps_per_epoch(cfg):
    """Optimiser steps in one pass over the training images, in global batches."""
    n, batch = len(data.read_data(cfg["data"]["name"], cfg["data"]["root"], True).images), cfg["training"]["batch_size"]
    if n < batch:
        raise UserError(f"{n} training images are fewer than a batch ({batch}); --set training.batch_size=B "
                        f"for a smaller one")
    return n // batch


def total_steps_of(cfg):
    """The run's optimiser steps: training.steps, else (a time budget not yet fixed) None, else
    the epochs' worth of the training images."""
    tr = cfg["training"]
    if tr["steps"]:
        return tr["steps"]
    return None if tr["minutes"] > 0 else tr["epochs"] * steps_per_epoch(cfg)


BUDGET_STEPS = 20  # steps timed to fix a time budget's step count, after one that compiles
BUDGET_RESERVE = 0.07  # share of a time budget kept for checkpoints, previews, the final grid and
                       # steps slower than the timed ones (data, checkpoints, progress bar)


def budgeted_steps(minutes, seconds_so_far, seconds_per_step):
    """The step count that ends a run within `minutes`, given the seconds already spent
    (start-up and compilation) and the measured seconds per step, keeping BUDGET_RESERVE."""
    seconds_left = minutes * 60 * (1 - BUDGET_RESERVE) - seconds_so_far
    return max(1, int(seconds_left / seconds_per_step))


def fit_budget(training, images, labels, started):
    """A time budget's step count, from BUDGET_STEPS steps on the first batch timed after one that
    compiles, then undone (the run is the one told its count). Recorded in the config for resume;
    under torchrun rank 0's count holds for all."""
    tr, rows = training.cfg["training"], training.processes.rows(training.cfg["training"]["batch_size"])
    x_0 = data.to_model_range(images[:tr["batch_size"]][rows])
    y = labels[:tr["batch_size"]][rows] if labels is not None else None
    saved = copy.deepcopy(training.state_dict())
    train_step(training, x_0, y)
    start = time.perf_counter()
    for _ in range(BUDGET_STEPS):
        train_step(training, x_0, y)
    seconds_per_step = (time.perf_counter() - start) / BUDGET_STEPS
    training.load_state_dict(saved)
    tr["steps"] = training.processes.from_rank_0(
        budgeted_steps(tr["minutes"], time.perf_counter() - started, seconds_per_step))
    print(f"time budget {tr['minutes']:g} min: {seconds_per_step:.2f} s per step measured, "
          f"{time.perf_counter() - started:.0f} s spent before training (start-up{', compiling' if tr['compile'] else ''} "
          f"and these {BUDGET_STEPS + 1} steps) -> {tr['steps']} steps")
    return tr["steps"]


# ----------------------------------------------------------------------------------------
# What a run writes besides its checkpoints.

def save_preview(ema, cfg, device, path, num_samples=20):
    """A small grid from the EMA weights at a checkpoint (fixed seed, 10 DDIM steps, a few seconds),
    to watch a run learn; a conditional model is asked for each digit in turn. Draws no training
    randomness, so resume stays exact."""
    steps = cfg["distill"]["steps"] or min(10, cfg["diffusion"]["T"])  # a few-step student: its own steps
    cfg = config.with_sampling(cfg, sampler="ddim", steps=steps, eta=0.0, compile=False)
    num_classes = cfg["model"]["num_classes"]
    labels = torch.arange(num_samples) % num_classes if num_classes else None
    samples = runs.sample(ema, cfg, num_samples, seed=0, device=device, labels=labels, progress=False)
    data.save_grid(data.to_digits(samples), path, nrow=10)


def save_loss_curve(losses, lrs, path):
    """Per-step loss (raw and smoothed) and learning rate, as one PNG."""
    plt = data.pyplot()
    smoothed, running = [], losses[0]
    for loss in losses:
        running = 0.98 * running + 0.02 * loss
        smoothed.append(running)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(losses, color="0.8", lw=0.5, label="loss")
    ax.plot(smoothed, color="C0", label="loss (EMA 0.98)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend(loc="upper center")
    lr_ax = ax.twinx()
    lr_ax.plot(lrs, color="C1")
    lr_ax.set_ylim(0, 1.1 * max(lrs))  # from 0, so a constant rate reads as one
    lr_ax.set_ylabel("learning rate", color="C1")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def finish(ema, losses, lrs, cfg, out, start):
    """The end of a run: the EMA weights alone (what sampling needs, a third of ckpt.pt), the
    loss curve and a grid of samples."""
    print(f"trained in {(time.perf_counter() - start) / 60:.1f} min; checkpoint {os.path.join(out, 'ckpt.pt')}")
    runs.save_weights(ema, cfg, len(losses), os.path.join(out, "ema.pt"))
    save_loss_curve(losses, lrs, os.path.join(out, "loss.png"))
    num_samples, num_classes = cfg["sampling"]["num_samples"], cfg["model"]["num_classes"]
    labels = torch.arange(num_samples) % num_classes if num_classes else None  # a conditional grid: digit per column
    device = runs.resolve_device(cfg["training"]["device"])
    guide = runs.load_guide(runs.guide_path(None, cfg, os.path.join(out, "ema.pt")), cfg, device)
    samples = runs.sample(ema, cfg, num_samples, seed=0, device=device, labels=labels, guide=guide)
    data.save_grid(data.to_digits(samples), os.path.join(out, "samples.png"),
                   nrow=num_classes or int(math.sqrt(num_samples)))
    print(f"wrote {', '.join(os.path.join(out, name) for name in ('ema.pt', 'samples.png', 'loss.png'))}")


# ----------------------------------------------------------------------------------------
# A training run's folder: one run per folder, never redone by accident, stopped cleanly.

def same_run(cfg_a, cfg_b):
    """Whether two configs describe one run: equal but for where the data lives and what runs it
    (and, for a time budget, the step count it chose on its machine)."""
    def essence(cfg):
        cfg = config.merge_config(config.config, cfg)
        cfg["data"].pop("root"), cfg["training"].pop("device")
        if cfg["training"]["minutes"] > 0:
            cfg["training"].pop("steps")
        return cfg
    return essence(cfg_a) == essence(cfg_b)


def guard_run_folder(cfg, state, out, overwrite):
    """What to do with a checkpoint already in `out`: resume it when it is this run unfinished,
    refuse when it is another run, and never silently redo a finished one. Returns the config
    and the state to continue (None to start from scratch); a time-budgeted run resumed from
    the folder keeps the step count it chose."""
    ckpt_path = os.path.join(out, "ckpt.pt")
    if state is None and os.path.exists(ckpt_path) and not overwrite:
        existing = runs.load_checkpoint(ckpt_path, training=True)
        if not same_run(existing["config"], cfg):
            raise UserError(f"{ckpt_path} holds another run; continue it with --resume {ckpt_path}, "
                            f"pick a new --out DIR, or pass --overwrite to start over")
        state = existing
        cfg = config.merge_config(cfg, {"training": {"steps": existing["config"]["training"]["steps"]}})
        if state["step"] < total_steps_of(cfg):
            print(f"{ckpt_path} is this run, unfinished at step {state['step']}; resuming it")
    if state is not None and state["step"] >= total_steps_of(cfg):
        raise RunComplete(f"{ckpt_path} is complete at step {state['step']} of {total_steps_of(cfg)}; "
                          f"nothing to do (more steps: --resume {ckpt_path} --steps N)")
    return cfg, state


class RunComplete(Exception):
    """The run in the folder has already reached its step count."""


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
