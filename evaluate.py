"""Score generated images against the held-out split of their data (the MNIST test set by
default) in the features of a small classifier trained on the training split: FID, improved
precision and recall (k = 3), predicted-class histogram and the share of confidently classified
samples, beside the train-vs-held-out floor. Unlabelled data gets a classifier of the images'
rotation instead (Gidaris et al. 2018), which gives FID, precision and recall but no classes.

    python evaluate.py CHECKPOINT_OR_NPZ [--sampler S] [--steps N] [--eta E] [--num-samples N] [--seed S]
                       [--guidance W[,W...]] [--guidance-interval LO HI] [--labels train|uniform]
                       [--ema DECAY] [--no-compile]
                       [--data NAME_OR_PATH] [--data-root DIR] [--json PATH]
    python evaluate.py CHECKPOINT --sweep      # every sampler at several step counts
"""
import argparse
import hashlib
import json
import os
import sys
import time

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import config
import data
import runs
from config import UserError

# (sampler, network evaluations); 0: the full chain of T steps
SWEEP = [("ddim", 10), ("ddim", 20), ("ddim", 50), ("ddim", 100), ("dpm++", 10), ("dpm++", 20), ("dpm++", 50),
         ("heun", 10), ("heun", 20), ("ddpm", 20), ("ddpm", 50), ("ddpm", 100), ("ddpm", 0)]
CONFIDENT = 0.9  # a sample is "confident" when the classifier's top softmax probability exceeds this


class Classifier(nn.Module):
    """Three conv layers and two linear ones; features() is the 128-d penultimate layer.
    (B, C, S, S) in [-1, 1] -> logits (B, classes); MNIST: (B, 1, 28, 28) -> (B, 10)."""

    def __init__(self, channels=1, classes=10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 32, S/2, S/2)
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),        # (B, 64, S/4, S/4)
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.Sequential(nn.AdaptiveAvgPool2d(7), nn.Flatten()),               # (B, 64 * 7 * 7); 28: as is
            nn.Linear(64 * 7 * 7, 128), nn.ReLU())                               # (B, 128)
        self.head = nn.Linear(128, classes)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


def train_classifier(images, labels, classes=10, epochs=3, batch_size=128, seed=0, progress=True):
    """Adam with a one-cycle learning rate on uint8 images (N, C, S, S) and labels (N,) in 0..classes-1."""
    torch.manual_seed(seed)
    classifier = Classifier(images.shape[1], classes)
    steps = epochs * (len(images) // batch_size)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(total=steps, desc="classifier", disable=not progress, leave=False)
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images) - batch_size + 1, batch_size):
            batch = order[start:start + batch_size]
            loss = nn.functional.cross_entropy(classifier(data.to_model_range(images[batch])), labels[batch])
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
    """uint8 images (N, S, S, C) -> penultimate features (N, 128) float64 and softmax (N, classes)."""
    features, probs = [], []
    for start in range(0, len(digits), batch_size):
        x = data.to_model_range(torch.as_tensor(digits[start:start + batch_size]).movedim(-1, 1))
        h = classifier.features(x)
        features.append(h.double())
        probs.append(classifier.head(h).softmax(-1))
    return torch.cat(features), torch.cat(probs)


def data_images(data_cfg, train):
    """The images of cfg["data"] as uint8 (N, S, S, C) (the .npz layout) and their labels (N,),
    None when unlabelled."""
    images, labels, _ = data.load_data(data_cfg, train)
    return images.movedim(1, -1).numpy(), labels


def rotations(images):
    """Unlabelled data's stand-in task: image i turned by (i mod 4) quarter turns, labelled i mod 4.
    uint8 (N, S, S, C) -> the same, and labels (N,)."""
    turns = torch.arange(len(images)) % 4
    turned = np.stack([np.rot90(image, k).copy() for image, k in zip(images, turns.tolist())])
    return turned, turns


