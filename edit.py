"""Edit digits with a trained model: fill in a masked part of a real held-out image (an MNIST
test digit, for MNIST) with RePaint, and walk between two starting noises (slerp); a
conditional checkpoint can be asked for a digit, and also renders the same noises with each label.

    python edit.py inpaint [CHECKPOINT] --index I [--mask top|bottom|left|right|centre] [--digit D]
                           [--resample R] [--count N] [--num-samples K] [--steps N] [--seed S]
                           [--data NAME_OR_PATH] [--data-root DIR]
    python edit.py interpolate [CHECKPOINT] [--seeds A B] [--frames F] [--pairs P] [--digit D]
                               [--sampler ddim|dpm++] [--steps N]
"""
import os

import numpy as np
import torch
from tqdm import tqdm

import config
import data
import helper
import runs
import samplers
from config import UserError

MASKS = ["top", "bottom", "left", "right", "centre"]


def region_mask(name, size):
    """1 where the pixel is known, 0 in the region to fill: (1, 1, size, size)."""
    known = torch.ones(1, 1, size, size)
    half, quarter = size // 2, size // 4
    region = {"top": (slice(0, half), slice(None)), "bottom": (slice(half, None), slice(None)),
              "left": (slice(None), slice(0, half)), "right": (slice(None), slice(half, None)),
              "centre": (slice(quarter, size - quarter), slice(quarter, size - quarter))}[name]
    known[0, 0][region] = 0
    return known


@torch.no_grad()
def repaint(model, x_T, sched, x_known, known, prediction, variance, clip_x0, generator, resample=1,
            progress=True):
    """RePaint (Lugmayr et al. 2022, Alg. 1) on DDPM's ancestral steps: at every step i -> i-1
    the known pixels (known = 1) are replaced by the original forward-noised to level i-1,
        x_{i-1} = known * q_sample(x_known, i-1) + (1 - known) * ddpm_step(x_i),
    the original itself at the last step; with resample = r, each step is redone r times,
    jumping back by one forward step x_i ~ q(x_i | x_{i-1}) in between, so the generated part
    can adapt to the known one. Shapes (B, C, H, W); known broadcasts."""
    sigmas = sched.sigmas(variance)
    x_t = x_T
    for i in tqdm(range(sched.T - 1, -1, -1), desc="repaint", disable=not progress, leave=False):
        i_batch = torch.full((len(x_t),), i, device=x_t.device, dtype=torch.long)
        for u in range(resample):
            generated = samplers.ddpm_step(model, x_t, i, sched, prediction, sigmas, clip_x0, generator)
            if i > 0:
                x_known_prev = helper.q_sample(x_known, i_batch - 1, samplers.noise_like(x_known, generator), sched)
            else:
                x_known_prev = x_known
            x_prev = known * x_known_prev + (1 - known) * generated
            if u < resample - 1 and i > 0:
                x_t = helper.q_sample_step(x_prev, i_batch, samplers.noise_like(x_prev, generator), sched)
        x_t = x_prev
    return x_t


def slerp(z_0, z_1, a):
    """Spherical interpolation between noises z_0, z_1 (B, ...) at fraction a in [0, 1]:
    sin((1 - a) theta) / sin(theta) z_0 + sin(a theta) / sin(theta) z_1, theta the angle between
    them. Unlike a straight line it keeps the norm of Gaussian noise (about sqrt(dim)), so every
    point is a likely x_T."""
    flat_0, flat_1 = z_0.flatten(1), z_1.flatten(1)
    cos = (flat_0 * flat_1).sum(1) / (flat_0.norm(dim=1) * flat_1.norm(dim=1))
    theta = cos.clamp(-1, 1).acos().reshape(-1, *[1] * (z_0.ndim - 1))  # (B, 1, 1, 1)
    return (torch.sin((1 - a) * theta) * z_0 + torch.sin(a * theta) * z_1) / torch.sin(theta)


def source_images(args, cfg):
    """The held-out images to inpaint, uint8 (N, C, S, S) at the checkpoint's size, and their
    labels (N,) (None when unlabelled): of the checkpoint's data, or of --data."""
    data_cfg = {**cfg["data"], "name": data.data_name(args.data) if args.data else cfg["data"]["name"],
                "root": args.data_root or cfg["data"]["root"]}
    images, labels, _ = data.load_data(data_cfg, train=False)
    if images.shape[1] != cfg["data"]["channels"]:
        raise UserError(f"the checkpoint draws {cfg['data']['channels']}-channel images; '{data_cfg['name']}' has "
                        f"{images.shape[1]} channel(s)")
    return images, labels


