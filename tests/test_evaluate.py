"""Metrics of evaluate.py against closed forms, the .npz reader, and the script end to end."""
import math

import numpy as np
import pytest
import torch

import config
import evaluate
from test_scripts import assert_one_line_error, run_script


def gaussian_features(n, mean, std, seed):
    return mean + std * torch.randn(n, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_fid_of_a_set_against_itself_is_zero():
    features = gaussian_features(4000, 0.0, 1.0, 0)
    assert evaluate.frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)


def test_fid_matches_closed_form_for_gaussians():
    """For N(m1, s1^2 I) and N(m2, s2^2 I) in D dims: FID = D (m1 - m2)^2 + D (s1 - s2)^2."""
    a, b = gaussian_features(200000, 0.0, 1.0, 1), gaussian_features(200000, 0.5, 2.0, 2)
    assert evaluate.frechet_distance(a, b) == pytest.approx(8 * 0.5 ** 2 + 8 * 1.0 ** 2, rel=0.02)


def test_fid_grows_with_added_noise():
    features = gaussian_features(4000, 0.0, 1.0, 3)
    noise = torch.randn(features.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    fids = [evaluate.frechet_distance(features, features + s * noise) for s in (0.1, 0.5, 1.0)]
    assert fids[0] < fids[1] < fids[2]


def test_precision_and_recall_of_identical_and_disjoint_sets():
    real = gaussian_features(1000, 0.0, 1.0, 5)
    assert evaluate.precision_recall(real, real.clone()) == (1.0, 1.0)
    assert evaluate.precision_recall(real, real + 100.0) == (0.0, 0.0)


def test_precision_recall_see_a_dropped_mode():
    """Fakes that cover one of two real clusters: nearly every fake is realistic (k-NN balls of a
    finite sample miss some of its own distribution's tail), half the reals are missed."""
    real = torch.cat([gaussian_features(500, 0.0, 1.0, 6), gaussian_features(500, 50.0, 1.0, 7)])
    precision, recall = evaluate.precision_recall(real, gaussian_features(1000, 0.0, 1.0, 8))
    assert precision > 0.8 and 0.4 < recall <= 0.5


@pytest.mark.parametrize("n", [10000, 2000, 37, 1])
def test_digit_mix_follows_the_training_shares_and_sums_to_n(n):
    train_labels = torch.arange(10).repeat_interleave(torch.tensor([5, 11, 9, 10, 10, 8, 10, 12, 15, 10]))
    share = torch.bincount(train_labels) / len(train_labels)
    labels = evaluate.digit_mix("train", train_labels, n)
    counts = torch.bincount(labels, minlength=10)
    assert len(labels) == n and torch.equal(labels, labels.sort().values)  # digit order
    assert ((counts - n * share).abs() < 1).all()  # each count rounds n p(y) down or up
    uniform = torch.bincount(evaluate.digit_mix("uniform", train_labels, n), minlength=10)
    assert uniform.sum() == n and uniform.max() - uniform.min() <= 1


@pytest.mark.parametrize("array, fragment", [
    (np.zeros((4, 28, 28, 1), np.float32), "must be uint8"),
    (np.zeros((4, 28, 28), np.uint8), "must be uint8 of shape"),
    (np.zeros((4, 28, 28, 2), np.uint8), "must be uint8 of shape"),
    (np.zeros((4, 28, 28, 3), np.uint8), "'mnist' has 1 channel"),
])
def test_npz_reader_rejects_wrong_dtype_and_shape(tmp_path, array, fragment, mnist_root):
    np.savez(tmp_path / "bad.npz", arr_0=array)
    with pytest.raises(config.UserError, match=fragment):
        evaluate.read_npz(str(tmp_path / "bad.npz"), "mnist", mnist_root)


def test_npz_reader_rejects_a_missing_key_on_one_line(tmp_path):
    np.savez(tmp_path / "samples.npz", images=np.zeros((4, 28, 28, 1), np.uint8))
    code, _, stderr = run_script("evaluate.py", str(tmp_path / "samples.npz"))
    assert_one_line_error(code, stderr, "has no array arr_0")


def test_classifier_learns_mnist(classifier_file):
    assert classifier_file[1] > 0.95


def test_real_test_digits_score_near_the_floor_and_noise_far_from_it(classifier_file, mnist_root, mnist, tmp_path):
    test_images, _ = evaluate.data_images(mnist, train=False)
    pick = np.random.default_rng(0).permutation(len(test_images))[:1000]  # the test set is ordered by writer group
    np.savez(tmp_path / "real.npz", arr_0=test_images[pick])
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "noise.npz", arr_0=rng.integers(0, 256, (1000, 28, 28, 1), dtype=np.uint8))
    results = {}
    for name in ("real", "noise"):
        evaluate.main([str(tmp_path / f"{name}.npz"), "--data-root", mnist_root, "--classifier",
                       str(classifier_file[0]), "--json", str(tmp_path / f"{name}.json")])
        results[name] = __import__("json").load(open(tmp_path / f"{name}.json"))["rows"]
    floor, real = results["real"]
    _, noise = results["noise"]
    assert real["fid"] < 2 * floor["fid"] + 1.0 and real["precision"] > 0.8 and real["confident"] > 0.9
    # pure noise collapses to one small feature cluster that the k-NN balls of a few outlying real
    # digits can cover, so precision alone may miss it; FID and recall cannot
    assert noise["fid"] > 10 * real["fid"] and noise["recall"] < 0.1
    assert math.isclose(sum(real["classes"]), 1.0, abs_tol=1e-3)
    assert (tmp_path / "eval.md").exists()
