"""Shared fixtures: the repo on sys.path and the offline MNIST copy beside the project."""
import contextlib
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# CI and this machine keep MNIST in ../shared/data; MNIST_ROOT points elsewhere if needed.
MNIST_ROOT = os.environ.get("MNIST_ROOT", os.path.join(REPO, "..", "shared", "data"))


@contextlib.contextmanager
def no_eager_fallback():
    """Fail where torch.compile fell back to eager on a frame it tried: runs.compile_network lets
    it (where no compiler works), and a test of the compiled network must not pass on that
    fallback. A frame compiled before (the same architecture) is reused without counting."""
    from torch._dynamo.utils import counters
    frames = counters["frames"]
    failed = frames["total"] - frames["ok"]
    yield
    assert frames["ok"] > 0 and frames["total"] - frames["ok"] == failed, "torch.compile fell back to eager"


@pytest.fixture(scope="session")
def mnist_root():
    if not os.path.isdir(os.path.join(MNIST_ROOT, "MNIST", "raw")):
        pytest.fail(f"MNIST raw files not found under {MNIST_ROOT}; set MNIST_ROOT")
    return MNIST_ROOT


@pytest.fixture(scope="session")
def mnist(mnist_root):
    """cfg["data"] of MNIST, for data.load_data and evaluate.data_images."""
    return {"name": "mnist", "root": mnist_root, "image_size": 28, "channels": 1}


@pytest.fixture(scope="session")
def digits(mnist):
    """The first 512 MNIST training digits in model range, (512, 1, 28, 28)."""
    import data
    return data.to_model_range(data.load_data(mnist)[0][:512])


@pytest.fixture(scope="session")
def trained(tmp_path_factory, mnist_root):
    """One smoke run of `python main.py` (its main, in this process), for every test that only
    reads its checkpoint, weights file or figures."""
    import main
    out = tmp_path_factory.mktemp("run")
    main.main(["--preset", "smoke", "--data-root", mnist_root, "--out", str(out)])
    return out


@pytest.fixture(scope="session")
def conditional_run(tmp_path_factory, mnist_root):
    """The same with `--conditional`: a smoke model that learns the digit too, and saves its EMA
    halfway as guide-0.5.pt (autoguidance's guide)."""
    import main
    out = tmp_path_factory.mktemp("conditional")
    main.main(["--preset", "smoke", "--conditional", "--data-root", mnist_root, "--out", str(out),
               "--set", "training.guides=[0.5]"])
    return out


@pytest.fixture(scope="session")
def classifier_file(tmp_path_factory, mnist):
    """A feature classifier trained briefly (3 epochs) on 6000 digits, saved where evaluate.py caches it."""
    import torch

    import evaluate
    import runs
    images, labels = evaluate.data_images(mnist, train=True)
    classifier = evaluate.train_classifier(torch.as_tensor(images[:6000]).movedim(-1, 1), labels[:6000],
                                           epochs=3, progress=False)
    test_images, test_labels = evaluate.data_images(mnist, train=False)
    _, probs = evaluate.classify(classifier, test_images[:2000])
    accuracy = (probs.argmax(-1) == test_labels[:2000]).double().mean().item()
    path = tmp_path_factory.mktemp("classifier") / "classifier.pt"
    runs.save_checkpoint({"model": classifier.state_dict(), "test_accuracy": accuracy}, str(path))
    return path, accuracy
