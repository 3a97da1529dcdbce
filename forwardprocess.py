"""Visualise the forward process on a real MNIST digit, or an image of other data (report §3):
the step-by-step Markov chain (DDPM eq. 2), closed-form snapshots of q(x_t | x_0) (eq. 4), and
how close x_T gets to N(0, I).

    python forwardprocess.py [--preset P] [--data NAME_OR_PATH] [--data-root DIR] [--out DIR] [--seed S]
"""
import os

import numpy as np
import torch

import config
import data
import helper
import runs
from helper import Schedule


def parse_args(argv=None):
    parser = runs.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="paper", help="whose schedule to show (default: paper)")
    parser.add_argument("--data", default="mnist", help="the images, as main.py --data (default: mnist)")
    parser.add_argument("--data-root", help="where torchvision datasets are (default: config data.root)")
    parser.add_argument("--out", default="out", help="output directory (default: out)")
    parser.add_argument("--seed", type=int, default=42, help="picks the digit and the noise")
    return parser.parse_args(argv)


def markov_chain(x_0, sched, generator):
    """x_0, x_1, ..., x_T by T applications of q(x_t | x_{t-1}). x_0: (B, C, H, W) -> (B, T+1, C, H, W)."""
    xs = [x_0]
    for t in range(sched.T):
        eps = torch.randn(x_0.shape, generator=generator)
        xs.append(helper.q_sample_step(xs[-1], torch.full((x_0.shape[0],), t), eps, sched))
    return torch.stack(xs, 1)


def main(argv=None):
    args = parse_args(argv)
    cfg = config.get_config(args.preset)
    name = data.data_name(args.data)
    root = args.data_root or cfg["data"]["root"]
    size = data.read_data(name, root, True).images[0].shape[-1]  # the first image's size: any other is resized
    images, _, _ = data.load_data({"name": name, "root": root, "image_size": size}, train=True)  # (N, C, S, S) uint8
    sched = Schedule.from_config(cfg["diffusion"])
    T = sched.T
    generator = torch.Generator().manual_seed(args.seed)
    index = torch.randint(len(images), (1,), generator=generator).item()
    x_0 = data.to_model_range(images[index:index + 1])  # (1, C, S, S)
    os.makedirs(args.out, exist_ok=True)

    # (a) the Markov chain, step by step; at most ~25 evenly spaced columns when T is large
    chain = markov_chain(x_0, sched, generator)[0]  # (T+1, C, S, S)
    shown = np.unique(np.linspace(0, T, min(T + 1, 26)).round().astype(int))
    data.save_rows(data.to_uint8(chain[shown][None]).numpy(), os.path.join(args.out, "forward_chain.png"), None,
                   [f"t={t}" for t in shown],
                   f"Markov chain q(x_t | x_(t-1)), digit #{index}, {cfg['diffusion']['schedule']} schedule, T={T}")

    # (b) closed-form jumps straight from x_0 to x_t
    snapshots = sorted({1, T // 10, T // 4, T // 2, 3 * T // 4, T} - {0})
    t_index = torch.tensor(snapshots) - 1  # paper t -> code index
    x_t = helper.q_sample(x_0.expand(len(snapshots), -1, -1, -1), t_index,
                          torch.randn((len(snapshots), *x_0.shape[1:]), generator=generator), sched)
    data.save_rows(data.to_uint8(torch.cat([x_0, x_t])[None]).numpy(), os.path.join(args.out, "forward_closed_form.png"),
                   None, ["x_0"] + [f"t={t}\nab={sched.alpha_bars[t - 1]:.3f}" for t in snapshots],
                   "closed form q(x_t | x_0)")

    # how far x_T is from N(0, I), the distribution sampling starts from
    batch = data.to_model_range(images[torch.randperm(len(images), generator=generator)[:1000]])  # (1000, C, S, S)
    x_T = helper.q_sample(batch, torch.full((len(batch),), T - 1), torch.randn(batch.shape, generator=generator), sched)
    alpha_bar_T = sched.alpha_bars[-1].item()
    print(f"alpha_bar_T = {alpha_bar_T:.4g}; sqrt(alpha_bar_T) = {alpha_bar_T ** 0.5:.4g} of x_0 survives in x_T")
    print(f"x_T over {len(batch)} images: mean {x_T.mean():+.4f}, variance {x_T.var():.4f}   "
          f"(N(0, I): mean +0.0000, variance 1.0000)")
    print(f"wrote forward_chain.png and forward_closed_form.png to {args.out}")


if __name__ == "__main__":
    runs.run(main)
