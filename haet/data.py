"""Datasets as uint8 NHWC arrays in canonical order, and the stratified training subset.

Sources, tried in this order:
1. `data_dir/train.npz` and `data_dir/test.npz` (arrays `x` uint8 NHWC, `y` labels),
   the format of `../shared/data` and of `python -m haet.data --export_dir=...`;
2. for CIFAR-10, the original Python version: `data_dir/cifar-10-batches-py/` or
   `data_dir/cifar-10-python.tar.gz` (read in place, not extracted);
3. tensorflow-datasets (downloads into `data_dir`, or its default directory), with
   the canonical order restored from the example ids where the dataset has them.

Export a subset (e.g. to carry it to a GPU machine)::

    python -m haet.data --dataset=cifar10 --train_size=5000 --export_dir=DIR

writes `DIR/train.npz` (the subset), `DIR/test.npz` (the whole test split) and
`DIR/subset.json` (indices into the canonical training split and a sha256), and
refuses to write into a folder that already holds any of them.
"""

import dataclasses
import hashlib
import json
import os
import pickle
import tarfile

import keras
import numpy as np


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What haet knows of a dataset: shapes, class names, split sizes, tfds name."""

    name: str
    image_shape: tuple
    class_names: tuple
    train_examples: int
    test_examples: int
    tfds_name: str

    @property
    def num_classes(self):
        return len(self.class_names)


DATASETS = {
    "cifar10": DatasetInfo(
        name="cifar10",
        image_shape=(32, 32, 3),
        class_names=(
            "airplane", "automobile", "bird", "cat", "deer",
            "dog", "frog", "horse", "ship", "truck",
        ),
        train_examples=50_000,
        test_examples=10_000,
        tfds_name="cifar10",
    ),
    "mnist": DatasetInfo(
        name="mnist",
        image_shape=(28, 28, 1),
        class_names=tuple(str(d) for d in range(10)),
        train_examples=60_000,
        test_examples=10_000,
        tfds_name="mnist",
    ),
}


@dataclasses.dataclass
class Dataset:
    """Train and test arrays: `x_*` uint8 `(N, H, W, C)`, `y_*` int32 `(N,)`."""

    info: DatasetInfo
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str


def dataset_info(name):
    """The `DatasetInfo` of `name`. Raises ValueError for an unknown dataset."""
    if name not in DATASETS:
        raise ValueError(
            f"Unknown dataset {name!r}. Allowed: {', '.join(sorted(DATASETS))}."
        )
    return DATASETS[name]


def validate_arrays(x, y, info, split):
    """Checks that `x`, `y` are a well-formed `split` of dataset `info`.

    Returns:
        `(x, y)` with `y` as int32 of shape `(N,)` (a trailing axis of 1 is dropped).

    Raises:
        ValueError: naming the problem: dtype or shape of `x`, shape of `y`, length
            mismatch, or labels outside `[0, num_classes)`.
    """
    where = f"{info.name} {split} split"
    if x.dtype != np.uint8:
        raise ValueError(
            f"{where}: images must be uint8 (0-255). Received dtype {x.dtype}; "
            "convert with np.clip(x, 0, 255).astype(np.uint8) if they are pixel values."
        )
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(info.image_shape):
        raise ValueError(
            f"{where}: images must have shape (N, {', '.join(map(str, info.image_shape))}) "
            f"(NHWC). Received shape {x.shape}."
        )
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(
            f"{where}: labels must be integers of shape (N,). "
            f"Received dtype {y.dtype}, shape {y.shape}."
        )
    if len(y) != len(x):
        raise ValueError(f"{where}: {len(x)} images but {len(y)} labels.")
    if len(y) and (y.min() < 0 or y.max() >= info.num_classes):
        raise ValueError(
            f"{where}: labels must be in [0, {info.num_classes}). "
            f"Received min {y.min()}, max {y.max()}."
        )
    return x, y.astype(np.int32)


def _load_npz(directory):
    splits = {}
    for split in ("train", "test"):
        with np.load(os.path.join(directory, f"{split}.npz")) as f:
            splits[split] = (f["x"], f["y"])
    return splits


def _cifar_pickle_arrays(batches):
    """(x, y) from unpickled CIFAR-10 batches: `data` (N, 3072) in CHW order."""
    x = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
    y = np.concatenate([np.asarray(b[b"labels"]) for b in batches])
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)), y


_CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))


def _load_cifar10_python(path):
    """CIFAR-10 from `cifar-10-batches-py/` or `cifar-10-python.tar.gz` at `path`."""
    names = {"train": _CIFAR10_TRAIN_BATCHES, "test": ("test_batch",)}
    if os.path.isdir(path):
        def read(name):
            with open(os.path.join(path, name), "rb") as f:
                return pickle.load(f, encoding="bytes")
        return {s: _cifar_pickle_arrays([read(n) for n in ns]) for s, ns in names.items()}
    with tarfile.open(path, "r:gz") as tar:
        def read(name):
            return pickle.load(
                tar.extractfile(f"cifar-10-batches-py/{name}"), encoding="bytes"
            )
        return {s: _cifar_pickle_arrays([read(n) for n in ns]) for s, ns in names.items()}


def _canonical_order(ids):
    """Sort order restoring the original file order from tfds ids like b'train_00042'."""
    ids = [i.decode() if isinstance(i, bytes) else str(i) for i in ids]
    return np.argsort([int(i.rsplit("_", 1)[-1]) for i in ids], kind="stable")


def _load_tfds(info, data_dir):
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise RuntimeError(
            f"No local copy of {info.name} and tensorflow-datasets is not installed. "
            "Pass --data_dir=DIR with DIR/train.npz and DIR/test.npz "
            "(e.g. from `python -m haet.data --export_dir=DIR` on another machine)."
        ) from e
    splits = {}
    for split in ("train", "test"):
        try:
            arrays = tfds.as_numpy(
                tfds.load(info.tfds_name, split=split, data_dir=data_dir, batch_size=-1)
            )
        except Exception as e:  # tfds raises many kinds of errors when offline.
            raise RuntimeError(
                f"Could not load {info.name} with tensorflow-datasets ({type(e).__name__}: "
                f"{e}). Offline? Pass --data_dir=DIR with DIR/train.npz and DIR/test.npz "
                "(arrays x uint8 NHWC, y labels)"
                + (", or the original cifar-10-python.tar.gz" if info.name == "cifar10" else "")
                + "."
            ) from e
        x, y = arrays["image"], arrays["label"]
        if "id" in arrays:
            order = _canonical_order(arrays["id"])
            x, y = x[order], y[order]
        splits[split] = (x, y)
    return splits


def load_dataset(name, data_dir=None):
    """Loads dataset `name` as uint8 NHWC arrays in canonical order.

    Args:
        name: a key of `DATASETS` ("cifar10", "mnist").
        data_dir: folder with a local copy (see the module docstring), or None to
            use tensorflow-datasets' default folder.

    Returns:
        A `Dataset`; `source` says which copy was read.

    Raises:
        ValueError: unknown dataset, a missing `data_dir`, or malformed arrays.
        RuntimeError: no local copy and tensorflow-datasets cannot provide one.
    """
    info = dataset_info(name)
    if data_dir is not None and not os.path.isdir(data_dir):
        raise ValueError(
            f"data_dir {data_dir!r} is not a folder. Pass a folder holding train.npz and "
            "test.npz, or leave it unset to use tensorflow-datasets."
        )
    npz_dir = data_dir and os.path.join(data_dir, "train.npz")
    cifar_py = None
    if data_dir and info.name == "cifar10":
        for candidate in ("cifar-10-batches-py", "cifar-10-python.tar.gz"):
            if os.path.exists(os.path.join(data_dir, candidate)):
                cifar_py = os.path.join(data_dir, candidate)
                break
    if npz_dir and os.path.exists(npz_dir):
        splits, source = _load_npz(data_dir), f"npz:{os.path.abspath(data_dir)}"
    elif cifar_py:
        splits, source = _load_cifar10_python(cifar_py), f"cifar-python:{cifar_py}"
    else:
        splits, source = _load_tfds(info, data_dir), f"tfds:{info.tfds_name}"
    (x_train, y_train), (x_test, y_test) = (
        validate_arrays(*splits[s], info, s) for s in ("train", "test")
    )
    return Dataset(info, x_train, y_train, x_test, y_test, source)


def stratified_subset(labels, train_size, num_classes, seed):
    """Indices of a class-balanced subset: `train_size / num_classes` per class.

    Within each class, images are drawn without replacement by
    `np.random.default_rng(seed)` from the class's indices in canonical order, so
    the subset depends only on the labels, `train_size` and `seed` (not on the data
    source or the Keras backend). When `train_size == len(labels)`, all indices.

    Args:
        labels: int array `(N,)`.
        train_size: number of images to keep.
        num_classes: number of classes.
        seed: int, the subset seed.

    Returns:
        Sorted int64 indices `(train_size,)` into `labels`.

    Raises:
        ValueError: if `train_size` is not positive, not a multiple of
            `num_classes`, or needs more images of a class than there are.
    """
    n = len(labels)
    if train_size == n:
        return np.arange(n)
    if not isinstance(train_size, (int, np.integer)) or train_size <= 0:
        raise ValueError(f"train_size must be a positive integer. Received: {train_size!r}")
    if train_size > n:
        raise ValueError(
            f"train_size={train_size} is larger than the {n} training images available."
        )
    if train_size % num_classes:
        raise ValueError(
            f"train_size={train_size} is not a multiple of the {num_classes} classes; "
            f"use e.g. {train_size - train_size % num_classes} or "
            f"{train_size + num_classes - train_size % num_classes}."
        )
    per_class = train_size // num_classes
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            raise ValueError(
                f"train_size={train_size} needs {per_class} images of class {c}, "
                f"which has only {len(members)}."
            )
        chosen.append(rng.choice(members, per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def subset_sha256(x, y):
    """sha256 of images (uint8 bytes) and labels (as little-endian int64): hex str."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(x, dtype=np.uint8).tobytes())
    h.update(np.ascontiguousarray(y, dtype="<i8").tobytes())
    return h.hexdigest()


