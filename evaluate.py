"""Score generated digits against the MNIST test set in the features of a small MNIST
classifier: FID, improved precision and recall (k = 3), predicted-class histogram and the
share of confidently classified samples, beside the MNIST train-vs-test floor.

    python evaluate.py CHECKPOINT_OR_NPZ [--sampler S] [--steps N] [--eta E] [--num-samples N] [--seed S]
                       [--guidance W[,W...]] [--guidance-interval LO HI] [--labels train|uniform]
                       [--ema DECAY] [--no-compile]
                       [--data-root DIR] [--json PATH]
    python evaluate.py CHECKPOINT --sweep      # every sampler at several step counts
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import helper
import runs
from helper import UserError
from loadmodel import ETA_HELP, INTERVAL_HELP, load_ema_model, output_folder, with_sampling_flags

# (sampler, network evaluations); 0: the full chain of T steps
SWEEP = [("ddim", 10), ("ddim", 20), ("ddim", 50), ("ddim", 100), ("dpm++", 10), ("dpm++", 20), ("dpm++", 50),
         ("heun", 10), ("heun", 20), ("ddpm", 20), ("ddpm", 50), ("ddpm", 100), ("ddpm", 0)]
CONFIDENT = 0.9  # a sample is "confident" when the classifier's top softmax probability exceeds this


class Classifier(nn.Module):
    """Three conv layers and two linear ones; features() is the 128-d penultimate layer.
    (B, 1, 28, 28) in [-1, 1] -> logits (B, 10)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # (B, 32, 14, 14)
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 64, 7, 7)
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Flatten(),      # (B, 64 * 7 * 7)
            nn.Linear(64 * 7 * 7, 128), nn.ReLU())                          # (B, 128)
        self.head = nn.Linear(128, 10)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


