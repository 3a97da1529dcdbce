"""Shared fixtures: the repo on sys.path and the offline MNIST copy beside the project."""
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# CI and this machine keep MNIST in ../shared/data; MNIST_ROOT points elsewhere if needed.
MNIST_ROOT = os.environ.get("MNIST_ROOT", os.path.join(REPO, "..", "shared", "data"))


@pytest.fixture(scope="session")
def mnist_root():
    if not os.path.isdir(os.path.join(MNIST_ROOT, "MNIST", "raw")):
        pytest.fail(f"MNIST raw files not found under {MNIST_ROOT}; set MNIST_ROOT")
    return MNIST_ROOT


@pytest.fixture(scope="session")
def digits(mnist_root):
    """The first 512 MNIST training digits in model range, (512, 1, 28, 28)."""
    import helper
    return helper.to_model_range(helper.load_mnist(mnist_root)[:512], 28)
