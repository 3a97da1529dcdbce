"""Load a checkpoint, sample digits with its EMA weights (report §5, §8) and write the
per-step denoising trajectories (a figure and an animated GIF), a sample grid and the samples
as .npz. A conditional checkpoint (the cpu preset's) draws each digit in turn, or the one asked
for, with classifier-free guidance; at guidance w = 0 it samples unconditionally.

    python loadmodel.py [CHECKPOINT] [--digit D|all] [--guidance W] [--guidance-interval LO HI] [--guide GUIDE]
                        [--sampler S] [--steps N] [--eta E]
                        [--num-samples N] [--batch-size B] [--seed S] [--compile] [--out DIR]
"""
import argparse
import math
import os

import numpy as np

import config
import data
import runs

GRID_MAX = 256  # samples shown in samples_grid.png; every sample is in samples.npz


def parse_args(argv=None):
    parser = runs.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", nargs="?",
                        help=f"checkpoint written by main.py (default: out/ckpt.pt, else the shipped {runs.PRETRAINED})")
    parser.add_argument("--digit", type=runs.digit_choice,
                        help="conditional checkpoints: the digit (the class, for other data) to draw, or 'all' "
                             "for N/10 of each (N/classes), one row per class (default: all; --guidance 0 draws "
                             "unconditional samples instead)")
    parser.add_argument("--guidance", type=float,
                        help="classifier-free guidance w: output = uncond + w (cond - uncond); 0 unconditional, "
                             "1 plain conditional (default: the checkpoint's sampling.guidance)")
    parser.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"), help=runs.INTERVAL_HELP)
    parser.add_argument("--guide", help=runs.GUIDE_HELP)
    parser.add_argument("--sampler", choices=config.SAMPLERS, help="default: the checkpoint's")
    parser.add_argument("--steps", type=runs.positive_int,
                        help="network evaluations; fewer than T respaces the schedule (default: the checkpoint's)")
    parser.add_argument("--eta", type=float, help=runs.ETA_HELP)
    parser.add_argument("--num-samples", type=runs.positive_int,
                        help="digits to sample (default: 16, or 10 per class with --digit all)")
    parser.add_argument("--batch-size", type=runs.positive_int, default=runs.SAMPLE_BATCH,
                        help="digits sampled at once; memory depends on this, not on --num-samples")
    parser.add_argument("--seed", type=int, default=0, help="seed of x_T and of the sampler's noise")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction,
                        help="sample with the compiled network: up to a minute of compilation, then "
                             "faster steps; pays for thousands of network evaluations (default: the checkpoint's)")
    parser.add_argument("--out", help="output directory (default: the checkpoint's)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return parser.parse_args(argv)


def save_trajectory_figure(trajectory, path, row_labels=None, max_columns=20):
    """One row per sample, columns evenly spaced from x_T (left) to x_0 (right), captioned with the
    sampler steps left. trajectory: (N, S+1, C, H, W) in model range; row_labels: one per row, or None."""
    S = trajectory.shape[1]
    columns = np.unique(np.linspace(0, S - 1, min(S, max_columns)).round().astype(int))
    rows = data.to_uint8(trajectory[:, columns]).numpy()  # (N, K, H, W, C)
    data.save_rows(rows, path, row_labels, [f"{S - 1 - c}/{S - 1}" if c < S - 1 else "x_0" for c in columns],
                   "denoising trajectories: sampler steps left until x_0")


def save_trajectory_gif(trajectory, path, nrow, frames=50, scale=3):
    """The trajectories as an animated GIF: each frame a grid of the samples at one sampler step,
    from x_T to x_0 (at most `frames` steps, evenly spaced), the last held for two seconds.
    trajectory: (N, S+1, C, H, W) in model range."""
    from PIL import Image
    S = trajectory.shape[1]
    steps = np.unique(np.linspace(0, S - 1, min(S, frames)).round().astype(int))
    images = []
    for step in steps:
        pixels = data.shown(data.tile(data.to_uint8(trajectory[:, step]).numpy(), nrow, padding=1))
        images.append(Image.fromarray(pixels).resize((pixels.shape[1] * scale, pixels.shape[0] * scale), Image.NEAREST))
    durations = [80] * (len(images) - 1) + [2000]
    images[0].save(path, save_all=True, append_images=images[1:], duration=durations, loop=0)


def main(argv=None):
    args = parse_args(argv)
    device = runs.resolve_device(args.device)
    checkpoint = runs.default_checkpoint(args.checkpoint)
    model, cfg = runs.load_ema_model(checkpoint, device)
    cfg = runs.with_sampling_flags(cfg, args.guidance, args.guidance_interval, args.guide, sampler=args.sampler,
                                   steps=args.steps, eta=args.eta, compile=args.compile)
    guide = runs.load_guide(runs.guide_path(args.guide, cfg, checkpoint), cfg, device)
    digit = args.digit
    if digit is None and cfg["model"]["num_classes"] and cfg["sampling"]["guidance"] > 0:
        digit = "all"  # a conditional model draws each digit in turn; w = 0 samples unconditionally
    classes = cfg["model"]["num_classes"]
    n = args.num_samples or (10 * classes if digit == "all" else 16)
    labels = runs.requested_labels(digit, n, cfg)
    out = runs.output_folder(args.out, checkpoint)
    os.makedirs(out, exist_ok=True)
    s = cfg["sampling"]
    which = "each digit in turn" if digit == "all" else f"digit {digit}"
    wanted = "" if labels is None else f" of {which},"
    if labels is not None or guide is not None:
        autoguided = guide is not None or cfg["distill"]["guide"]
        wanted += f" {'autoguidance' if autoguided else 'guidance'} w = {s['guidance']},"
    noise = f", eta = {s['eta']:g}" if s["eta"] > 0 and s["sampler"] != "ddpm" else ""
    print(f"sampling {n} digits{wanted} with {s['sampler']} ({s['steps'] or cfg['diffusion']['T']} steps{noise}), "
          f"seed {args.seed}, {args.batch_size} at a time")

    per_row = n // classes if digit == "all" else None
    shown = list(range(0, n, per_row)) if per_row else list(range(min(n, 8)))  # rows of trajectory.png
    digits, trajectory = runs.sample_digits(model, cfg, n, args.seed, device, labels, shown, args.batch_size,
                                            guide=guide)

    row_labels = None if labels is None else [f"digit {labels[i]}" for i in shown]
    save_trajectory_figure(trajectory, os.path.join(out, "trajectory.png"), row_labels)
    save_trajectory_gif(trajectory, os.path.join(out, "trajectory.gif"), nrow=len(shown) if per_row else 4)
    if per_row:  # one row per class: the first of each, at most GRID_MAX in all
        width = max(1, min(per_row, GRID_MAX // classes))
        grid = np.concatenate([digits[d * per_row:d * per_row + width] for d in range(classes)])
        data.save_grid(grid, os.path.join(out, "samples_grid.png"), nrow=width)
    else:
        grid = digits[:GRID_MAX]
        data.save_grid(grid, os.path.join(out, "samples_grid.png"), nrow=math.ceil(math.sqrt(len(grid))))
    arrays = {"arr_0": digits} if labels is None else {"arr_0": digits, "labels": labels.numpy()}
    np.savez(os.path.join(out, "samples.npz"), **arrays)
    capped = f" (the grid shows {len(grid)} of them)" if len(grid) < n else ""
    print(f"wrote trajectory.png, trajectory.gif, samples_grid.png and samples.npz {digits.shape}{capped} to {out}")


if __name__ == "__main__":
    runs.run(main)