def train_classifier(images, labels, epochs=3, batch_size=128, seed=0, progress=True):
    """Adam with a one-cycle learning rate on uint8 digits (N, 28, 28) and labels (N,)."""
    torch.manual_seed(seed)
    classifier = Classifier()
    steps = epochs * (len(images) // batch_size)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(total=steps, desc="classifier", disable=not progress, leave=False)
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images) - batch_size + 1, batch_size):
            batch = order[start:start + batch_size]
            loss = nn.functional.cross_entropy(classifier(runs.to_model_range(images[batch], 28)), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    return classifier.eval()


@torch.no_grad()
def classify(classifier, digits, batch_size=1000):
    """uint8 digits (N, 28, 28, 1) -> penultimate features (N, 128) float64 and softmax (N, 10)."""
    features, probs = [], []
    for start in range(0, len(digits), batch_size):
        x = runs.to_model_range(torch.as_tensor(digits[start:start + batch_size]).squeeze(-1), 28)
        h = classifier.features(x)
        features.append(h.double())
        probs.append(classifier.head(h).softmax(-1))
    return torch.cat(features), torch.cat(probs)


def mnist_digits(root, train):
    """MNIST images as uint8 (N, 28, 28, 1) and labels (N,)."""
    images, labels = runs.load_mnist(root, train)
    return images.unsqueeze(-1).numpy(), labels


def load_or_train_classifier(path, root):
    """The cached classifier at `path`, trained on MNIST train (and its test accuracy) if absent."""
    if os.path.isfile(path):
        state = torch.load(path, map_location="cpu", weights_only=True)
        classifier = Classifier()
        classifier.load_state_dict(state["model"])
        return classifier.eval(), state["test_accuracy"]
    print(f"training the MNIST feature classifier (cached to {path})")
    train_images, train_labels = mnist_digits(root, train=True)
    classifier = train_classifier(torch.as_tensor(train_images).squeeze(-1), train_labels)
    test_images, test_labels = mnist_digits(root, train=False)
    _, probs = classify(classifier, test_images)
    accuracy = (probs.argmax(-1) == test_labels).double().mean().item()
    runs.save_checkpoint({"model": classifier.state_dict(), "test_accuracy": accuracy}, path)
    return classifier, accuracy


def frechet_distance(features_a, features_b):
    """FID (Heusel et al. 2017): |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), with
    Tr (S_a S_b)^(1/2) = sum of sqrt(eigenvalues of S_a^(1/2) S_b S_a^(1/2)). Features (N, D), float64."""
    mu_a, mu_b = features_a.mean(0), features_b.mean(0)
    cov_a, cov_b = torch.cov(features_a.T), torch.cov(features_b.T)  # (D, D)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov_a)
    sqrt_a = eigenvectors @ torch.diag(eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T
    trace_sqrt = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0).sqrt().sum()
    return ((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt).item()


def kth_neighbour_radii(features, k, chunk=2000):
    """Distance from each row to its k-th nearest other row. (N, D) -> (N,)"""
    radii = [torch.cdist(features[i:i + chunk], features).kthvalue(k + 1, dim=1).values  # +1: itself
             for i in range(0, len(features), chunk)]
    return torch.cat(radii)


def covered(queries, support, radii, chunk=2000):
    """For each query, whether it lies within radii[j] of some support point j. (N,) bool"""
    return torch.cat([(torch.cdist(queries[i:i + chunk], support) <= radii[None, :]).any(1)
                      for i in range(0, len(queries), chunk)])


def precision_recall(real, fake, k=3):
    """Improved precision and recall (Kynkäänniemi et al. 2019): the share of fake samples inside
    the k-NN balls of the real set, and of real samples inside those of the fake set."""
    precision = covered(fake, real, kth_neighbour_radii(real, k)).double().mean().item()
    recall = covered(real, fake, kth_neighbour_radii(fake, k)).double().mean().item()
    return precision, recall


def digit_mix(how, train_labels, n):
    """The digit each of n samples of a conditional model asks for, (n,) int64 in digit order:
    each digit in its share p(y) of the training labels ("train"), so that the samples are draws
    of p(x) = sum_y p(y) p(x | y) as the test set's digits are, or a tenth of each ("uniform",
    which costs real digits about 0.7 FID at n = 10,000). Largest remainders round up."""
    weights = torch.ones(10, dtype=torch.long) if how == "uniform" else \
        torch.bincount(torch.as_tensor(train_labels), minlength=10)
    counts, remainders = n * weights // weights.sum(), n * weights % weights.sum()
    counts[torch.argsort(remainders, descending=True, stable=True)[:n - counts.sum()]] += 1
    return torch.arange(10).repeat_interleave(counts)


def score(classifier, digits, reference, labels=None, seed=0):
    """Every metric of uint8 digits (N, 28, 28, 1) against reference features (M, 128); with the
    requested labels (N,), also the share the classifier assigns to the requested digit."""
    features, probs = classify(classifier, digits)
    subset = torch.randperm(len(reference), generator=torch.Generator().manual_seed(seed))[:len(digits)]
    precision, recall = precision_recall(reference[subset], features)
    histogram = torch.bincount(probs.argmax(-1), minlength=10) / len(digits)
    metrics = {"fid": frechet_distance(features, reference), "precision": precision, "recall": recall,
               "confident": (probs.max(-1).values > CONFIDENT).double().mean().item(),
               "classes": [round(p, 4) for p in histogram.tolist()]}
    if labels is not None:
        metrics["accuracy"] = (probs.argmax(-1) == torch.as_tensor(labels)).double().mean().item()
    return metrics


def read_npz(path):
    """uint8 digits (N, 28, 28, 1) from an .npz with key arr_0, as loadmodel.py writes them, and
    the requested digits (N,) int64 from its key labels, or None where there is none."""
    if not os.path.isfile(path):
        raise UserError(f"'{path}' does not exist")
    try:
        with np.load(path) as archive:
            if "arr_0" not in archive:
                raise UserError(f"'{path}' has no array arr_0 (keys: {', '.join(archive.files)})")
            digits = archive["arr_0"]
            labels = archive["labels"] if "labels" in archive else None
    except (OSError, ValueError) as error:
        raise UserError(f"'{path}' is not a readable .npz ({type(error).__name__})") from None
    if digits.dtype != np.uint8 or digits.ndim != 4 or digits.shape[1:] != (28, 28, 1) or len(digits) < 2:
        raise UserError(f"'{path}' arr_0 must be uint8 of shape (N >= 2, 28, 28, 1), "
                        f"got {digits.dtype} {digits.shape}")
    if labels is not None and (labels.dtype != np.int64 or labels.shape != (len(digits),)
                               or labels.min() < 0 or labels.max() > 9):
        raise UserError(f"'{path}' labels must be int64 digits 0-9 of shape ({len(digits)},), "
                        f"got {labels.dtype} {labels.shape}")
    return digits, labels


def generate(model, cfg, sampler, steps, num_samples, seed, device, labels=None):
    """Sample num_samples digits with the given sampler (guided towards `labels` (N,) for a
    conditional model); returns uint8 (N, 28, 28, 1) and seconds."""
    cfg = helper.with_sampling(cfg, sampler=sampler, steps=steps)
    start = time.perf_counter()
    digits, _ = runs.sample_digits(model, cfg, num_samples, seed, device, labels, desc=f"{sampler}-{steps or 'T'}")
    return digits, time.perf_counter() - start


def warm_up(model, cfg, guidances, n, seed, device, labels=None):
    """Compile the sampling network before the timed rows, once for each batch shape they call
    it with: B = min(n, SAMPLE_BATCH) images for an unguided call (an unconditional model, w = 0
    or 1, and the steps outside a guidance interval), 2B for a guided one (w not 0 or 1: the
    requested and the null labels in one pass). A last batch smaller than B compiles when it comes."""
    start, batch = time.perf_counter(), min(n, runs.SAMPLE_BATCH)
    weight_of_call = {}  # network batch -> a guidance weight whose calls have that batch
    for w in (cfg["sampling"]["guidance"] if w is None else w for w in guidances):
        weight_of_call[2 * batch if labels is not None and w not in (0, 1) else batch] = w
    if cfg["sampling"]["guidance_interval"]:
        weight_of_call[batch] = 1.0
    for w in weight_of_call.values():
        warm = helper.with_sampling(cfg, guidance=w, guidance_interval=[])
        generate(model, warm, "ddim", 1, batch, seed, device, None if labels is None else labels[:batch])
    print(f"compiled the sampling network for network batches of {' and '.join(map(str, sorted(weight_of_call)))} "
          f"in {time.perf_counter() - start:.0f} s")


def markdown_table(rows):
    lines = ["| samples | NFE | FID | precision | recall | confident | requested digit | s / 1000 samples |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        seconds = f"{row['seconds_per_1000']:.1f}" if row.get("seconds_per_1000") else "-"
        accuracy = f"{row['accuracy']:.4f}" if "accuracy" in row else "-"
        lines.append(f"| {row['name']} | {row.get('nfe', '-')} | {row['fid']:.3f} | {row['precision']:.3f} | "
                     f"{row['recall']:.3f} | {row['confident']:.3f} | {accuracy} | {seconds} |")
    return "\n".join(lines)


def plot_fid_vs_nfe(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for sampler in dict.fromkeys(row["sampler"] for row in rows if "sampler" in row):
        points = [row for row in rows if row.get("sampler") == sampler]
        ax.plot([r["nfe"] for r in points], [r["fid"] for r in points], "o-", label=sampler)
        for r in points:
            ax.annotate(f"{r['seconds_per_1000']:.0f}s", (r["nfe"], r["fid"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    floor = next(row for row in rows if row["name"].startswith("MNIST train"))
    ax.axhline(floor["fid"], color="0.5", ls="--", label="MNIST train vs test")
    ax.set_xscale("log")
    ax.set_xlabel("network evaluations (NFE); labels: seconds per 1000 samples")
    ax.set_ylabel("FID (classifier features)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def guidance_list(text):
    try:
        values = [float(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers, got {text!r}") from None
    if any(w < 0 for w in values):
        raise argparse.ArgumentTypeError(f"guidance must not be negative, got {text!r}")
    return values


def plot_guidance(rows, path):
    """FID and requested-digit accuracy against the guidance weight w."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    points = [row for row in rows if "guidance" in row]
    w = [row["guidance"] for row in points]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(w, [row["fid"] for row in points], "o-", color="C0", label="FID")
    floor = next(row for row in rows if row["name"].startswith("MNIST train"))
    ax.axhline(floor["fid"], color="0.5", ls="--", label="MNIST train vs test FID")
    ax.set_xlabel("guidance w (0: unconditional, 1: conditional)")
    ax.set_ylabel("FID (classifier features)", color="C0")
    ax.legend(loc="upper center")
    acc_ax = ax.twinx()
    acc_ax.plot(w, [row["accuracy"] for row in points], "s-", color="C1")
    acc_ax.plot(w, [row["precision"] for row in points], "^:", color="C2")
    acc_ax.set_ylabel("requested-digit accuracy (orange), precision (green)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    parser = runs.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("input", help="a checkpoint from main.py, or an .npz of uint8 digits (key arr_0)")
    parser.add_argument("--sampler", choices=helper.SAMPLERS, help="default: the checkpoint's")
    parser.add_argument("--steps", type=runs.positive_int, help="sampler steps (default: the checkpoint's)")
    parser.add_argument("--eta", type=float, help=ETA_HELP)
    parser.add_argument("--spacing", choices=helper.SPACINGS,
                        help="which levels a sampler of fewer than T steps keeps (default: the checkpoint's)")
    parser.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"), help=INTERVAL_HELP)
    parser.add_argument("--ema", type=float, metavar="DECAY",
                        help="score the EMA of this decay, one of training.extra_ema_decays (default: ema_decay's)")
    parser.add_argument("--num-samples", type=runs.positive_int, default=10000, help="samples to score")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sweep", action="store_true", help="score every sampler at several step counts")
    parser.add_argument("--guidance", type=guidance_list,
                        help="conditional checkpoints: guidance weights w to score, comma-separated, e.g. "
                             "0,1,2 (default: the checkpoint's)")
    parser.add_argument("--labels", choices=("train", "uniform"),
                        help="conditional checkpoints: ask for each digit in its share of the training set "
                             "(default), or for a tenth of each")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="sample with the compiled network (sampling.compile; default: on, since "
                             "thousands of network evaluations repay its compilation)")
    parser.add_argument("--data-root", default=helper.config["data"]["root"], help="torchvision MNIST root")
    parser.add_argument("--classifier", default=os.path.join("out", "mnist_classifier.pt"),
                        help="cached feature classifier, trained here if absent")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", help="where eval.md (and fid_vs_nfe.png) go (default: beside the input)")
    parser.add_argument("--json", help="also write the numbers as JSON here")
    return parser.parse_args(argv)


def main(argv=None):
    command = " ".join(["python evaluate.py", *(sys.argv[1:] if argv is None else argv)])
    args = parse_args(argv)
    is_npz = args.input.endswith(".npz")
    if is_npz and (args.sweep or args.sampler or args.steps or args.guidance or args.eta is not None
                   or args.spacing or args.guidance_interval or args.ema is not None or args.labels):
        raise UserError("--sweep, --sampler, --steps, --eta, --spacing, --ema, --labels and --guidance(-interval) "
                        "need a checkpoint, not an .npz")
    digits, labels = read_npz(args.input) if is_npz else (None, None)
    device = runs.resolve_device(args.device)
    model, cfg = (None, None) if is_npz else load_ema_model(args.input, device, args.ema)
    if args.labels and not cfg["model"]["num_classes"]:
        raise UserError("--labels needs a conditional checkpoint (python main.py --conditional); this one is not")
    guidances = args.guidance or [None]
    if not is_npz:
        cfg = with_sampling_flags(cfg, guidances[0], args.guidance_interval, compile=args.compile, eta=args.eta,
                                  spacing=args.spacing)
    classifier, accuracy = load_or_train_classifier(args.classifier, args.data_root)
    print(f"feature classifier: {accuracy:.2%} MNIST test accuracy")
    test_digits, _ = mnist_digits(args.data_root, train=False)
    reference, _ = classify(classifier, test_digits)
    train_digits, train_labels = mnist_digits(args.data_root, train=True)
    if not is_npz and cfg["model"]["num_classes"]:
        labels = digit_mix(args.labels or "train", train_labels, args.num_samples)
    n = len(digits) if is_npz else args.num_samples
    pick = torch.randperm(len(train_digits), generator=torch.Generator().manual_seed(args.seed))[:min(n, 10000)]
    rows = [{"name": f"MNIST train ({len(pick)}) vs test", **score(classifier, train_digits[pick.numpy()], reference)}]

    if is_npz:
        rows.append({"name": os.path.basename(args.input), **score(classifier, digits, reference, labels)})
    else:
        settings = SWEEP if args.sweep else [(args.sampler or cfg["sampling"]["sampler"],
                                          cfg["sampling"]["steps"] if args.steps is None else args.steps)]
        if cfg["sampling"]["compile"]:
            warm_up(model, cfg, guidances, n, args.seed, device, labels)
        for sampler, steps in settings:
            for w in guidances:
                row_cfg = cfg if w is None else helper.with_sampling(cfg, guidance=w)
                samples, seconds = generate(model, row_cfg, sampler, steps, n, args.seed, device, labels)
                nfe = helper.sampler_evaluations(sampler, helper.sampler_stops(sampler, steps or cfg["diffusion"]["T"]))
                row = {"name": f"{sampler}, {nfe} steps", "sampler": sampler, "nfe": nfe,
                       "seconds_per_1000": 1000 * seconds / n}
                if args.ema is not None:
                    row["ema"] = args.ema
                    row["name"] += f", EMA {args.ema:g}"
                if sampler != "ddpm" and cfg["sampling"]["eta"] > 0:
                    row["eta"] = cfg["sampling"]["eta"]
                    row["name"] += f", eta = {row['eta']:g}"
                if cfg["sampling"]["spacing"] != helper.config["sampling"]["spacing"]:
                    row["spacing"] = cfg["sampling"]["spacing"]
                    row["name"] += f", {row['spacing']} spacing"
                if labels is not None:
                    row["guidance"] = row_cfg["sampling"]["guidance"]
                    row["name"] += f", w = {row['guidance']:g}"
                    if row_cfg["sampling"]["guidance_interval"]:
                        row["guidance_interval"] = lo, hi = row_cfg["sampling"]["guidance_interval"]
                        row["name"] += f" for sigma in ({lo:g}, {hi:g}]"
                    if args.labels == "uniform":
                        row["labels"] = "uniform"
                        row["name"] += ", N/10 of each digit"
                rows.append({**row, **score(classifier, samples, reference, labels)})
                print(markdown_table(rows[-1:]).splitlines()[-1], flush=True)

    table = markdown_table(rows)
    print(table)
    out = output_folder(args.out, args.input)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "eval.md"), "w") as f:
        f.write(f"`{command}` with N = {n}, classifier test accuracy {accuracy:.2%}\n\n{table}\n")
    if args.sweep:
        plot_fid_vs_nfe(rows, os.path.join(out, "fid_vs_nfe.png"))
    if len(guidances) > 1:
        plot_guidance(rows, os.path.join(out, "guidance.png"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"classifier_test_accuracy": accuracy, "num_samples": n, "rows": rows}, f, indent=1)
    print(f"wrote {os.path.join(out, 'eval.md')}")


if __name__ == "__main__":
    runs.run(main)
