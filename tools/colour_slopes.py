"""How much of a held-out image's background colour the network recovers at each noise level.

    python tools/colour_slopes.py CHECKPOINT [--num-images N]

At x_t of N held-out images of colour data, the background colour of the network's x̂_0 (the
mean over the border, the outer eighth of the side, where the strokes never reach) against the
image's own (its border median), per channel: the least-squares slope, averaged over channels.
1 recovers it all, 0 none. Beside it the slope that the border alone allows: with n border
pixels, colours of spread s and noise sigma = sqrt((1 - a) / a), the best linear estimate from
the border's mean recovers n s^2 / (n s^2 + sigma^2) of the colour. A network that sees the whole
image can do better than that; one below it has not learnt the level (docs/own-data.md).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import config  # noqa: E402
import data  # noqa: E402
import evaluate  # noqa: E402
import helper  # noqa: E402
import runs  # noqa: E402

LEVELS = (0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.92, 0.9, 0.85, 0.8, 0.7, 0.5)  # t / (T - 1)


@torch.no_grad()
def colour_slopes(model, cfg, images, labels, seed=0, batch_size=250):
    """Rows (t, SNR_t, the network's slope, the border's best slope) for uint8 images (N, 3, S, S)."""
    sched = helper.Schedule.from_config(cfg["diffusion"])
    x_0 = data.to_model_range(images)
    true = evaluate.backgrounds(images.movedim(1, -1).numpy()) / 127.5 - 1  # (N, 3) in [-1, 1]
    border = evaluate.border(x_0.shape[-1])
    spread2 = true.var(0).mean().item()
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for step in sorted({round(level * (sched.T - 1)) for level in LEVELS}, reverse=True):
        t = torch.full((len(x_0),), step, dtype=torch.long)
        x_t = helper.q_sample(x_0, t, torch.randn(x_0.shape, generator=generator), sched)
        outputs = [model(x_t[i:i + batch_size], t[i:i + batch_size], *([] if labels is None else
                                                                        [labels[i:i + batch_size]])).float()
                   for i in range(0, len(x_0), batch_size)]
        x_0_hat, _ = helper.predict_x0_eps(torch.cat(outputs), x_t, t, sched, cfg["diffusion"]["prediction"])
        estimate = x_0_hat[:, :, border].mean(-1)  # (N, 3)
        a, b = true - true.mean(0), estimate - estimate.mean(0)
        snr = sched.snr()[t[0]].item()
        best = int(border.sum()) * spread2 * snr / (int(border.sum()) * spread2 * snr + 1)
        rows.append((int(t[0]), snr, ((a * b).sum(0) / (a * a).sum(0)).mean().item(), best))
    return rows


def main(argv=None):
    parser = runs.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--num-images", type=runs.positive_int, default=1000)
    args = parser.parse_args(argv)
    model, cfg = runs.load_ema_model(args.checkpoint, "cpu")
    if cfg["data"]["channels"] != 3:
        raise config.UserError(f"'{args.checkpoint}' was trained on greyscale images: it has no colours to recover")
    images, labels, _ = data.load_data(cfg["data"], train=False)
    labels = labels[:args.num_images] if labels is not None and cfg["model"]["num_classes"] else None
    print("| t | SNR | network's slope | the border's best |\n|---:|---:|---:|---:|")
    for t, snr, slope, best in colour_slopes(model, cfg, images[:args.num_images], labels):
        print(f"| {t} | {snr:.2e} | {slope:.3f} | {best:.3f} |")


if __name__ == "__main__":
    runs.run(main)
