"""Shared fixtures. Run under either backend: `pytest` or `KERAS_BACKEND=jax pytest`."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.environ.get(
    "HAET_SHARED_DATA", os.path.join(os.path.dirname(REPO), "shared", "data")
)


def shared_dataset_dir(name):
    path = os.path.join(SHARED_DATA, name)
    if not os.path.exists(os.path.join(path, "train.npz")):
        raise FileNotFoundError(
            f"Real {name} data not found at {path}; set HAET_SHARED_DATA to the folder "
            "holding cifar10/ and mnist/ (train.npz, test.npz)."
        )
    return path


@pytest.fixture(scope="session")
def cifar10_arrays():
    """The real CIFAR-10 train and test arrays (canonical order)."""
    path = shared_dataset_dir("cifar10")
    with np.load(os.path.join(path, "train.npz")) as tr, np.load(os.path.join(path, "test.npz")) as te:
        return tr["x"], tr["y"], te["x"], te["y"]


@pytest.fixture(scope="session")
def cifar10_slice_dir(tmp_path_factory, cifar10_arrays):
    """A folder of npz files with the first 1,000 training and 500 test images of real CIFAR-10."""
    x_train, y_train, x_test, y_test = cifar10_arrays
    path = tmp_path_factory.mktemp("cifar10_slice")
    np.savez(path / "train.npz", x=x_train[:1000], y=y_train[:1000])
    np.savez(path / "test.npz", x=x_test[:500], y=y_test[:500])
    return str(path)
