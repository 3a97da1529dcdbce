"""--data: a torchvision dataset by name, a folder of PNGs (class subfolders or none), an .npz of
RGB images; each trains, resumes exactly, samples, inpaints, interpolates and scores at its own
shape; bad data is one line."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import config
import data
import edit
import evaluate
import forwardprocess
import helper
import loadmodel
import main
import runs
import training
from test_scripts import assert_one_line_error, run_in_process
from tools import colour_slopes, make_data


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, mnist):
    """Small data of each kind built from MNIST (tools/make_data.py): name -> (--data, --data-root,
    extra main.py flags, the (S, S, C) of its samples)."""
    root = tmp_path_factory.mktemp("data")
    images, labels, _ = data.load_data(mnist)
    grey, grey_labels = make_data.make(images[:300], labels[:300])
    make_data.write(grey, grey_labels, str(root / "png"))
    rgb, rgb_labels = make_data.make(images[:300], labels[:300], size=32, colour=True)
    make_data.write(rgb, rgb_labels, str(root / "rgb.npz"))
    make_data.write(rgb[:200], None, str(root / "unlabelled"))
    fashion = root / "FashionMNIST" / "raw"  # MNIST's files where torchvision looks for Fashion-MNIST's
    fashion.mkdir(parents=True)
    for name in data.MNIST_FILES:
        os.symlink(os.path.join(mnist["root"], "MNIST", "raw", name), fashion / name)
    return {"fashion-mnist": ("fashion-mnist", str(root), ["--conditional"], (28, 28, 1)),
            "png": (str(root / "png"), None, ["--conditional"], (28, 28, 1)),
            "rgb.npz": (str(root / "rgb.npz"), None, ["--conditional"], (32, 32, 3)),
            "unlabelled-64": (str(root / "unlabelled"), None, [
                "--set", "data.image_size=64", "--set", "model.ch_mult=[1,2,2,2]"], (64, 64, 3))}


def train(datasets, kind, out, *flags):
    name, root, extra, _ = datasets[kind]
    args = ["--preset", "smoke", "--data", name, "--out", str(out), "--set", "training.checkpoint_every=100",
            *extra, *flags]  # a checkpoint (and its preview grid) at the end alone
    main.main(args + (["--data-root", root] if root else []))


@pytest.mark.parametrize("kind", ["fashion-mnist", "png", "rgb.npz", "unlabelled-64"])
def test_each_kind_of_data_trains_samples_edits_and_scores(datasets, kind, tmp_path, classifier_file):
    shape, labelled = datasets[kind][3], not kind.startswith("unlabelled")
    train(datasets, kind, tmp_path / "run", "--steps", "6")
    ckpt = str(tmp_path / "run" / "ckpt.pt")
    cfg = runs.load_checkpoint(ckpt)["config"]
    assert (cfg["data"]["image_size"], cfg["data"]["image_size"], cfg["data"]["channels"]) == shape
    assert cfg["model"]["num_classes"] == (10 if labelled else 0)

    loadmodel.main([ckpt, "--num-samples", "4", *(["--digit", "7"] if labelled else []), "--out", str(tmp_path)])
    assert np.load(tmp_path / "samples.npz")["arr_0"].shape == (4, *shape)
    edit.main(["inpaint", ckpt, "--count", "2", "--num-samples", "2", "--out", str(tmp_path)])
    archive = np.load(tmp_path / "inpainted.npz")
    assert archive["arr_0"].shape == (4, *shape) and ("labels" in archive) == labelled
    edit.main(["interpolate", ckpt, "--frames", "3", "--pairs", "1", "--steps", "4", "--out", str(tmp_path)])
    assert (tmp_path / "interpolation.png").exists() and (tmp_path / "labels.png").exists() == labelled

    # Fashion-MNIST's files here are MNIST's: the MNIST classifier stands in for training one on 60,000 images
    classifier = classifier_file[0] if kind == "fashion-mnist" else tmp_path / "classifier.pt"
    evaluate.main([ckpt, "--num-samples", "20", "--steps", "4", "--no-compile", "--classifier", str(classifier),
                   "--json", str(tmp_path / "eval.json"), "--out", str(tmp_path)])
    floor, row = json.load(open(tmp_path / "eval.json"))["rows"]
    assert floor["name"].endswith("vs test" if kind == "fashion-mnist" else "vs held out")
    assert np.isfinite(row["fid"]) and 0 <= row["precision"] <= 1
    assert ("confident" in row) == labelled and ("accuracy" in row) == labelled


def test_the_background_colour_of_each_image_is_the_one_make_data_drew(mnist):
    """make_data paints every digit over a background colour drawn first from its seed; the border
    median returns it exactly, at 28 and 32 pixels, and the data's spread of uniform colours."""
    images, labels, _ = data.load_data(mnist)
    drawn = torch.randint(0, 256, (2, 500, 3), generator=torch.Generator().manual_seed(3))[1].float()
    for size in (28, 32):
        rgb, _ = make_data.make(images[:500], labels[:500], size=size, colour=True, seed=3)
        colours = evaluate.backgrounds(rgb.movedim(1, -1).numpy())
        assert torch.equal(colours, drawn)
    scores = evaluate.score(evaluate.Classifier(3), rgb.movedim(1, -1).numpy(), torch.randn(500, 128).double())
    assert scores["background_mean"] == [round(v, 1) for v in drawn.mean(0).tolist()]
    assert scores["background_std"] == pytest.approx([255 / 12 ** 0.5] * 3, rel=0.1)  # uniform on 0..255


