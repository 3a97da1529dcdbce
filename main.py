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
import json
import os
import time

import torch

import config
import data
from processes import Processes
import runs
import training
from config import UserError


def parse_args(argv=None):
    parser = runs.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", help=f"{', '.join(config.presets)} (default: paper with CUDA, else cpu)")
    parser.add_argument("--data", help=f"the images: {', '.join(data.DATASETS)} (default: mnist), a folder of "
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
                             "model.ch_mult=[1,2,2], diffusion.prediction=x0); repeatable")
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
        cfg = config.get_config(preset)
        settings = [runs.parse_setting(setting) for setting in args.settings]
        for setting in settings:
            cfg = config.merge_config(cfg, setting)
        out = args.out or "out"
    overrides = {"data": {}, "training": {}, "model": {}}
    if args.conditional or args.unconditional:
        overrides["model"]["num_classes"] = 10 if args.conditional else 0  # 10 stands for the data's classes
    if args.data:
        overrides["data"]["name"] = data.data_name(args.data)
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
    cfg = config.merge_config(cfg, overrides)
    if state is None:
        def chosen(section, key):  # set with --set
            return any(key in setting.get(section, {}) for setting in settings)
        cfg = fit_to_data(cfg, resize=chosen("data", "image_size"), conditional=args.conditional,
                          levels=preset == "cpu" and not chosen("model", "ch_mult"))
    config.validate_config(cfg)
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
    splits = [data.read_data(data_cfg["name"], data_cfg["root"], train) for train in (True, False)]
    train_split = splits[0]
    first = train_split.images[0].shape[-2:]  # (H, W)
    if not resize and (first[0] != first[1] or any(split.sizes != {tuple(first)} for split in splits)):
        odd, split = next((i, split) for split in splits for i, image in enumerate(split.images)
                          if image.shape[-2:] != first or first[0] != first[1])
        what = split.files[odd] if split.files else f"image {odd}"
        raise UserError(f"the images differ in size or are not square: {what} is {split.images[odd].shape[-1]}x"
                        f"{split.images[odd].shape[-2]}, the first {first[1]}x{first[0]}; --set data.image_size=S "
                        f"resizes every image to S x S")
    size = data_cfg["image_size"] if resize else train_split.images[0].shape[-1]
    num_classes = cfg["model"]["num_classes"]
    if num_classes and train_split.labels is None:
        if conditional:
            raise UserError(f"--conditional needs labelled data; '{data_cfg['name']}' has no labels "
                            f"(class subfolders, or an .npz key 'labels')")
        print(f"'{data_cfg['name']}' has no labels: training an unconditional model")
    classes = len(train_split.classes) if num_classes and train_split.labels is not None else 0
    fitted = {"data": {"image_size": size, "channels": train_split.images[0].shape[0]}, "model": {"num_classes": classes}}
    if levels:
        fitted["model"]["ch_mult"] = cpu_levels(size)
    return config.merge_config(cfg, fitted)


def main(argv=None):
    args = parse_args(argv)
    cfg, state, out = resolve(args)
    processes = Processes(runs.resolve_device(cfg["training"]["device"]))
    processes.check_batch(cfg["training"]["batch_size"])
    # under torchrun every process reads the folder alike; rank 0 holds the lock for the job
    with processes, runs.RunLock(out) if processes.rank == 0 else contextlib.nullcontext():
        try:
            cfg, state = training.guard_run_folder(cfg, state, out, args.overwrite)
        except training.RunComplete as complete:
            print(complete)
            return
        print(json.dumps(cfg, indent=1))
        start = time.perf_counter()
        ema, losses, lrs = training.train(cfg, out, state, processes=processes)
        if processes.rank == 0:
            training.finish(ema, losses, lrs, cfg, out, start)


if __name__ == "__main__":
    runs.run(main)