def classifier_path(data_cfg):
    """Where the feature classifier of this data is cached: out/mnist_classifier.pt for MNIST."""
    name = data_cfg["name"]
    if name not in data.DATASETS:
        digest = hashlib.sha1(os.path.abspath(name).encode()).hexdigest()[:8]
        name = f"{os.path.basename(os.path.normpath(name)).removesuffix('.npz')}-{digest}"
    size = "" if data_cfg["image_size"] == 28 else f"-{data_cfg['image_size']}px"
    return os.path.join("out", f"{name}{size}_classifier.pt")


def load_or_train_classifier(path, data_cfg):
    """The cached classifier at `path`, trained on the data's training split (and its held-out
    accuracy) if absent; of the rotation task for unlabelled data. Returns it, the accuracy and
    whether it classifies the data's own classes."""
    split = data.read_data(data_cfg["name"], data_cfg["root"], True)
    labelled, classes = split.labels is not None, len(split.classes) if split.labels is not None else 4
    if os.path.isfile(path):
        state = torch.load(path, map_location="cpu", weights_only=True)
        classifier = Classifier(data_cfg["channels"], classes)
        try:
            classifier.load_state_dict(state["model"])
        except RuntimeError:
            raise UserError(f"the classifier '{path}' was trained on other data (channels or classes differ); "
                            f"delete it, or pass --classifier PATH") from None
        return classifier.eval(), state["test_accuracy"], labelled
    print(f"training the feature classifier of {data_cfg['name']} (cached to {path})")
    (train_images, train_labels), (test_images, test_labels) = (data_images(data_cfg, train) for train in (True, False))
    if not labelled:
        (train_images, train_labels), (test_images, test_labels) = rotations(train_images), rotations(test_images)
    classifier = train_classifier(torch.as_tensor(train_images).movedim(-1, 1), train_labels, classes)
    _, probs = classify(classifier, test_images)
    accuracy = (probs.argmax(-1) == test_labels).double().mean().item()
    runs.save_checkpoint({"model": classifier.state_dict(), "test_accuracy": accuracy}, path)
    return classifier, accuracy, labelled


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


def digit_mix(how, train_labels, n, classes=10):
    """The class each of n samples of a conditional model asks for, (n,) int64 in class order:
    each class in its share p(y) of the training labels ("train"), so that the samples are draws
    of p(x) = sum_y p(y) p(x | y) as the held-out images are, or an equal share of each
    ("uniform", which raises the FID of real MNIST digits, docs/quality.md). Largest remainders
    round up."""
    weights = torch.ones(classes, dtype=torch.long) if how == "uniform" else \
        torch.bincount(torch.as_tensor(train_labels), minlength=classes)
    counts, remainders = n * weights // weights.sum(), n * weights % weights.sum()
    counts[torch.argsort(remainders, descending=True, stable=True)[:n - counts.sum()]] += 1
    return torch.arange(classes).repeat_interleave(counts)