def inpaint(args, model, cfg, device, out, guide):
    images, labels = source_images(args, cfg)
    if not 0 <= args.index or args.index + args.count > len(images):
        raise UserError(f"--index {args.index} with --count {args.count} runs past the {len(images)} held-out images")
    size, K = cfg["data"]["image_size"], args.num_samples
    originals = data.to_model_range(images[args.index:args.index + args.count])  # (count, C, S, S)
    known = region_mask(args.mask, size).to(device)
    x_known = originals.repeat_interleave(K, 0).to(device)  # each original K times: (count K, C, S, S)
    wanted = runs.requested_labels(args.digit, len(x_known), cfg)  # None: the null label of a conditional model
    requested = wanted  # else the originals' own labels, where the data has them
    if wanted is None and labels is not None:
        requested = labels[args.index:args.index + args.count].repeat_interleave(K)
    sched = runs.sampling_schedule(cfg)
    print(f"inpainting the {args.mask} of {args.count} test digit(s) from index {args.index}, {K} completion(s) "
          f"each: DDPM, {sched.T} steps x {args.resample} (resampling)")

    def fill(network, x_T, generator, progress, part):  # RePaint of the digits x_known[part]
        return repaint(network, x_T, sched, x_known[part], known, cfg["diffusion"]["prediction"],
                       cfg["sampling"]["variance"], cfg["sampling"]["clip_x0"], generator, args.resample, progress)
    digits, _ = runs.sample_digits(model, cfg, len(x_known), args.seed, device, wanted, batch_size=args.batch_size,
                                   desc="inpaint", sampler=fill, guide=guide)  # (count K, S, S, C)
    arrays = {"arr_0": digits} if requested is None else {"arr_0": digits, "labels": requested.numpy()}
    np.savez(os.path.join(out, "inpainted.npz"), **arrays)

    shown = min(args.count, 8)
    first_digits = data.to_digits(originals[:shown])  # (shown, S, S, C)
    masked = data.to_digits(torch.where(known.cpu().bool(), originals[:shown], torch.zeros(())))  # grey hole
    completions = digits[:shown * K].reshape(shown, K, *digits.shape[1:])
    rows = np.concatenate([first_digits[:, None], masked[:, None], completions], axis=1)
    ask = "" if args.digit is None else f", asked for a {args.digit}"
    data.save_rows(rows, os.path.join(out, "inpaint.png"), [f"#{args.index + r}" for r in range(shown)],
              ["original", "input"] + [f"fill {c + 1}" for c in range(K)],
              f"inpainting the {args.mask} (RePaint, r = {args.resample}{ask})")
    said = "none" if requested is None else "requested" if args.digit is not None else "the originals'"
    print(f"wrote inpaint.png and inpainted.npz {digits.shape} (labels: {said}) to {out}")


def interpolate(args, model, cfg, device, out, guide):
    cfg = config.with_sampling(cfg, eta=0.0)  # deterministic: the strip is a function of the noise
    size, F = cfg["data"]["image_size"], args.frames
    shape = (args.pairs, cfg["data"]["channels"], size, size)
    z_0, z_1 = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) for seed in args.seeds)
    fractions = torch.linspace(0, 1, F)
    x_T = torch.cat([slerp(z_0, z_1, a) for a in fractions.tolist()])  # (F P, C, S, S), frame-major
    labels = runs.requested_labels(args.digit, len(x_T), cfg)
    samples = runs.sample(model, cfg, len(x_T), args.seeds[0], device, labels=labels, x_T=x_T.to(device), guide=guide)
    images = data.to_digits(samples)  # (F P, S, S, C)
    strips = images.reshape(F, args.pairs, *images.shape[1:]).swapaxes(0, 1)  # (P, F, S, S, C)
    what = "" if args.digit is None else f", digit {args.digit}"
    data.save_rows(strips, os.path.join(out, "interpolation.png"), None, [f"{a:.2f}" for a in fractions.tolist()],
              f"slerp between the noises of seeds {args.seeds[0]} and {args.seeds[1]} "
              f"({cfg['sampling']['sampler']}, eta = 0{what})")
    written = ["interpolation.png"]
    classes = cfg["model"]["num_classes"]
    if classes:  # the same noises with every label: what the noise itself encodes
        x_T = z_0.repeat_interleave(classes, 0)  # (P classes, C, S, S)
        samples = runs.sample(model, cfg, len(x_T), args.seeds[0], device,
                              labels=torch.arange(classes).repeat(args.pairs), x_T=x_T.to(device), guide=guide)
        images = data.to_digits(samples)
        rows = images.reshape(args.pairs, classes, *images.shape[1:])
        data.save_rows(rows, os.path.join(out, "labels.png"), None, [str(d) for d in range(classes)],
                  f"one noise per row (seed {args.seeds[0]}), each label, guidance w = {cfg['sampling']['guidance']}")
        written.append("labels.png")
    print(f"wrote {' and '.join(written)} to {out}")


