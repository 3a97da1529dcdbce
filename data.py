"""The images: MNIST or another torchvision dataset by name, a folder of images or an .npz,
their held-out split, the conversion between uint8 images and the model's range [-1, 1], and
the pictures made of them (sample grids, rows of images with captions)."""
import functools
import math
import os

import numpy as np
import torch
from tqdm import tqdm

from config import UserError

DATASETS = {  # --data name -> torchvision class, its keyword arguments, its folder under --data-root
    "mnist": ("MNIST", {}, "MNIST/raw"),
    "fashion-mnist": ("FashionMNIST", {}, "FashionMNIST/raw"),
    "kmnist": ("KMNIST", {}, "KMNIST/raw"),
    "emnist-letters": ("EMNIST", {"split": "letters"}, "EMNIST/raw"),
    "cifar10": ("CIFAR10", {}, "cifar-10-batches-py"),
}
MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
HELD_OUT = 0.1  # the share of a folder or an .npz kept out of training, to score against


class Images:
    """A dataset's split in memory: images uint8 (N, C, H, W) (a list of (C, H, W) when the sizes
    differ), labels int64 (N,) or None when unlabelled, the class names, and where each image
    came from (a folder's files; None otherwise)."""

    def __init__(self, images, labels, classes, files=None):
        self.images, self.labels, self.classes, self.files = images, labels, classes, files

    @property
    def sizes(self):
        return {tuple(image.shape[-2:]) for image in self.images}


def read_torchvision(name, root, train):
    import torchvision
    kind, extra, folder = DATASETS[name]
    try:
        dataset = getattr(torchvision.datasets, kind)(root=root, train=train, download=True, **extra)
    except (RuntimeError, OSError) as error:
        files = ", ".join(MNIST_FILES) if kind in ("MNIST", "FashionMNIST", "KMNIST") else "its files"
        raise UserError(f"{kind} not found under {os.path.join(root, folder)} and could not be downloaded "
                        f"({type(error).__name__}); put {files} there, or pass --data-root DIR") from None
    images, labels = torch.as_tensor(dataset.data), torch.as_tensor(dataset.targets)
    if images.ndim == 3:  # greyscale (N, H, W)
        images = images.unsqueeze(1)
    else:  # CIFAR-10's (N, H, W, 3)
        images = images.permute(0, 3, 1, 2).contiguous()
    classes = list(dataset.classes)
    if name == "emnist-letters":  # stored transposed, labelled 1-26 (class 0 is unused)
        images, labels, classes = images.transpose(-1, -2).contiguous(), labels - 1, classes[1:]
    return Images(images, labels.long(), classes)