def border(size):
    """(S, S) bool: the outer eighth of an S x S image's side, where the data's strokes never reach
    (MNIST's digits keep 4 of 28 pixels clear)."""
    ring = max(1, size // 8)
    mask = torch.ones(size, size, dtype=torch.bool)
    mask[ring:-ring, ring:-ring] = False
    return mask


def backgrounds(images):
    """Each image's background colour: the per-channel median of its border.
    uint8 (N, S, S, C) -> float (N, C) in 0..255."""
    x = torch.as_tensor(images).float()
    return x[:, border(x.shape[1])].median(dim=1).values


def score(classifier, digits, reference, labels=None, seed=0, classes=True):
    """Every metric of uint8 images (N, S, S, C) against reference features (M, 128); with the
    requested labels (N,), also the share the classifier assigns to the requested class. Without
    `classes` (a classifier of rotations), FID, precision and recall alone. Colour images also
    get the mean and spread over images of their background colour, per channel."""
    features, probs = classify(classifier, digits)
    subset = torch.randperm(len(reference), generator=torch.Generator().manual_seed(seed))[:len(digits)]
    precision, recall = precision_recall(reference[subset], features)
    metrics = {"fid": frechet_distance(features, reference), "precision": precision, "recall": recall}
    if digits.shape[-1] == 3:
        colours = backgrounds(digits)
        metrics.update(background_mean=[round(v, 1) for v in colours.mean(0).tolist()],
                       background_std=[round(v, 1) for v in colours.std(0).tolist()])
    if not classes:
        return metrics
    histogram = torch.bincount(probs.argmax(-1), minlength=probs.shape[-1]) / len(digits)
    metrics.update(confident=(probs.max(-1).values > CONFIDENT).double().mean().item(),
                   classes=[round(p, 4) for p in histogram.tolist()])
    if labels is not None:
        metrics["accuracy"] = (probs.argmax(-1) == torch.as_tensor(labels)).double().mean().item()
    return metrics


def read_npz(path, name, root):
    """uint8 images (N, S, S, C) from an .npz with key arr_0, as loadmodel.py writes them, the
    requested classes (N,) int64 from its key labels (None where there is none), and the config
    of the data `name` they are scored against: at their size, with their channel count."""
    if not os.path.isfile(path):
        raise UserError(f"'{path}' does not exist")
    images = data.read_npz_images(path)
    channels, size = images.images.shape[1:3]
    data_channels = data.read_data(name, root, True).images[0].shape[0]
    if channels != data_channels or size != images.images.shape[3]:
        raise UserError(f"'{path}' holds {channels}-channel {size}x{images.images.shape[3]} images; '{name}' has "
                        f"{data_channels} channel(s) (--data names the data they are scored against)")
    classes = len(data.read_data(name, root, True).classes)
    if images.labels is not None and images.labels.max() >= classes:
        raise UserError(f"'{path}' labels must be classes 0-{classes - 1} of '{name}', got {int(images.labels.max())}")
    data_cfg = {"name": name, "root": root, "image_size": size, "channels": channels}
    return images.images.movedim(1, -1).numpy(), images.labels, data_cfg


def generate(model, cfg, sampler, steps, num_samples, seed, device, labels=None, guide=None):
    """Sample num_samples digits with the given sampler (guided towards `labels` (N,) for a
    conditional model, by `guide` if given); returns uint8 (N, S, S, C) and seconds."""
    cfg = config.with_sampling(cfg, sampler=sampler, steps=steps)
    start = time.perf_counter()
    digits, _ = runs.sample_digits(model, cfg, num_samples, seed, device, labels, desc=f"{sampler}-{steps or 'T'}",
                                   guide=guide)
    return digits, time.perf_counter() - start


def warm_up(model, cfg, guidances, n, seed, device, labels=None, guide=None):
    """Compile the sampling network (and its guide) before the timed rows, once for each batch
    shape they call it with: B = min(n, SAMPLE_BATCH) images for an unguided call (an unconditional
    model, w = 0 or 1, and the steps outside a guidance interval) and for autoguidance (the network
    and the guide at B each), 2B for classifier-free guidance (w not 0 or 1: the requested and the
    null labels in one pass). A last batch smaller than B compiles when it comes."""
    start, batch = time.perf_counter(), min(n, runs.SAMPLE_BATCH)
    # network batch -> a guidance weight whose calls have that batch (w = 1 calls no guide)
    weight_of_call = {batch: 1.0} if cfg["sampling"]["guidance_interval"] else {}
    for w in (cfg["sampling"]["guidance"] if w is None else w for w in guidances):
        call = 2 * batch if labels is not None and guide is None and w not in (0, 1) else batch
        if weight_of_call.get(call, 1.0) == 1.0:
            weight_of_call[call] = w
    for w in weight_of_call.values():
        warm = config.with_sampling(cfg, guidance=w, guidance_interval=[])
        generate(model, warm, "ddim", 1, batch, seed, device, None if labels is None else labels[:batch], guide)
    print(f"compiled the sampling network for network batches of {' and '.join(map(str, sorted(weight_of_call)))} "
          f"in {time.perf_counter() - start:.0f} s")


def markdown_table(rows):
    colour = any("background_mean" in row for row in rows)
    lines = ["| samples | NFE | FID | precision | recall | confident | requested digit | s / 1000 samples |"
             + (" background RGB mean | background RGB spread |" if colour else ""),
             "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---|---|" if colour else "")]
    for row in rows:
        seconds = f"{row['seconds_per_1000']:.1f}" if row.get("seconds_per_1000") else "-"
        accuracy = f"{row['accuracy']:.4f}" if "accuracy" in row else "-"
        confident = f"{row['confident']:.3f}" if "confident" in row else "-"
        line = (f"| {row['name']} | {row.get('nfe', '-')} | {row['fid']:.3f} | {row['precision']:.3f} | "
                f"{row['recall']:.3f} | {confident} | {accuracy} | {seconds} |")
        if colour:
            line += "".join(f" {' '.join(f'{v:.0f}' for v in row[key])} |" if key in row else " - |"
                            for key in ("background_mean", "background_std"))
        lines.append(line)
    return "\n".join(lines)


