"""Train the diffusion model on MNIST (report §4 Algorithm 1, §7), or on other images, with EMA
weights, periodic atomic checkpoints and exact resume; at the end write a sample grid and the
loss curve.

    python main.py [--preset P] [--conditional | --unconditional] [--data NAME_OR_PATH] [--data-root DIR] [--out DIR]
                   [--minutes M | --epochs N | --steps N] [--set SECTION.KEY=VALUE ...]
                   [--resume CKPT] [--overwrite] [--seed S] [--device D]

A run folder is never overwritten by accident: a second `python main.py` into a folder whose
checkpoint is the same run unfinished resumes it, any other refuses (--overwrite starts over),
and a lock file keeps two runs from writing one folder at once. Ctrl-C and SIGTERM finish the
step, checkpoint and exit; kill -9 or a power cut loses at most the steps since the last
checkpoint, since checkpoints are written to a temporary file, synced, then renamed.

    torchrun --standalone --nproc_per_node N main.py [...]

trains the same run on N processes (one per GPU, or CPU processes) with DistributedDataParallel:
each takes its rows of every global batch, rank 0 writes (docs/processes.md).
"""
import contextlib
import copy
import functools
import json
import math
import os
import signal
import sys
import time

import torch
from tqdm import tqdm

import helper
import runs
from helper import Schedule, UserError
from model import Model
from runs import RunError


