"""Build image data of other shapes from MNIST, for main.py --data: a folder of PNGs in class
subfolders, or an .npz (uint8 arr_0 (N, H, W, C) and labels), greyscale or coloured, 28 x 28 or
padded to a larger size.

    python tools/make_data.py OUT [--colour] [--size S] [--count N] [--unlabelled] [--data-root DIR] [--seed S]

OUT ending in .npz writes an .npz, anything else a folder. --colour draws, per image, a stroke
colour and a background colour (RGB, at least half the range apart in some channel) and paints
the digit's ink in the one over the other: x = background + ink (stroke - background).

    python tools/make_data.py data/rgb-digits.npz --colour --size 32   # docs/own-data.md's data
"""
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import config  # noqa: E402
import data  # noqa: E402
import runs  # noqa: E402


def coloured(ink, generator):
    """Ink (N, 1, S, S) uint8 -> RGB (N, 3, S, S) uint8, stroke and background colours drawn per image."""
    stroke, background = torch.randint(0, 256, (2, len(ink), 3, 1, 1), generator=generator)
    close = (stroke - background).abs().amax(dim=(1, 2, 3)) < 128
    while close.any():  # redraw the strokes too close to their background to tell apart
        stroke[close] = torch.randint(0, 256, (int(close.sum()), 3, 1, 1), generator=generator)
        close = (stroke - background).abs().amax(dim=(1, 2, 3)) < 128
    alpha = ink.float() / 255
    return (background + alpha * (stroke - background)).round().clamp(0, 255).to(torch.uint8)


def make(images, labels, size=28, colour=False, seed=0):
    """MNIST digits (N, 1, 28, 28) uint8 -> (N, C, size, size) uint8: padded with background to
    size, coloured if asked."""
    pad = (size - images.shape[-1]) // 2
    images = torch.nn.functional.pad(images, (pad, size - 28 - pad, pad, size - 28 - pad))
    if colour:
        generator = torch.Generator().manual_seed(seed)
        images = torch.cat([coloured(images[i:i + 10000], generator) for i in range(0, len(images), 10000)])
    return images, labels


def write(images, labels, out):
    """(N, C, S, S) uint8 and labels (N,) (or None) -> an .npz, or a folder of PNGs (in one
    subfolder per label when labelled)."""
    from PIL import Image
    if out.endswith(".npz"):
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        arrays = {"arr_0": images.permute(0, 2, 3, 1).numpy()}
        if labels is not None:
            arrays["labels"] = labels.numpy()
        np.savez(out, **arrays)
        return
    for i, image in enumerate(tqdm(images, desc=f"writing {out}", leave=False)):
        folder = out if labels is None else os.path.join(out, str(int(labels[i])))
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(data.shown(image.permute(1, 2, 0).numpy())).save(os.path.join(folder, f"{i:05d}.png"))


def main(argv=None):
    parser = runs.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="an .npz path, or a folder")
    parser.add_argument("--colour", action="store_true", help="coloured strokes on coloured backgrounds (RGB)")
    parser.add_argument("--size", type=runs.positive_int, default=28, help="pad the 28 x 28 digits to S x S")
    parser.add_argument("--count", type=runs.positive_int, default=60000, help="the first N training digits")
    parser.add_argument("--unlabelled", action="store_true", help="no labels (a folder: no class subfolders)")
    parser.add_argument("--data-root", default=config.config["data"]["root"], help="where MNIST is")
    parser.add_argument("--seed", type=int, default=0, help="seeds the colours")
    args = parser.parse_args(argv)
    if args.size < 28:
        raise config.UserError(f"--size must be at least 28, got {args.size}")
    images, labels, _ = data.load_data({"name": "mnist", "root": args.data_root, "image_size": 28})
    images, labels = make(images[:args.count], labels[:args.count], args.size, args.colour, args.seed)
    write(images, None if args.unlabelled else labels, args.out)
    print(f"wrote {len(images)} images {tuple(images.shape[1:])}{'' if args.unlabelled else ' with labels'} to {args.out}")


if __name__ == "__main__":
    runs.run(main)