def test_forwardprocess_shows_an_rgb_image(datasets, tmp_path, capsys):
    forwardprocess.main(["--data", datasets["rgb.npz"][0], "--out", str(tmp_path)])
    assert (tmp_path / "forward_chain.png").exists() and (tmp_path / "forward_closed_form.png").exists()
    assert "x_T over 270 images" in capsys.readouterr().out  # the training split of 300


def test_an_epoch_is_a_pass_over_the_datas_own_training_images(datasets, tmp_path):
    cfg, _, _ = main.resolve(main.parse_args(["--preset", "smoke", "--data", datasets["png"][0], "--epochs", "2"]))
    assert training.total_steps_of(cfg) == 2 * (270 // 16)  # 270 training images of 300, batches of 16
    train(datasets, "png", tmp_path, "--epochs", "1", "--set", "training.batch_size=90")
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 3


def test_a_folder_and_an_npz_keep_a_fixed_tenth_out_of_training(datasets):
    whole = data.read_npz_images(datasets["rgb.npz"][0])
    label_of = {image.numpy().tobytes(): label for image, label in zip(whole.images, whole.labels.tolist())}
    splits = [data.read_data(datasets["rgb.npz"][0], "unused", train) for train in (True, False)]
    assert [len(split.images) for split in splits] == [270, 30]
    seen = [image.numpy().tobytes() for split in splits for image in split.images]
    assert set(seen) == set(label_of) and len(set(seen)) == 300  # disjoint, and together the whole
    assert [label_of[key] for key in seen] == torch.cat([split.labels for split in splits]).tolist()
    folder = [data.read_data(datasets["png"][0], "unused", train) for train in (True, False)]
    assert [len(split.images) for split in folder] == [270, 30] and folder[0].classes == [str(d) for d in range(10)]


def test_the_cpu_preset_fits_its_levels_to_the_image_size_and_unlabelled_data_trains_unconditional(datasets, capsys):
    assert [main.cpu_levels(size) for size in (28, 32, 64)] == [[1, 2, 2], [1, 2, 2], [1, 2, 2, 2]]
    cfg, _, _ = main.resolve(main.parse_args(["--preset", "cpu", "--data", datasets["png"][0],
                                              "--set", "data.image_size=64"]))
    assert cfg["model"]["ch_mult"] == [1, 2, 2, 2] and cfg["data"]["image_size"] == 64
    cfg, _, _ = main.resolve(main.parse_args(["--preset", "cpu", "--data", datasets["unlabelled-64"][0]]))
    assert cfg["model"]["num_classes"] == 0 and (cfg["data"]["image_size"], cfg["data"]["channels"]) == (32, 3)
    assert "has no labels: training an unconditional model" in capsys.readouterr().out


def test_colour_slopes_are_zero_for_a_blind_network_and_one_for_an_unbiased_estimate(mnist):
    """x0-prediction: a network that outputs 0 recovers none of the background colour; one that
    outputs x_t / sqrt(alpha_bar) = x_0 + sigma eps, unbiased, all of it on average (slope 1,
    within the noise of 2,000 images at SNR 0.02 and above)."""
    images, labels, _ = data.load_data(mnist)
    rgb, _ = make_data.make(images[:2000], labels[:2000], size=32, colour=True)
    cfg = config.merge_config(config.get_config("cpu"), {"diffusion": {"prediction": "x0"}})
    sched = helper.Schedule.from_config(cfg["diffusion"])
    blind = lambda x_t, t: torch.zeros_like(x_t)
    unbiased = lambda x_t, t: x_t / helper.extract(sched.alpha_bars, t, x_t.shape).sqrt()
    assert all(slope == 0 for _, _, slope, _ in colour_slopes.colour_slopes(blind, cfg, rgb, None))
    rows = colour_slopes.colour_slopes(unbiased, cfg, rgb, None)
    assert all(abs(slope - 1) < 0.1 for _, snr, slope, _ in rows if snr > 0.02)
    assert [best for *_, best in rows] == sorted(best for *_, best in rows)  # more of it as the noise falls


def test_bad_data_is_one_line(datasets, tmp_path, mnist_root):
    (tmp_path / "empty").mkdir()
    mixed = tmp_path / "mixed" / "0"
    mixed.mkdir(parents=True)
    for i, size in enumerate((28, 28, 30)):
        Image.fromarray(np.zeros((size, size), np.uint8)).save(mixed / f"{i}.png")
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((8, 28, 28, 1), np.float32))
    np.savez(tmp_path / "short.npz", arr_0=np.zeros((8, 28, 28, 1), np.uint8), labels=np.zeros(7, np.int64))
    for source, fragment in [(tmp_path / "empty", "holds no .png/.jpg/.jpeg images"),
                           (tmp_path / "mixed", "differ in size or are not square"),
                           (tmp_path / "float.npz", "arr_0 must be uint8"),
                           (tmp_path / "short.npz", "labels must be integers >= 0 of shape (8,)"),
                           ("cifar100", "is neither a dataset")]:
        code, _, stderr = run_in_process("main.py", "--preset", "smoke", "--data", str(source), "--out", str(tmp_path))
        assert_one_line_error(code, stderr, fragment)
    code, _, stderr = run_in_process("main.py", "--preset", "smoke", "--data", str(tmp_path / "mixed"), "--out",
                                     str(tmp_path / "resized"), "--steps", "1", "--set", "data.image_size=28",
                                     "--set", "training.batch_size=2")
    assert code == 0, stderr
    train(datasets, "rgb.npz", tmp_path / "rgb", "--steps", "1")
    code, _, stderr = run_in_process("edit.py", "inpaint", str(tmp_path / "rgb" / "ckpt.pt"), "--data", "mnist",
                                     "--data-root", mnist_root, "--out", str(tmp_path))
    assert_one_line_error(code, stderr, "the checkpoint draws 3-channel images; 'mnist' has 1 channel(s)")


@pytest.mark.parametrize("n, channels", [(7, 1), (6, 3), (2, 1)])
def test_the_sample_grid_is_torchvisions_layout_white_between_and_around(n, channels, tmp_path):
    import torchvision
    images = torch.rand(n, channels, 5, 4) * 2 - 1
    expected = torchvision.utils.make_grid((images + 1) / 2, nrow=3, padding=2, pad_value=1.0)  # (3, H', W')
    expected = (expected * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()[..., :channels]
    data.save_grid(data.to_digits(images), tmp_path / "grid.png", nrow=3)
    saved = np.array(Image.open(tmp_path / "grid.png"))
    assert np.abs(saved.reshape(expected.shape).astype(int) - expected).max() <= 1  # rounding of x.5 apart