def parse_args(argv=None):
    parser = runs.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", help=f"{', '.join(helper.presets)} (default: paper with CUDA, else cpu)")
    parser.add_argument("--data", help=f"the images: {', '.join(runs.DATASETS)} (default: mnist), a folder of "
                                       f"images (class subfolders label them) or an .npz (uint8 arr_0 (N, H, W, C), "
                                       f"optional labels); --set data.image_size=S resizes them")
    parser.add_argument("--data-root", help="where torchvision datasets are, or are downloaded to (default: data)")
    parser.add_argument("--out", help="output directory (default: out, or the checkpoint's on --resume)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=runs.positive_int, help="train this many epochs")
    length.add_argument("--steps", type=runs.positive_int, help="train this many optimiser steps in total")
    length.add_argument("--minutes", type=runs.positive_float,
                        help="train for as many steps as fit in M minutes on this machine (the cpu preset: 30)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="settings",
                        help="change one config value of the preset, as JSON (training.lr=1e-3, "
                             "model.ch_mult=[1,2,2], diffusion.prediction=edm); repeatable")
    parser.add_argument("--resume", metavar="CKPT", help="continue the run saved in this checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in --out even if it holds a checkpoint of another or a finished run")
    parser.add_argument("--seed", type=int, help="training seed (default: config training.seed)")
    parser.add_argument("--device", help="auto, cpu or cuda (default: auto)")
    labels = parser.add_mutually_exclusive_group()
    labels.add_argument("--conditional", action="store_true",
                        help="learn the label too (model.num_classes: the data's classes, 10 for MNIST), "
                             "for classifier-free guidance (the cpu preset's default)")
    labels.add_argument("--unconditional", action="store_true",
                        help="learn images alone (model.num_classes = 0; the paper and smoke presets' default)")
    return parser.parse_args(argv)


def resolve(args):
    """The run's config, checkpoint to resume (or None) and output directory."""
    state = None
    if args.resume:
        if args.preset or args.seed is not None or args.conditional or args.unconditional or args.overwrite \
                or args.settings or args.data:
            raise UserError("--resume takes its preset, settings, seed, data and conditioning from the checkpoint; "
                            "drop --preset/--set/--seed/--data/--conditional/--unconditional/--overwrite")
        state = runs.load_checkpoint(args.resume, training=True)
        cfg = state["config"]
        out = args.out or os.path.dirname(os.path.abspath(args.resume))
    else:
        preset = args.preset or ("paper" if torch.cuda.is_available() else "cpu")
        cfg = helper.get_config(preset)
        settings = [runs.parse_setting(setting) for setting in args.settings]
        for setting in settings:
            cfg = helper.merge_config(cfg, setting)
        out = args.out or "out"
    overrides = {"data": {}, "training": {}, "model": {}}
    if args.conditional or args.unconditional:
        overrides["model"]["num_classes"] = 10 if args.conditional else 0  # 10 stands for the data's classes
    if args.data:
        overrides["data"]["name"] = args.data if args.data in runs.DATASETS else os.path.abspath(args.data)
    if args.data_root:
        overrides["data"]["root"] = args.data_root
    if args.steps:
        overrides["training"].update(steps=args.steps, minutes=0.0)
    if args.epochs:
        overrides["training"].update(epochs=args.epochs, steps=0, minutes=0.0)
    if args.minutes:
        if state is not None:
            raise UserError(f"--resume keeps the step count of the run ({cfg['training']['steps'] or 'not yet fixed'}); "
                            f"drop --minutes, or pass --steps N for more")
        overrides["training"].update(minutes=args.minutes, steps=0)
    if args.seed is not None:
        overrides["training"]["seed"] = args.seed
    if args.device:
        overrides["training"]["device"] = args.device
    cfg = helper.merge_config(cfg, overrides)
    if state is None:
        def chosen(section, key):  # set with --set
            return any(key in setting.get(section, {}) for setting in settings)
        cfg = fit_to_data(cfg, resize=chosen("data", "image_size"), conditional=args.conditional,
                          levels=preset == "cpu" and not chosen("model", "ch_mult"))
    helper.validate_config(cfg)
    return cfg, state, out


def cpu_levels(image_size):
    """The cpu preset's U-Net levels for S x S images: ch_mult [1, 2, 2] takes 28 to 7 and 32 to 8
    pixels at the bottleneck; each doubling of S beyond 32 adds a level of width 2, so the
    bottleneck stays at 7 or 8 pixels (64 -> [1, 2, 2, 2]). The width (ch 32) stays."""
    ch_mult = [1, 2, 2]
    while image_size / 2 ** (len(ch_mult) - 1) > 8 and image_size % 2 ** len(ch_mult) == 0:
        ch_mult.append(2)
    return ch_mult


def fit_to_data(cfg, resize, conditional, levels):
    """cfg with the data's channels, image size (unless `resize`: cfg's) and classes (for a
    conditional model; unlabelled data trains unconditional, or, asked `conditional`, is refused),
    and with `levels`, the cpu preset's U-Net levels for that size (cpu_levels)."""
    data_cfg = cfg["data"]
    splits = [runs.read_data(data_cfg["name"], data_cfg["root"], train) for train in (True, False)]
    data = splits[0]
    first = data.images[0].shape[-2:]  # (H, W)
    if not resize and (first[0] != first[1] or any(split.sizes != {tuple(first)} for split in splits)):
        odd, split = next((i, split) for split in splits for i, image in enumerate(split.images)
                          if image.shape[-2:] != first or first[0] != first[1])
        what = split.files[odd] if split.files else f"image {odd}"
        raise UserError(f"the images differ in size or are not square: {what} is {split.images[odd].shape[-1]}x"
                        f"{split.images[odd].shape[-2]}, the first {first[1]}x{first[0]}; --set data.image_size=S "
                        f"resizes every image to S x S")
    size = data_cfg["image_size"] if resize else data.images[0].shape[-1]
    num_classes = cfg["model"]["num_classes"]
    if num_classes and data.labels is None:
        if conditional:
            raise UserError(f"--conditional needs labelled data; '{data_cfg['name']}' has no labels "
                            f"(class subfolders, or an .npz key 'labels')")
        print(f"'{data_cfg['name']}' has no labels: training an unconditional model")
    fitted = {"data": {"image_size": size, "channels": data.images[0].shape[0]},
              "model": {"num_classes": len(data.classes) if num_classes and data.labels is not None else 0}}
    if levels:
        fitted["model"]["ch_mult"] = cpu_levels(size)
    return helper.merge_config(cfg, fitted)


def lr_at(step, tr, total_steps):
    """Linear warm-up to tr['lr'], then constant or cosine decay to min_lr_ratio * lr."""
    if step < tr["warmup_steps"]:
        return tr["lr"] * (step + 1) / tr["warmup_steps"]
    if tr["lr_decay"] == "constant":
        return tr["lr"]
    progress = (step - tr["warmup_steps"]) / max(1, total_steps - tr["warmup_steps"])
    return tr["lr"] * (tr["min_lr_ratio"] + (1 - tr["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * progress)))


def rows_of(part, size):
    """Part k of n of a global batch (under torchrun, rank k of n processes; (0, 1) alone), for a
    part of `size` rows. Every process draws its noise for the whole global batch, as one process
    would, and keeps these rows: n processes train on the draws of one."""
    k, n = part
    return slice(k * size, (k + 1) * size), n * size


def drop_labels(y, p_uncond, null_label, generator, part=(0, 1)):
    """Classifier-free guidance training (Ho & Salimans 2022 Alg. 1): each label is replaced
    by the null label with probability p_uncond, so one network learns p(x | y) and p(x).
    `part` as in diffusion_loss."""
    rows, n = rows_of(part, len(y))
    drop = torch.rand(n, generator=generator, device=y.device)[rows] < p_uncond
    return torch.where(drop, torch.full_like(y, null_label), y)


@functools.cache  # once per run: the schedule and the two numbers do not change
def lognormal_probs(sched, p_mean, p_std):
    """EDM's training noise levels (Karras et al. 2022 §5), ln sigma ~ N(p_mean, p_std^2), on the
    T levels sigma_t of sched: each t gets the probability of ln sigma falling between the
    midpoints to its neighbours. (T,), summing to 1."""
    log_sigma = sched.edm_sigmas().log()  # ascending in t
    edges = (log_sigma[1:] + log_sigma[:-1]) / 2
    cdf = torch.special.ndtr((edges - p_mean) / p_std)
    return torch.diff(cdf, prepend=torch.zeros(1, dtype=cdf.dtype), append=torch.ones(1, dtype=cdf.dtype))


def diffusion_loss(model, x_0, sched, cfg, generator, bf16, y=None, part=(0, 1)):
    """DDPM Algorithm 1 / L_simple (eq. 14): t ~ U{1..T} (or EDM's log-normal noise levels),
    eps ~ N(0, I), regress the network output at x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps
    onto its target.
    The squared error is averaged (not summed) over pixels and batch, so the loss scale and
    the useful learning rate do not depend on batch or image size. A conditional model also
    sees the digits' labels y (B,), some of them dropped to the null label. Under torchrun x_0
    is part `part` of the global batch (rows_of)."""
    tr, prediction = cfg["training"], cfg["diffusion"]["prediction"]
    rows, B = rows_of(part, x_0.shape[0])
    if tr["timesteps"] == "uniform":
        t = torch.randint(0, sched.T, (B,), generator=generator, device=x_0.device)[rows]
    else:
        probs = lognormal_probs(sched, tr["p_mean"], tr["p_std"]).to(x_0.device, torch.float32)
        t = torch.multinomial(probs, B, replacement=True, generator=generator)[rows]
    eps = torch.randn((B, *x_0.shape[1:]), generator=generator, device=x_0.device)[rows]
    x_t = helper.q_sample(x_0, t, eps, sched)
    if y is not None:
        y = drop_labels(y, tr["p_uncond"], cfg["model"]["num_classes"], generator, part)
    x_in = helper.network_input(x_t, t, sched, prediction)
    with runs.autocast(x_0.device.type, bf16):
        output = model(x_in, t) if y is None else model(x_in, t, y)
    target = helper.training_target(x_0, eps, t, sched, prediction)
    if tr["loss"] == "huber":  # twice torch's Huber loss: e^2 for |e| <= delta, as MSE, then 2 delta |e| - delta^2
        per_pixel = 2 * torch.nn.functional.huber_loss(output.float(), target, reduction="none", delta=tr["huber_delta"])
    else:
        per_pixel = (output.float() - target).pow(2)
    per_sample = per_pixel.mean(dim=(1, 2, 3))  # (B,), in fp32
    gamma = tr["min_snr_gamma"]
    if gamma > 0:
        # min-SNR-gamma (Hang et al. 2023): weight each t as min(SNR, gamma) in x_0 units,
        # divided by what the chosen target already weighs (SNR for eps, SNR + 1 for v)
        snr = sched.snr().to(x_0.device)[t]
        divisor = {"eps": snr, "v": snr + 1, "x0": torch.ones_like(snr)}[prediction]
        per_sample = per_sample * snr.clamp(max=gamma) / divisor
    return per_sample.mean()


def prepare_model(model, cfg):
    """Apply the memory-format switch of cfg["training"] to a freshly built model."""
    return model.to(memory_format=torch.channels_last) if cfg["training"]["channels_last"] else model


def make_optimizer(model, tr):
    """Adam or AdamW with tr's rate and decay, as one fused kernel over all parameters."""
    optimizer_class = torch.optim.AdamW if tr["optimizer"] == "adamw" else torch.optim.Adam
    return optimizer_class(model.parameters(), lr=tr["lr"], weight_decay=tr["weight_decay"], fused=True)


def compiled(model, cfg):
    """The network the training step calls: `model`, or its torch.compile wrapper when
    cfg["training"]["compile"] is set (falling back to eager where no compiler works).
    Activations stay NCHW (runs.compile_network's layouts=False, 8% faster on a Zen 4) for
    MNIST's 28 x 28, where that was measured. Other sizes take inductor's own layouts: at 32 and
    64 px the NCHW bf16 training graph of torch 2.14 returned NaN for half the batch (its fused
    softmax of the attention over an 8 x 8 bottleneck), and inductor's layouts did not."""
    if not cfg["training"]["compile"]:
        return model
    return runs.compile_network(model, layouts=cfg["data"]["image_size"] != 28)


@torch.no_grad()
def update_ema(ema, model, decay):
    for ema_param, param in zip(ema.parameters(), model.parameters()):
        ema_param.lerp_(param, 1 - decay)


def train_step(network, model, ema, optimizer, x_0, sched, cfg, generator, bf16, step, y=None, extra_emas=(),
               part=(0, 1), loss_of=diffusion_loss):
    """One optimiser step on a batch x_0 (B, C, S, S) (labels y (B,) for a conditional model):
    loss, backward, clipping, update, EMA (and the extra EMAs of training.extra_ema_decays).
    `loss_of` takes diffusion_loss's arguments: distill.py passes its own.
    `network` is `model` itself, or its DistributedDataParallel or compiled wrapper (which
    average the gradients over the processes in backward, so each one clips and steps alike).
    Under torchrun x_0 is part `part` of the global batch. Returns this part's loss, a float."""
    tr = cfg["training"]
    loss = loss_of(network, x_0, sched, cfg, generator, bf16, y, part)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if tr["grad_clip"] > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), tr["grad_clip"])
    optimizer.step()
    # warm-up of the decay (as in TF's ExponentialMovingAverage with num_updates)
    for average, decay in zip([ema, *extra_emas], [tr["ema_decay"], *tr["extra_ema_decays"]]):
        update_ema(average, model, min(decay, (1 + step) / (10 + step)))
    return loss.item()


def save_preview(ema, cfg, device, path, num_samples=20):
    """A small grid from the EMA weights at a checkpoint (fixed seed, 10 DDIM steps, a few seconds),
    to watch a run learn; a conditional model is asked for each digit in turn. Draws no training
    randomness, so resume stays exact."""
    steps = cfg["distill"]["steps"] or min(10, cfg["diffusion"]["T"])  # a few-step student: its own steps
    cfg = helper.with_sampling(cfg, sampler="ddim", steps=steps, eta=0.0, compile=False)
    num_classes = cfg["model"]["num_classes"]
    labels = torch.arange(num_samples) % num_classes if num_classes else None
    samples = runs.sample(ema, cfg, num_samples, seed=0, device=device, labels=labels, progress=False)
    runs.save_grid(runs.to_digits(samples), path, nrow=10)


def save_loss_curve(losses, lrs, path):
    """Per-step loss (raw and smoothed) and learning rate, as one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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


def train(cfg, out, state=None, progress=True, processes=None, loss_of=None, start_from=None):
    """Train until cfg's step count (continuing `state` if given), checkpointing to out/ckpt.pt;
    returns the EMA model and the per-step losses and learning rates. A time budget
    (training.minutes, steps 0) is turned into a step count first, recorded in cfg.
    Under torchrun (`processes`, entered), each process trains on its rows of every global batch
    and rank 0 writes the checkpoints. distill.py trains its students here too, with its own
    `loss_of` (as train_step's; diffusion_loss when None) and `start_from`, the weights a new
    student starts from (the teacher's; layers the teacher lacks keep their initialisation)."""
    started = time.perf_counter()
    loss_of = loss_of or diffusion_loss
    tr, device = cfg["training"], runs.resolve_device(cfg["training"]["device"])
    processes = processes or runs.Processes(device)
    processes.check_batch(tr["batch_size"])
    part, first = (processes.rank, processes.count), processes.rank == 0
    images, labels, _ = runs.load_data(cfg["data"], train=True)  # uint8 (N, C, S, S); (N,) or None
    conditional = cfg["model"]["num_classes"] > 0
    images, labels = images.to(device), labels.to(device) if conditional else None
    steps_per_epoch = len(images) // tr["batch_size"]
    if steps_per_epoch == 0:
        raise UserError(f"{len(images)} training images are fewer than a batch ({tr['batch_size']}); "
                        f"--set training.batch_size=B for a smaller one")
    bf16 = runs.use_bf16(cfg, device)
    sched = Schedule.from_config(cfg["diffusion"])
    ckpt_path = os.path.join(out, "ckpt.pt")

    torch.manual_seed(tr["seed"])
    model = prepare_model(Model.from_config(cfg).to(device), cfg)
    ema = copy.deepcopy(model).requires_grad_(False)
    extra_emas = torch.nn.ModuleList(copy.deepcopy(ema) for _ in tr["extra_ema_decays"])  # for evaluate.py --ema
    optimizer = make_optimizer(model, tr)
    generator = torch.Generator(device).manual_seed(tr["seed"])  # t and eps draws
    step, losses, lrs = 0, [], []
    if state is None and start_from is not None:
        runs.load_weights(model, start_from, new_layers_allowed=True)
        ema.load_state_dict(model.state_dict())
    if state is not None:
        runs.load_weights(model, state["model"])
        runs.load_weights(ema, state["ema"])
        if len(extra_emas):
            runs.load_weights(extra_emas, state["extra_emas"])
        optimizer.load_state_dict(state["optimizer"])
        step, losses, lrs = state["step"], list(state["losses"]), list(state["lrs"])
        torch.set_rng_state(state["rng"]["torch"])
        generator.set_state(state["rng"]["noise"])
        if device == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        trained_on = state.get("processes", 1)
        if trained_on != processes.count:
            print(f"resuming a run of {trained_on} process{'es' * (trained_on > 1)} on {processes.count}: the same "
                  f"images and noise per step, but gradients summed in another order, so not bit for bit")
    network = compiled(processes.parallel(model), cfg)
    total_steps = runs.total_steps_of(cfg)
    print(f"training {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device}"
          f"{' (bf16 autocast)' if bf16 else ''}: steps {step} -> {total_steps or 'what the time budget fits'}, "
          f"{steps_per_epoch} per epoch"
          f"{'; compiling the network first (about a minute, less when cached)' if tr['compile'] else ''}")
    if total_steps is None:  # a time budget: time steps on the first batch, then fix the count
        x_0 = runs.to_model_range(processes.rows(images[:tr["batch_size"]]))
        y = processes.rows(labels[:tr["batch_size"]]) if conditional else None
        seconds_per_step = runs.measure_seconds_per_step(
            lambda: train_step(network, model, ema, optimizer, x_0, sched, cfg, generator, bf16, 0, y, extra_emas,
                               part, loss_of),
            {"model": (model.state_dict, model.load_state_dict), "ema": (ema.state_dict, ema.load_state_dict),
             "extra_emas": (extra_emas.state_dict, extra_emas.load_state_dict),
             "optimizer": (optimizer.state_dict, optimizer.load_state_dict),
             "noise": (generator.get_state, generator.set_state), "torch": (torch.get_rng_state, torch.set_rng_state)})
        total_steps = processes.from_rank_0(
            runs.budgeted_steps(tr["minutes"], time.perf_counter() - started, seconds_per_step))
        tr["steps"] = total_steps  # in every checkpoint: resume continues this count
        print(f"time budget {tr['minutes']:g} min: {seconds_per_step:.2f} s per step measured, "
              f"{time.perf_counter() - started:.0f} s spent on start-up and compilation -> {total_steps} steps")

    def checkpoint():  # every process holds the same state: rank 0 writes it
        if not first:
            return
        rng = {"torch": torch.get_rng_state(), "noise": generator.get_state()}
        if device == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state()
        runs.save_checkpoint({"model": model.state_dict(), "ema": ema.state_dict(),
                                "extra_emas": extra_emas.state_dict(), "optimizer": optimizer.state_dict(),
                                "step": step, "config": cfg, "rng": rng, "losses": losses, "lrs": lrs,
                                "processes": processes.count}, ckpt_path)
        save_preview(ema, cfg, device, os.path.join(out, f"samples_step{step}.png"))

    model.train()
    order, smoothed, tick = None, None, time.perf_counter()
    with runs.StopRequest() as stop, tqdm(total=total_steps, initial=step, disable=not (progress and first),
                                          dynamic_ncols=True) as bar:
        while step < total_steps:
            epoch, index = divmod(step, steps_per_epoch)
            if order is None or index == 0:
                # the data order of an epoch depends only on (seed, epoch): resume needs no state
                order = torch.randperm(len(images), generator=torch.Generator().manual_seed(tr["seed"] * 100003 + epoch))
            batch = order[index * tr["batch_size"]:(index + 1) * tr["batch_size"]]  # the global batch
            batch = processes.rows(batch).to(device)
            x_0 = runs.to_model_range(images[batch])  # (B / processes, C, S, S)
            y = labels[batch] if conditional else None

            lr = lr_at(step, tr, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_value = train_step(network, model, ema, optimizer, x_0, sched, cfg, generator, bf16, step, y,
                                    extra_emas, part, loss_of)
            loss_value, signum = processes.agree(loss_value, stop.signum or 0)
            if not math.isfinite(loss_value):  # the weights in memory are spoilt; the file is not
                kept = f"last good checkpoint: {ckpt_path}" if os.path.exists(ckpt_path) else "no checkpoint yet"
                raise RunError(f"loss is {loss_value} at step {step}; stopping ({kept})")
            step += 1
            losses.append(loss_value)
            lrs.append(lr)

            smoothed = loss_value if smoothed is None else 0.98 * smoothed + 0.02 * loss_value
            now = time.perf_counter()
            bar.set_postfix(loss=f"{smoothed:.4f}", lr=f"{lr:.2e}", img_s=f"{tr['batch_size'] / (now - tick):.0f}",
                            refresh=False)
            tick = now
            bar.update(1)
            if step % tr["checkpoint_every"] == 0 or step == total_steps:
                checkpoint()
            if signum:
                checkpoint()
                bar.close()
                if first:
                    again = f"python main.py --resume {ckpt_path}"
                    again = "the same torchrun command" if processes.launched else again
                    print(f"interrupted ({signal.Signals(signum).name}) at step {step}; saved {ckpt_path}; "
                          f"continue with {again}", file=sys.stderr)
                sys.exit(128 + signum)
    return ema, losses, lrs


def main(argv=None):
    args = parse_args(argv)
    cfg, state, out = resolve(args)
    processes = runs.Processes(runs.resolve_device(cfg["training"]["device"]))
    processes.check_batch(cfg["training"]["batch_size"])
    # under torchrun every process reads the folder alike; rank 0 holds the lock for the job
    with processes, runs.RunLock(out) if processes.rank == 0 else contextlib.nullcontext():
        try:
            cfg, state = runs.guard_run_folder(cfg, state, out, args.overwrite)
        except runs.RunComplete as complete:
            print(complete)
            return
        print(json.dumps(cfg, indent=1))
        start = time.perf_counter()
        ema, losses, lrs = train(cfg, out, state, processes=processes)
        if processes.rank == 0:
            finish(ema, losses, lrs, cfg, out, start)


def finish(ema, losses, lrs, cfg, out, start):
    """The end of a run: the EMA weights alone (what sampling needs, a third of ckpt.pt), the
    loss curve and a grid of samples."""
    print(f"trained in {(time.perf_counter() - start) / 60:.1f} min; checkpoint {os.path.join(out, 'ckpt.pt')}")
    runs.save_checkpoint({"config": cfg, "step": len(losses), "ema": ema.state_dict()}, os.path.join(out, "ema.pt"))
    save_loss_curve(losses, lrs, os.path.join(out, "loss.png"))
    num_samples, num_classes = cfg["sampling"]["num_samples"], cfg["model"]["num_classes"]
    labels = torch.arange(num_samples) % num_classes if num_classes else None  # a conditional grid: digit per column
    samples = runs.sample(ema, cfg, num_samples, seed=0, device=runs.resolve_device(cfg["training"]["device"]),
                            labels=labels)
    runs.save_grid(runs.to_digits(samples), os.path.join(out, "samples.png"),
                   nrow=num_classes or int(math.sqrt(num_samples)))
    print(f"wrote {', '.join(os.path.join(out, name) for name in ('ema.pt', 'samples.png', 'loss.png'))}")


if __name__ == "__main__":
    runs.run(main)