def parse_args(argv=None):
    parser = runs.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    common = runs.ArgumentParser(add_help=False)
    common.add_argument("checkpoint", nargs="?",
                        help="checkpoint written by main.py (default: out/ckpt.pt, else the shipped weights)")
    common.add_argument("--digit", type=runs.digit_choice, help="conditional checkpoints: the digit to ask for")
    common.add_argument("--guidance", type=float, help="guidance w (default: the checkpoint's)")
    common.add_argument("--guide", help=runs.GUIDE_HELP)
    common.add_argument("--steps", type=runs.positive_int, help="network evaluations (default: the checkpoint's)")
    common.add_argument("--compile", action="store_true", help="sample with the compiled network")
    common.add_argument("--out", help="output directory (default: the checkpoint's)")
    common.add_argument("--device", default="auto", help="auto, cpu or cuda")

    fill = commands.add_parser("inpaint", parents=[common], help="fill a masked region of a test digit")
    fill.add_argument("--index", type=int, default=0, help="first held-out image (MNIST's test digits: 0-9999)")
    fill.add_argument("--count", type=runs.positive_int, default=1, help="test digits from --index on")
    fill.add_argument("--mask", choices=MASKS, default="top", help="the region to fill")
    fill.add_argument("--resample", type=runs.positive_int, default=2,
                      help="RePaint's r: times each step is redone after jumping back (1: none; what 2 buys for "
                           "twice the time: docs/control.md)")
    fill.add_argument("--num-samples", type=runs.positive_int, default=6, help="completions per digit")
    fill.add_argument("--batch-size", type=runs.positive_int, default=runs.SAMPLE_BATCH)
    fill.add_argument("--seed", type=int, default=0)
    fill.add_argument("--data", help="whose held-out images to inpaint, as main.py --data (default: the "
                                     "checkpoint's data)")
    fill.add_argument("--data-root", help="where torchvision datasets are (default: the checkpoint's data.root)")

    walk = commands.add_parser("interpolate", parents=[common], help="slerp between two noises")
    walk.add_argument("--seeds", type=int, nargs=2, default=[0, 1], metavar=("A", "B"), help="the two noises")
    walk.add_argument("--frames", type=runs.positive_int, default=10, help="points along the path, ends included")
    walk.add_argument("--pairs", type=runs.positive_int, default=4, help="strips (noise pairs) drawn")
    walk.add_argument("--sampler", choices=["ddim", "dpm++"], default="ddim", help="a deterministic sampler")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = runs.resolve_device(args.device)
    checkpoint = runs.default_checkpoint(args.checkpoint)
    model, cfg = runs.load_ema_model(checkpoint, device)
    if args.digit == "all":
        raise UserError("--digit all is for loadmodel.py; edit.py asks for one digit")
    sampler = "ddpm" if args.command == "inpaint" else args.sampler
    cfg = runs.with_sampling_flags(cfg, args.guidance, guide=args.guide, sampler=sampler, steps=args.steps,
                                   compile=args.compile or None)
    out = runs.output_folder(args.out, checkpoint)
    os.makedirs(out, exist_ok=True)
    (inpaint if args.command == "inpaint" else interpolate)(args, model, cfg, device, out,
                                                            runs.load_guide(runs.guide_path(args.guide, cfg, checkpoint),
                                                                            cfg, device))


if __name__ == "__main__":
    runs.run(main)