class ShuffledBatches(keras.utils.PyDataset):
    """Training batches for `model.fit`: full batches of a new permutation each epoch.

    An epoch is `len(x) // batch_size` steps; the `len(x) % batch_size` images that
    fall at the end of each epoch's permutation wait for the next one. Every step
    thus has the same shape and the train step compiles once (a short last batch
    would trace and XLA-compile a second variant inside the budget).

    Args:
        x: uint8 images `(N, H, W, C)`.
        y: int labels `(N,)`.
        batch_size: examples per step, at most N.
        seed: int seed of the permutations.

    Raises:
        ValueError: if `batch_size` is not in [1, N].
    """

    def __init__(self, x, y, batch_size, seed):
        super().__init__(workers=1, use_multiprocessing=False, max_queue_size=16)
        if not 1 <= batch_size <= len(x):
            raise ValueError(
                f"batch_size={batch_size} must be between 1 and the {len(x)} training images."
            )
        self.x, self.y, self.batch_size = x, y, batch_size
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(len(x))

    def __len__(self):
        return len(self.x) // self.batch_size

    def __getitem__(self, index):
        batch = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        return self.x[batch], self.y[batch]

    def on_epoch_end(self):
        self.order = self.rng.permutation(len(self.x))


def export_subset(dataset, indices, export_dir, subset_seed):
    """Writes the training subset, the test split and `subset.json` into `export_dir`.

    Raises:
        FileExistsError: if any of the three files already exists (nothing is written).
    """
    names = ("train.npz", "test.npz", "subset.json")
    existing = [n for n in names if os.path.exists(os.path.join(export_dir, n))]
    if existing:
        raise FileExistsError(
            f"{export_dir} already holds {', '.join(existing)}; choose an empty folder."
        )
    os.makedirs(export_dir, exist_ok=True)
    x, y = dataset.x_train[indices], dataset.y_train[indices]
    np.savez(os.path.join(export_dir, "train.npz"), x=x, y=y.astype(np.uint8))
    np.savez(
        os.path.join(export_dir, "test.npz"),
        x=dataset.x_test,
        y=dataset.y_test.astype(np.uint8),
    )
    with open(os.path.join(export_dir, "subset.json"), "w") as f:
        json.dump(
            {
                "dataset": dataset.info.name,
                "source": dataset.source,
                "subset_seed": subset_seed,
                "train_size": len(indices),
                "subset_sha256": subset_sha256(x, y),
                "indices": [int(i) for i in indices],
            },
            f,
        )


