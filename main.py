"""Train the diffusion model on MNIST (report §4 Algorithm 1, §7), with EMA weights, periodic
atomic checkpoints and exact resume; at the end write a sample grid and the loss curve.

    python main.py [--preset P] [--data-root DIR] [--out DIR] [--epochs N | --steps N]
                   [--resume CKPT] [--seed S] [--device D]
"""
import copy
import json
import math
import os
import signal
import sys
import time

import torch
from tqdm import tqdm

import helper
from helper import Schedule, UserError
from model import Model


def parse_args(argv=None):
    parser = helper.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", help="paper, cpu or smoke (default: paper with CUDA, else cpu)")
    parser.add_argument("--data-root", help="torchvision MNIST root (default: config data.root)")
    parser.add_argument("--out", help="output directory (default: out, or the checkpoint's on --resume)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=helper.positive_int, help="train this many epochs")
    length.add_argument("--steps", type=helper.positive_int, help="train this many optimiser steps in total")
    parser.add_argument("--resume", metavar="CKPT", help="continue the run saved in this checkpoint")
    parser.add_argument("--seed", type=int, help="training seed (default: config training.seed)")
    parser.add_argument("--device", help="auto, cpu or cuda (default: auto)")
    return parser.parse_args(argv)


def resolve(args):
    """The run's config, checkpoint to resume (or None) and output directory."""
    state = None
    if args.resume:
        if args.preset or args.seed is not None:
            raise UserError("--resume takes its preset and seed from the checkpoint; drop --preset/--seed")
        state = helper.load_checkpoint(args.resume)
        cfg = helper.merge_config(helper.config, state["config"])
        out = args.out or os.path.dirname(os.path.abspath(args.resume))
    else:
        preset = args.preset or ("paper" if torch.cuda.is_available() else "cpu")
        cfg = helper.get_config(preset)
        out = args.out or "out"
    overrides = {"data": {}, "training": {}}
    if args.data_root:
        overrides["data"]["root"] = args.data_root
    if args.steps:
        overrides["training"].update(steps=args.steps)
    if args.epochs:
        overrides["training"].update(epochs=args.epochs, steps=0)
    if args.seed is not None:
        overrides["training"]["seed"] = args.seed
    if args.device:
        overrides["training"]["device"] = args.device
    cfg = helper.merge_config(cfg, overrides)
    helper.validate_config(cfg)
    return cfg, state, out


def lr_at(step, tr, total_steps):
    """Linear warm-up to tr['lr'], then constant or cosine decay to min_lr_ratio * lr."""
    if step < tr["warmup_steps"]:
        return tr["lr"] * (step + 1) / tr["warmup_steps"]
    if tr["lr_decay"] == "constant":
        return tr["lr"]
    progress = (step - tr["warmup_steps"]) / max(1, total_steps - tr["warmup_steps"])
    return tr["lr"] * (tr["min_lr_ratio"] + (1 - tr["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * progress)))


def diffusion_loss(model, x_0, sched, cfg, generator, bf16):
    """DDPM Algorithm 1 / L_simple (eq. 14): t ~ U{1..T}, eps ~ N(0, I), regress the network
    output at x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps onto its target.
    The squared error is averaged (not summed) over pixels and batch, so the loss scale and
    the useful learning rate do not depend on batch or image size."""
    B = x_0.shape[0]
    t = torch.randint(0, sched.T, (B,), generator=generator, device=x_0.device)
    eps = torch.randn(x_0.shape, generator=generator, device=x_0.device)
    x_t = helper.q_sample(x_0, t, eps, sched)
    with helper.autocast(x_0.device.type, bf16):
        output = model(x_t, t)
    prediction = cfg["diffusion"]["prediction"]
    target = helper.training_target(x_0, eps, t, sched, prediction)
    per_sample = (output.float() - target).pow(2).mean(dim=(1, 2, 3))  # (B,), in fp32
    gamma = cfg["training"]["min_snr_gamma"]
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
    cfg["training"]["compile"] is set (falling back to eager where no compiler works)."""
    return helper.compile_network(model) if cfg["training"]["compile"] else model


@torch.no_grad()
def update_ema(ema, model, decay):
    for ema_param, param in zip(ema.parameters(), model.parameters()):
        ema_param.lerp_(param, 1 - decay)


def train_step(network, model, ema, optimizer, x_0, sched, cfg, generator, bf16, step):
    """One optimiser step on a batch x_0 (B, C, S, S): loss, backward, clipping, update, EMA.
    `network` is `model` itself or its compiled wrapper. Returns the loss as a Python float."""
    tr = cfg["training"]
    loss = diffusion_loss(network, x_0, sched, cfg, generator, bf16)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if tr["grad_clip"] > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), tr["grad_clip"])
    optimizer.step()
    # warm-up of the decay (as in TF's ExponentialMovingAverage with num_updates)
    update_ema(ema, model, min(tr["ema_decay"], (1 + step) / (10 + step)))
    return loss.item()


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
    lr_ax.set_ylabel("learning rate", color="C1")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class StopRequest:
    """Ctrl-C sets a flag; the loop finishes the current step, checkpoints and exits."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)  # a second Ctrl-C interrupts at once

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


def train(cfg, out, state=None, progress=True):
    """Train until cfg's step count (continuing `state` if given), checkpointing to out/ckpt.pt;
    returns the EMA model and the per-step losses and learning rates."""
    tr, device = cfg["training"], helper.resolve_device(cfg["training"]["device"])
    images = helper.load_mnist(cfg["data"]["root"], train=True).to(device)  # (60000, 28, 28) uint8
    steps_per_epoch = len(images) // tr["batch_size"]
    total_steps = tr["steps"] or tr["epochs"] * steps_per_epoch
    bf16 = helper.use_bf16(cfg, device)
    sched = Schedule.from_config(cfg["diffusion"])
    ckpt_path = os.path.join(out, "ckpt.pt")

    torch.manual_seed(tr["seed"])
    model = prepare_model(Model.from_config(cfg).to(device), cfg)
    network = compiled(model, cfg)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = make_optimizer(model, tr)
    generator = torch.Generator(device).manual_seed(tr["seed"])  # t and eps draws
    step, losses, lrs = 0, [], []
    if state is not None:
        helper.load_weights(model, state["model"])
        helper.load_weights(ema, state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        step, losses, lrs = state["step"], list(state["losses"]), list(state["lrs"])
        torch.set_rng_state(state["rng"]["torch"])
        generator.set_state(state["rng"]["noise"])
        if device == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"])

    def checkpoint():
        rng = {"torch": torch.get_rng_state(), "noise": generator.get_state()}
        if device == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state()
        helper.save_checkpoint({"model": model.state_dict(), "ema": ema.state_dict(),
                                "optimizer": optimizer.state_dict(), "step": step, "config": cfg,
                                "rng": rng, "losses": losses, "lrs": lrs}, ckpt_path)

    print(f"training {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device}"
          f"{' (bf16 autocast)' if bf16 else ''}: steps {step} -> {total_steps}, {steps_per_epoch} per epoch"
          f"{'; compiling the network first (about a minute, less when cached)' if tr['compile'] else ''}")
    model.train()
    bar = tqdm(total=total_steps, initial=step, disable=not progress, dynamic_ncols=True)
    order, smoothed, tick = None, None, time.perf_counter()
    with StopRequest() as stop:
        while step < total_steps:
            epoch, index = divmod(step, steps_per_epoch)
            if order is None or index == 0:
                # the data order of an epoch depends only on (seed, epoch): resume needs no state
                order = torch.randperm(len(images), generator=torch.Generator().manual_seed(tr["seed"] * 100003 + epoch))
            batch = order[index * tr["batch_size"]:(index + 1) * tr["batch_size"]].to(device)
            x_0 = helper.to_model_range(images[batch], cfg["data"]["image_size"])  # (B, 1, S, S)

            lr = lr_at(step, tr, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_value = train_step(network, model, ema, optimizer, x_0, sched, cfg, generator, bf16, step)
            if not math.isfinite(loss_value):  # the weights in memory are spoilt; the file is not
                bar.close()
                kept = f"last good checkpoint: {ckpt_path}" if os.path.exists(ckpt_path) else "no checkpoint yet"
                print(f"error: loss is {loss_value} at step {step}; stopping ({kept})", file=sys.stderr)
                sys.exit(1)
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
            if stop.requested:
                checkpoint()
                bar.close()
                print(f"interrupted at step {step}; saved {ckpt_path}; continue with "
                      f"python main.py --resume {ckpt_path}", file=sys.stderr)
                sys.exit(130)
    bar.close()
    return ema, losses, lrs


def main(argv=None):
    args = parse_args(argv)
    cfg, state, out = resolve(args)
    print(json.dumps(cfg, indent=1))
    start = time.perf_counter()
    ema, losses, lrs = train(cfg, out, state)
    print(f"trained in {(time.perf_counter() - start) / 60:.1f} min; checkpoint {os.path.join(out, 'ckpt.pt')}")
    save_loss_curve(losses, lrs, os.path.join(out, "loss.png"))
    num_samples = cfg["sampling"]["num_samples"]
    samples = helper.sample(ema, cfg, num_samples, seed=0, device=helper.resolve_device(cfg["training"]["device"]))
    helper.save_grid(samples, os.path.join(out, "samples.png"), nrow=int(math.sqrt(num_samples)))
    print(f"wrote {os.path.join(out, 'samples.png')} and {os.path.join(out, 'loss.png')}")


if __name__ == "__main__":
    helper.run(main)