def read_folder(path):
    """Every image in `path`: in class subfolders (sorted names give the labels 0, 1, ...) or
    directly in it (unlabelled). Greyscale unless some image has colour; alpha is dropped."""
    from PIL import Image
    subfolders = sorted(entry.name for entry in os.scandir(path) if entry.is_dir() and not entry.name.startswith("."))
    files = [(None, name) for name in sorted(os.listdir(path)) if name.lower().endswith(IMAGE_SUFFIXES)]
    if subfolders and not files:
        files = [(k, os.path.join(sub, name)) for k, sub in enumerate(subfolders)
                 for name in sorted(os.listdir(os.path.join(path, sub))) if name.lower().endswith(IMAGE_SUFFIXES)]
    if not files:
        raise UserError(f"'{path}' holds no {'/'.join(IMAGE_SUFFIXES)} images, directly or in class subfolders")
    images = []
    for _, name in tqdm(files, desc=f"reading {path}", leave=False, disable=len(files) < 5000):
        try:
            with Image.open(os.path.join(path, name)) as image:
                image = image.convert("RGB" if image.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr") else "L")
                pixels = torch.from_numpy(np.array(image))  # (H, W) or (H, W, 3) uint8; alpha dropped
        except OSError as error:
            raise UserError(f"'{os.path.join(path, name)}' is not a readable image ({error})") from None
        images.append(pixels[None] if pixels.ndim == 2 else pixels.permute(2, 0, 1))
    channels = max(len(image) for image in images)
    images = [image.expand(channels, -1, -1) for image in images]
    labelled = files[0][0] is not None
    return Images(images, torch.tensor([k for k, _ in files]) if labelled else None, subfolders if labelled else [],
                  [os.path.join(path, name) for _, name in files])


def read_npz_images(path):
    """An .npz with uint8 arr_0 (N, H, W, C), C 1 or 3, and optional integer labels (N,)."""
    try:
        with np.load(path) as archive:
            if "arr_0" not in archive:
                raise UserError(f"'{path}' has no array arr_0 (keys: {', '.join(archive.files)})")
            images, labels = archive["arr_0"], archive["labels"] if "labels" in archive else None
    except (OSError, ValueError) as error:
        raise UserError(f"'{path}' is not a readable .npz ({type(error).__name__})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3) or len(images) < 2:
        raise UserError(f"'{path}' arr_0 must be uint8 of shape (N >= 2, H, W, 1 or 3), got {images.dtype} "
                        f"{images.shape}")
    if labels is not None and (labels.shape != (len(images),) or labels.dtype.kind not in "iu" or labels.min() < 0):
        raise UserError(f"'{path}' labels must be integers >= 0 of shape ({len(images)},), got {labels.dtype} "
                        f"{labels.shape}")
    images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    if labels is None:
        return Images(images, None, [])
    labels = torch.from_numpy(labels).long()
    return Images(images, labels, [str(k) for k in range(int(labels.max()) + 1)])


def held_out_split(data, train):
    """A fixed 90/10 split of data that has no test split of its own."""
    order = torch.randperm(len(data.images), generator=torch.Generator().manual_seed(0))
    n_test = max(1, round(HELD_OUT * len(order)))
    keep = (order[n_test:] if train else order[:n_test]).sort().values
    images = data.images[keep] if torch.is_tensor(data.images) else [data.images[i] for i in keep]
    return Images(images, None if data.labels is None else data.labels[keep], data.classes,
                  data.files and [data.files[i] for i in keep])


def data_name(text):
    """What --data names, as a config's data.name: a dataset's name, else the absolute path of a
    folder or an .npz, so that a checkpoint still finds it from another working directory."""
    return text if text in DATASETS else os.path.abspath(text)


@functools.lru_cache(maxsize=2)
def read_images(path):
    """A folder of images or an .npz, whole (read once for both of its splits)."""
    if path.endswith(".npz") and os.path.isfile(path):
        return read_npz_images(path)
    if os.path.isdir(path):
        return read_folder(path)
    raise UserError(f"--data '{path}' is neither a dataset ({', '.join(DATASETS)}), a folder of images nor "
                    f"an .npz file")


@functools.lru_cache(maxsize=4)
def read_data(name, root, train):
    """The data `--data` names, at its own size(s): a torchvision dataset (its train or test
    split), or a folder of images or an .npz (all but a held-out tenth, or that tenth)."""
    if name in DATASETS:
        return read_torchvision(name, root, train)
    return held_out_split(read_images(name), train)


def load_data(data_cfg, train=True):
    """The images of cfg["data"] as uint8 (N, C, S, S), resized to data.image_size S where their
    own size differs, their labels (N,) (None when unlabelled) and class names."""
    data = read_data(data_cfg["name"], data_cfg["root"], train)
    size = data_cfg["image_size"]
    if data.sizes == {(size, size)}:
        images = data.images if torch.is_tensor(data.images) else torch.stack(data.images)
    else:
        import torchvision.transforms.v2.functional as F
        images = torch.stack([F.resize(image, [size, size], antialias=True) for image in data.images])
    return images, data.labels, data.classes


def to_model_range(images_uint8):
    """uint8 images (B, C, H, W) -> float in [-1, 1]."""
    return images_uint8.float().div(127.5).sub(1)


def to_uint8(x):
    """Model-range images (..., C, H, W) in [-1, 1] -> uint8 (..., H, W, C)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).movedim(-3, -1).cpu()


def to_digits(samples):
    """Samples (N, C, S, S) in [-1, 1] -> uint8 images (N, S, S, C), as numpy (the .npz layout)."""
    return to_uint8(samples).numpy()


def shown(image):
    """uint8 (H, W, C) -> what matplotlib's imshow takes: (H, W) greyscale (cmap gray), RGB as it is."""
    return image[..., 0] if image.shape[-1] == 1 else image


def tile(images, nrow, padding=2):
    """uint8 images (N, H, W, C) as one uint8 picture (H', W', C): nrow per row, `padding`
    white pixels between and around them."""
    N, H, W, C = images.shape
    rows, cols = math.ceil(N / nrow), min(nrow, N)
    cells = np.full((rows * cols, H + padding, W + padding, C), 255, dtype=np.uint8)
    cells[:N, padding:, padding:] = images  # each image after its top and left border
    picture = cells.reshape(rows, cols, H + padding, W + padding, C).swapaxes(1, 2)
    picture = picture.reshape(rows * (H + padding), cols * (W + padding), C)
    return np.pad(picture, ((0, padding), (0, padding), (0, 0)), constant_values=255)  # the bottom and right border


def save_grid(digits, path, nrow):
    """Save uint8 images (N, H, W, C) (to_digits of samples) as one PNG grid of nrow per row."""
    from PIL import Image
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(shown(tile(digits, nrow))).save(path)


def pyplot():
    """matplotlib's pyplot on its headless backend: every figure goes to a file."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_rows(rows, path, row_labels=None, column_labels=None, title=None, pad=2):
    """Rows of images as one figure: rows uint8 (R, K, H, W, C), drawn as one tiled image, a
    caption over each column and beside each row where given."""
    plt = pyplot()
    R, K, H, W, C = rows.shape
    fig, ax = plt.subplots(figsize=(0.8 * K + 0.4, 0.8 * R + 0.5))
    ax.imshow(shown(tile(rows.reshape(R * K, H, W, C), K, pad)), cmap="gray", vmin=0, vmax=255)
    centre = lambda k, size: pad + k * (size + pad) + size / 2 - 0.5  # pixel coordinate of cell k's middle
    ax.set_xticks([centre(k, W) for k in range(K)] if column_labels else [], column_labels or [], fontsize=7)
    ax.xaxis.tick_top()
    ax.set_yticks([centre(r, H) for r in range(R)] if row_labels else [], row_labels or [], fontsize=7)
    ax.tick_params(length=0)
    ax.set_frame_on(False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