def main(argv):
    del argv
    from absl import flags, logging

    f = flags.FLAGS
    dataset = load_dataset(f.dataset, f.data_dir)
    train_size = f.train_size or len(dataset.y_train)
    indices = stratified_subset(
        dataset.y_train, train_size, dataset.info.num_classes, f.subset_seed
    )
    x, y = dataset.x_train[indices], dataset.y_train[indices]
    logging.info(
        "%s from %s: subset of %d training images (seed %d), per class %s, sha256 %s",
        f.dataset, dataset.source, len(indices), f.subset_seed,
        np.bincount(y, minlength=dataset.info.num_classes).tolist(), subset_sha256(x, y),
    )
    if f.export_dir:
        export_subset(dataset, indices, f.export_dir, f.subset_seed)
        logging.info("Wrote %s", f.export_dir)


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_enum("dataset", "cifar10", sorted(DATASETS), "Dataset name.")
    flags.DEFINE_string("data_dir", None, "Folder with a local copy; default: tensorflow-datasets.")
    flags.DEFINE_integer("train_size", 5000, "Training images to keep, class-balanced; 0 = all.")
    flags.DEFINE_integer("subset_seed", 0, "Seed choosing the training subset.")
    flags.DEFINE_string("export_dir", None, "Write the subset and test split as npz here.")
    app.run(main)
