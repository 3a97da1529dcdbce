"""Load a checkpoint, sample digits with its EMA weights (report §5, §8) and write the
per-step denoising trajectories, a sample grid and the samples as .npz.

    python loadmodel.py [CHECKPOINT] [--sampler S] [--steps N] [--num-samples N] [--seed S] [--compile] [--out DIR]
"""
import argparse
import math
import os

import numpy as np
import torch

import helper
from model import Model


def parse_args(argv=None):
    parser = helper.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", nargs="?", default=os.path.join("out", "ckpt.pt"),
                        help="checkpoint written by main.py (default: out/ckpt.pt)")
    parser.add_argument("--sampler", choices=["ddpm", "ddim", "dpm++"], help="default: the checkpoint's")
    parser.add_argument("--steps", type=helper.positive_int,
                        help="network evaluations; fewer than T respaces the schedule (default: the checkpoint's)")
    parser.add_argument("--num-samples", type=helper.positive_int, default=16, help="digits to sample")
    parser.add_argument("--seed", type=int, default=0, help="seed of x_T and of the sampler's noise")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction,
                        help="sample with the compiled network: up to a minute of compilation, then "
                             "faster steps; pays for thousands of network evaluations (default: the checkpoint's)")
    parser.add_argument("--out", help="output directory (default: the checkpoint's)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return parser.parse_args(argv)


def load_ema_model(path, device):
    """The EMA network of a checkpoint and the config stored with it."""
    state = helper.load_checkpoint(path)
    cfg = helper.merge_config(helper.config, state["config"])
    model = Model.from_config(cfg)
    helper.load_weights(model, state["ema"])
    return model.to(device).eval(), cfg


def save_trajectory_figure(trajectory, path, max_columns=20):
    """One row per sample, columns evenly spaced from x_T (left) to x_0 (right).
    trajectory: (N, S+1, C, H, W) in model range."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    N, S = trajectory.shape[:2]
    columns = np.unique(np.linspace(0, S - 1, min(S, max_columns)).round().astype(int))
    images = helper.to_uint8(trajectory[:, columns]).numpy()  # (N, K, H, W, C)
    fig, axes = plt.subplots(N, len(columns), figsize=(0.8 * len(columns), 0.8 * N + 0.3), squeeze=False)
    for row in range(N):
        for k, column in enumerate(columns):
            ax = axes[row, k]
            ax.imshow(images[row, k].squeeze(-1), cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"{S - 1 - column}/{S - 1}" if column < S - 1 else "x_0", fontsize=7)
    fig.suptitle("denoising trajectories: sampler steps left until x_0", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    device = helper.resolve_device(args.device)
    model, cfg = load_ema_model(args.checkpoint, device)
    cfg = helper.with_sampling(cfg, sampler=args.sampler, steps=args.steps, compile=args.compile)
    out = args.out or os.path.dirname(os.path.abspath(args.checkpoint))
    os.makedirs(out, exist_ok=True)
    s = cfg["sampling"]
    print(f"sampling {args.num_samples} digits with {s['sampler']} "
          f"({s['steps'] or cfg['diffusion']['T']} steps), seed {args.seed}")
    samples, trajectory = helper.sample(model, cfg, args.num_samples, args.seed, device, return_trajectory=True)

    shown = min(args.num_samples, 8)  # a readable figure; every sample is in the grid and .npz
    save_trajectory_figure(trajectory[:shown], os.path.join(out, "trajectory.png"))
    helper.save_grid(samples, os.path.join(out, "samples_grid.png"), nrow=math.ceil(math.sqrt(args.num_samples)))
    digits = helper.to_digits(samples)  # (N, 28, 28, 1) uint8
    np.savez(os.path.join(out, "samples.npz"), arr_0=digits)
    print(f"wrote trajectory.png, samples_grid.png and samples.npz {digits.shape} to {out}")


if __name__ == "__main__":
    helper.run(main)