def plot_fid_vs_nfe(rows, path):
    plt = data.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for sampler in dict.fromkeys(row["sampler"] for row in rows if "sampler" in row):
        points = [row for row in rows if row.get("sampler") == sampler]
        ax.plot([r["nfe"] for r in points], [r["fid"] for r in points], "o-", label=sampler)
        for r in points:
            ax.annotate(f"{r['seconds_per_1000']:.0f}s", (r["nfe"], r["fid"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    floor = rows[0]
    ax.axhline(floor["fid"], color="0.5", ls="--", label=floor["name"])
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
    plt = data.pyplot()
    points = [row for row in rows if "guidance" in row]
    w = [row["guidance"] for row in points]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(w, [row["fid"] for row in points], "o-", color="C0", label="FID")
    floor = rows[0]
    ax.axhline(floor["fid"], color="0.5", ls="--", label=f"{floor['name']} FID")
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
    parser.add_argument("--sampler", choices=config.SAMPLERS, help="default: the checkpoint's")
    parser.add_argument("--steps", type=runs.positive_int, help="sampler steps (default: the checkpoint's)")
    parser.add_argument("--eta", type=float, help=runs.ETA_HELP)
    parser.add_argument("--spacing", choices=config.SPACINGS,
                        help="which levels a sampler of fewer than T steps keeps (default: the checkpoint's)")
    parser.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"), help=runs.INTERVAL_HELP)
    parser.add_argument("--guide", help=runs.GUIDE_HELP)
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
    parser.add_argument("--data", default="mnist",
                        help="an .npz input's data, as main.py --data (a checkpoint knows its own; default: mnist)")
    parser.add_argument("--data-root", help="where torchvision datasets are (default: the checkpoint's data.root, "
                                            "else data)")
    parser.add_argument("--classifier", help="cached feature classifier, trained here if absent (default: "
                                             "out/mnist_classifier.pt, out/<data>_classifier.pt for other data)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", help="where eval.md (and fid_vs_nfe.png) go (default: beside the input)")
    parser.add_argument("--json", help="also write the numbers as JSON here")
    return parser.parse_args(argv)


def main(argv=None):
    command = " ".join(["python evaluate.py", *(sys.argv[1:] if argv is None else argv)])
    args = parse_args(argv)
    is_npz = args.input.endswith(".npz")
    if is_npz and (args.sweep or args.sampler or args.steps or args.guidance or args.eta is not None
                   or args.spacing or args.guidance_interval or args.ema is not None or args.labels or args.guide):
        raise UserError("--sweep, --sampler, --steps, --eta, --spacing, --ema, --labels, --guide and "
                        "--guidance(-interval) need a checkpoint, not an .npz")
    device = runs.resolve_device(args.device)
    if is_npz:
        model, cfg, guide, guide_file = None, None, None, None
        digits, labels, data_cfg = read_npz(args.input, data.data_name(args.data),
                                            args.data_root or config.config["data"]["root"])
    else:
        if args.data != "mnist":
            raise UserError("--data is for an .npz input: a checkpoint is scored against the data it was trained on")
        model, cfg = runs.load_ema_model(args.input, device, args.ema)
        data_cfg = {**cfg["data"], "root": args.data_root or cfg["data"]["root"]}
        digits, labels = None, None
    if args.labels and not cfg["model"]["num_classes"]:
        raise UserError("--labels needs a conditional checkpoint (python main.py --conditional); this one is not")
    guidances = args.guidance or [None]
    if not is_npz:
        cfg = runs.with_sampling_flags(cfg, guidances[0], args.guidance_interval, args.guide, compile=args.compile,
                                       eta=args.eta, spacing=args.spacing)
        guide_file = runs.guide_path(args.guide, cfg, args.input)
        guide = runs.load_guide(guide_file, cfg, device)
    classifier, accuracy, classes = load_or_train_classifier(args.classifier or classifier_path(data_cfg), data_cfg)
    name = "MNIST" if data_cfg["name"] == "mnist" else os.path.basename(os.path.normpath(data_cfg["name"]))
    print(f"feature classifier: {accuracy:.2%} {name} held-out accuracy"
          f"{'' if classes else ' at telling the rotation (the data has no labels: no confident share or requested-class accuracy)'}")
    test_digits, _ = data_images(data_cfg, train=False)
    reference, _ = classify(classifier, test_digits)
    train_digits, train_labels = data_images(data_cfg, train=True)
    if not is_npz and cfg["model"]["num_classes"]:
        labels = digit_mix(args.labels or "train", train_labels, args.num_samples, cfg["model"]["num_classes"])
    n = len(digits) if is_npz else args.num_samples
    pick = torch.randperm(len(train_digits), generator=torch.Generator().manual_seed(args.seed))[:min(n, 10000)]
    rows = [{"name": f"{name} train ({len(pick)}) vs {'test' if data_cfg['name'] in data.DATASETS else 'held out'}",
             **score(classifier, train_digits[pick.numpy()], reference, classes=classes)}]

    if is_npz:
        rows.append({"name": os.path.basename(args.input), **score(classifier, digits, reference, labels, classes=classes)})
    else:
        settings = SWEEP if args.sweep else [(args.sampler or cfg["sampling"]["sampler"],
                                          cfg["sampling"]["steps"] if args.steps is None else args.steps)]
        if cfg["sampling"]["compile"]:
            warm_up(model, cfg, guidances, n, args.seed, device, labels, guide)
        for sampler, steps in settings:
            for w in guidances:
                row_cfg = cfg if w is None else config.with_sampling(cfg, guidance=w)
                samples, seconds = generate(model, row_cfg, sampler, steps, n, args.seed, device, labels, guide)
                nfe = runs.sampler_evaluations(sampler, runs.sampler_stops(sampler, steps or cfg["diffusion"]["T"]))
                row = {"name": f"{sampler}, {nfe} steps", "sampler": sampler, "nfe": nfe,
                       "seconds_per_1000": 1000 * seconds / n}
                if args.ema is not None:
                    row["ema"] = args.ema
                    row["name"] += f", EMA {args.ema:g}"
                if sampler != "ddpm" and cfg["sampling"]["eta"] > 0:
                    row["eta"] = cfg["sampling"]["eta"]
                    row["name"] += f", eta = {row['eta']:g}"
                if cfg["sampling"]["spacing"] != config.config["sampling"]["spacing"]:
                    row["spacing"] = cfg["sampling"]["spacing"]
                    row["name"] += f", {row['spacing']} spacing"
                if guide is not None:
                    row["guide"] = guide_file
                    row["name"] += f", autoguided by {os.path.basename(guide_file)}"
                if labels is not None or guide is not None:
                    row["guidance"] = row_cfg["sampling"]["guidance"]
                    row["name"] += f", w = {row['guidance']:g}"
                    if row_cfg["sampling"]["guidance_interval"]:
                        row["guidance_interval"] = lo, hi = row_cfg["sampling"]["guidance_interval"]
                        row["name"] += f" for sigma in ({lo:g}, {hi:g}]"
                    if args.labels == "uniform":
                        row["labels"] = "uniform"
                        row["name"] += ", N/10 of each digit"
                rows.append({**row, **score(classifier, samples, reference, labels, classes=classes)})
                print(markdown_table(rows[-1:]).splitlines()[-1], flush=True)

    table = markdown_table(rows)
    print(table)
    out = runs.output_folder(args.out, args.input)
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
