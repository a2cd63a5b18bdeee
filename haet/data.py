"""Datasets as uint8 NHWC arrays in canonical order, and the stratified training subset.

Datasets: cifar10, cifar100, mnist, fashion_mnist, and "folder": any
`data_dir/{train,test}/<class name>/*.png` (the HAET organizers scored on a set the
entrants never saw, so a recipe must run on any small labelled image set).

Sources, tried in this order:
1. `data_dir/train.npz` and `data_dir/test.npz` (arrays `x` uint8 NHWC, `y` labels),
   the format of `../shared/data` and of `python -m haet.data --export_dir=...`;
2. for CIFAR-10/100, the original Python version: `data_dir/cifar-10-batches-py/` or
   `data_dir/cifar-10-python.tar.gz` (`cifar-100-python[.tar.gz]`), read in place;
3. tensorflow-datasets (downloads into `data_dir`, or its default directory), with
   the canonical order restored from the example ids where the dataset has them; a
   warning says when it is about to download, and a failed download leaves no partial
   files behind. A `data_dir` that holds test.npz alone, or whose subfolder named
   after the dataset holds the copy, is refused instead.

Export a subset (e.g. to carry it to a GPU machine)::

    python -m haet.data --dataset=cifar10 --train_size=5000 --export_dir=DIR

writes `DIR/train.npz` (the subset), `DIR/test.npz` (the whole test split) and
`DIR/subset.json` (indices into the canonical training split and a sha256), and
refuses to write into a folder that already holds any of them.
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import pickle
import shutil
import tarfile
import tempfile

import keras
import numpy as np

from haet import cli, fields, results
from haet.fields import Field


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
    "cifar100": DatasetInfo(
        name="cifar100",
        image_shape=(32, 32, 3),
        class_names=tuple(
            "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge "
            "bus butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud "
            "cockroach couch crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl "
            "hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man "
            "maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree "
            "pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road "
            "rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel "
            "streetcar sunflower sweet_pepper table tank telephone television tiger tractor train "
            "trout tulip turtle wardrobe whale willow_tree wolf woman worm".split()
        ),
        train_examples=50_000,
        test_examples=10_000,
        tfds_name="cifar100",
    ),
    "fashion_mnist": DatasetInfo(
        name="fashion_mnist",
        image_shape=(28, 28, 1),
        class_names=("T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                     "sneaker", "bag", "ankle boot"),
        train_examples=60_000,
        test_examples=10_000,
        tfds_name="fashion_mnist",
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


FIELDS = (
    Field("dataset", "cifar10", f"Dataset: {', '.join(DATASETS)}, or folder (--data_dir/{{train,test}}/<class>/*.png)."),
    Field("data_dir", None, "Folder with train.npz/test.npz (or the CIFAR python archives); unset: "
          "tensorflow-datasets."),
    Field("train_size", 5000, "Training images, the same number per class (all of them: the split's size).",
          fields.positive(integer=True)),
    Field("classes", (), "Class ids to keep, relabelled 0..k-1 in this order (e.g. 5,6,7,8,9); empty: all.",
          item_type=int),
    Field("subset_seed", 0, "Seed choosing the training subset (and, +1, the validation split).",
          fields.at_least(0, integer=True)),
    Field("validation_size", 0, "Class-balanced images held out of the training subset to validate on after "
          "each epoch; 0: none.", fields.at_least(0, integer=True)),
)


def check_config(config):
    """Checks the data settings of a run config against what is known of the dataset
    (a folder dataset's folder is read).

    Returns:
        The dataset's `DatasetInfo` (restricted to `config.classes`).

    Raises:
        ValueError: an unknown dataset, a subset the data cannot give, naming the value.
    """
    if config.dataset == "folder" and not config.data_dir:
        raise ValueError("--dataset=folder needs --data_dir=DIR with DIR/train/<class>/ and DIR/test/<class>/.")
    info = dataset_info(config.dataset, config.data_dir)
    if config.classes:
        k = info.num_classes
        classes = list(config.classes)
        if len(classes) < 2 or len(set(classes)) != len(classes) or any(not 0 <= c < k for c in classes):
            raise ValueError(
                f"classes must be at least 2 distinct ids in [0, {k}) of {info.name}. Received: {classes}")
        info = dataclasses.replace(info, class_names=tuple(info.class_names[c] for c in classes))
    elif config.dataset != "folder":
        if config.train_size % info.num_classes and config.train_size != info.train_examples:
            raise ValueError(
                f"train_size={config.train_size} is not a multiple of the {info.num_classes} classes of "
                f"{info.name}: use e.g. {config.train_size - config.train_size % info.num_classes}.")
        if config.train_size > info.train_examples:
            raise ValueError(
                f"train_size={config.train_size} is larger than the {info.train_examples} training images "
                f"of {info.name}.")
    if config.validation_size % info.num_classes:
        raise ValueError(
            f"validation_size={config.validation_size} is not a multiple of the {info.num_classes} classes: "
            "the split is class-balanced.")
    return info


def dataset_info(name, data_dir=None):
    """The `DatasetInfo` of `name` ("folder": read from `data_dir`).

    Raises:
        ValueError: an unknown dataset, or a malformed folder dataset.
    """
    if name == "folder":
        return folder_dataset_info(data_dir)
    if name not in DATASETS:
        raise ValueError(
            f"Unknown dataset {name!r}. Allowed: {', '.join(sorted(DATASETS))}, folder."
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
        others = [name for name, other in DATASETS.items() if tuple(other.image_shape) == tuple(x.shape[1:])]
        raise ValueError(
            f"{where}: images must have shape (N, {', '.join(map(str, info.image_shape))}) "
            f"(NHWC). Received shape {x.shape}."
            + (f" Those are the images of {' or '.join(others)}: pass the --dataset they are, or the "
               f"--data_dir of {info.name}." if others else "")
        )
    return x, class_labels(y, where, len(x), info.num_classes)


def class_labels(y, where, size, num_classes=None):
    """`y` as int32 class labels `(N,)` (a trailing axis of 1 is dropped, as
    `keras.datasets` gives them).

    Args:
        where: what the labels are, for the messages ("cifar10 train split", "y").
        size: N, the number of images they label.
        num_classes: K when known: every label must be in [0, K).

    Raises:
        ValueError: naming `where`: labels that are not integers of shape `(N,)` or
            `(N, 1)`, not `size` of them, or outside [0, K) (below 0 when K is not known).
    """
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(
            f"{where}: labels must be integers of shape (N,) or (N, 1). Received dtype {y.dtype}, shape {y.shape} "
            "(one-hot rows: np.argmax(y, axis=1))."
        )
    if len(y) != size:
        raise ValueError(f"{where}: {size} images but {len(y)} labels.")
    if len(y) and (y.min() < 0 or (num_classes is not None and y.max() >= num_classes)):
        raise ValueError(
            f"{where}: labels must be in [0, {num_classes if num_classes is not None else 'K'}). "
            f"Received min {y.min()}, max {y.max()}."
        )
    return y.astype(np.int32)


def _load_npz(directory):
    splits = {}
    for split in ("train", "test"):
        path = os.path.join(directory, f"{split}.npz")
        try:
            with np.load(path) as f:
                splits[split] = (f["x"], f["y"])
        except FileNotFoundError:
            raise ValueError(f"{path} does not exist: --data_dir needs train.npz and test.npz.") from None
        except KeyError as e:
            raise ValueError(f"{path} has no array {e}: it needs arrays x (uint8 NHWC images) and y "
                             "(labels).") from None
        except Exception as e:  # a truncated or corrupt file: zipfile, pickle and OS errors
            raise ValueError(f"{path} is not a readable npz file ({type(e).__name__}: {e}); write it again "
                             "(python -m haet.data --export_dir=...) or point --data_dir elsewhere.") from None
    return splits


# The original CIFAR "python version" archives: folder (or .tar.gz) name, the
# pickles of each split, and the key of the labels.
_CIFAR_PYTHON = {
    "cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz",
                {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
                b"labels"),
    "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz",
                 {"train": ("train",), "test": ("test",)}, b"fine_labels"),
}


def _cifar_python_path(info, data_dir):
    """The CIFAR python folder or archive in `data_dir`, or None."""
    if info.name not in _CIFAR_PYTHON or not data_dir:
        return None
    for candidate in _CIFAR_PYTHON[info.name][:2]:
        if os.path.exists(os.path.join(data_dir, candidate)):
            return os.path.join(data_dir, candidate)
    return None


def _load_cifar_python(info, path):
    """CIFAR-10/100 from the python version's folder or `.tar.gz` at `path`.

    Pickles hold `data` uint8 (N, 3072) in CHW order and a list of labels.
    """
    folder, _, names, label_key = _CIFAR_PYTHON[info.name]
    if os.path.isdir(path):
        def read(name):
            with open(os.path.join(path, name), "rb") as f:
                return pickle.load(f, encoding="bytes")
    else:
        tar = tarfile.open(path, "r:gz")

        def read(name):
            return pickle.load(tar.extractfile(f"{folder}/{name}"), encoding="bytes")
    splits = {}
    for split, batch_names in names.items():
        batches = [read(n) for n in batch_names]
        x = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
        y = np.concatenate([np.asarray(b[label_key]) for b in batches])
        splits[split] = (np.ascontiguousarray(x.transpose(0, 2, 3, 1)), y)
    if not os.path.isdir(path):
        tar.close()
    return splits


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


def folder_dataset_info(data_dir):
    """A `DatasetInfo` for a folder of images: `data_dir/{train,test}/<class name>/*.png`.

    Class names are the sorted subfolder names of `train/` (labels in that order);
    the image shape is the first training image's (all must share it).

    Raises:
        ValueError: missing `train/` or `test/`, no class folders, or a test class
            that training lacks.
    """
    if not data_dir:
        raise ValueError("--dataset=folder needs --data_dir=DIR with DIR/train/<class>/ and DIR/test/<class>/.")
    splits = {}
    for split in ("train", "test"):
        root = os.path.join(data_dir, split)
        if not os.path.isdir(root):
            raise ValueError(f"{root} is not a folder; a folder dataset needs train/<class>/ and test/<class>/.")
        splits[split] = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    classes = splits["train"]
    if len(classes) < 2:
        raise ValueError(f"{data_dir}/train holds {len(classes)} class folders; at least 2 are needed.")
    missing = sorted(set(splits["test"]) - set(classes))
    if missing:
        raise ValueError(f"{data_dir}/test has classes that train/ lacks: {missing}")
    first = next(
        os.path.join(data_dir, "train", c, f) for c in classes
        for f in sorted(os.listdir(os.path.join(data_dir, "train", c))) if f.lower().endswith(IMAGE_SUFFIXES)
    )
    shape = _read_image(first).shape
    counts = {s: sum(len(_image_files(data_dir, s, c)) for c in classes) for s in ("train", "test")}
    return DatasetInfo(name="folder", image_shape=shape, class_names=tuple(classes),
                       train_examples=counts["train"], test_examples=counts["test"], tfds_name="")


def _image_files(data_dir, split, class_name):
    folder = os.path.join(data_dir, split, class_name)
    if not os.path.isdir(folder):
        return []
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))


def _read_image(path):
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image.convert("L" if image.mode in ("L", "1", "I;16") else "RGB"))
    return array[..., None] if array.ndim == 2 else array


def _load_folder(info, data_dir):
    """Images of a folder dataset, in (class, sorted file name) order; uint8 NHWC."""
    splits = {}
    for split in ("train", "test"):
        xs, ys = [], []
        for label, name in enumerate(info.class_names):
            for f in _image_files(data_dir, split, name):
                image = _read_image(os.path.join(data_dir, split, name, f))
                if image.shape != info.image_shape:
                    raise ValueError(
                        f"{os.path.join(data_dir, split, name, f)} has shape {image.shape}; all images "
                        f"must share the first one's {info.image_shape}. Resize them beforehand."
                    )
                xs.append(image)
                ys.append(label)
        splits[split] = (np.stack(xs) if xs else np.zeros((0, *info.image_shape), np.uint8), np.asarray(ys, np.int64))
    return splits


def _canonical_order(ids):
    """Sort order restoring the original file order from tfds ids like b'train_00042'."""
    ids = [i.decode() if isinstance(i, bytes) else str(i) for i in ids]
    return np.argsort([int(i.rsplit("_", 1)[-1]) for i in ids], kind="stable")


def _offline_error(info, e):
    # tensorflow-datasets' messages run to hundreds of lines: the first line says enough.
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return RuntimeError(
        f"Could not load {info.name} with tensorflow-datasets ({type(e).__name__}: "
        f"{first}). Offline? Pass --data_dir=DIR with DIR/train.npz and DIR/test.npz "
        "(arrays x uint8 NHWC, y labels)"
        + (f", or the original {_CIFAR_PYTHON[info.name][1]}"
           if info.name in _CIFAR_PYTHON else "")
        + "."
    )


def _listing(folder):
    try:
        return set(os.listdir(folder))
    except OSError:
        return None


def _download_and_prepare(builder, info, root):
    """`builder.download_and_prepare()`, downloading into a folder of this call's own
    (removed afterwards: the prepared dataset no longer needs the archives) and, when
    it fails, removing what it left: its `incomplete.*` folders, and the dataset's
    folder and `root` if it made them and they are empty. What another process writes
    there meanwhile stays, except the `incomplete.*` folder of a simultaneous download
    of the same dataset into the same folder (which tensorflow-datasets does not
    support either). tensorflow-datasets has no option to clean up
    after a failed download (offline it retries for minutes, then leaves partial
    downloads and an incomplete dataset behind), hence this.
    """
    from absl import logging

    logging.warning("No prepared copy of %s in %s: tensorflow-datasets will download it (offline, it retries "
                    "for minutes before it fails).", info.name, root)
    made_root = not os.path.isdir(root)
    dataset_folder = os.path.join(root, info.tfds_name)
    before = _listing(dataset_folder)
    os.makedirs(root, exist_ok=True)
    downloads = tempfile.mkdtemp(prefix=f"haet-downloads-{info.tfds_name}-", dir=root)
    try:
        builder.download_and_prepare(download_dir=downloads)
    except BaseException:
        for name in (_listing(dataset_folder) or set()) - (before or set()):
            if name.startswith("incomplete."):
                shutil.rmtree(os.path.join(dataset_folder, name), ignore_errors=True)
        raise
    finally:
        shutil.rmtree(downloads, ignore_errors=True)
        for folder, made in ((dataset_folder, before is None), (root, made_root)):
            if made:
                with contextlib.suppress(OSError):
                    os.rmdir(folder)  # only if empty: what another process put there stays


def _load_tfds(info, data_dir):
    """The train and test splits from tensorflow-datasets, downloaded into `data_dir`
    (else its default folder) if it has no prepared copy (`_download_and_prepare`)."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise RuntimeError(
            f"No local copy of {info.name} and tensorflow-datasets is not installed. "
            "Pass --data_dir=DIR with DIR/train.npz and DIR/test.npz "
            "(e.g. from `python -m haet.data --export_dir=DIR` on another machine)."
        ) from e
    try:
        builder = tfds.builder(info.tfds_name, data_dir=data_dir)
        if not builder.is_prepared():
            _download_and_prepare(builder, info, data_dir or tfds.core.constants.DATA_DIR)
    except Exception as e:  # tfds raises many kinds of errors when offline.
        raise _offline_error(info, e) from None
    splits = {}
    for split in ("train", "test"):
        try:
            arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
        except Exception as e:
            raise _offline_error(info, e) from None
        x, y = arrays["image"], arrays["label"]
        if "id" in arrays:
            order = _canonical_order(arrays["id"])
            x, y = x[order], y[order]
        splits[split] = (x, y)
    return splits


def _check_no_local_copy(info, data_dir):
    """Refuses the two ways a local copy is missed before tensorflow-datasets is asked
    for one (a download into `data_dir`): a test.npz without its train.npz, and the
    copy one folder down (`--data_dir=../shared/data` for `../shared/data/cifar10`)."""
    if os.path.exists(os.path.join(data_dir, "test.npz")):
        raise ValueError(f"{data_dir} holds test.npz but no train.npz: --data_dir needs both (python -m haet.data "
                         "--export_dir=DIR writes them).")
    below = os.path.join(data_dir, info.name)
    if os.path.exists(os.path.join(below, "train.npz")) or _cifar_python_path(info, below):
        raise ValueError(f"{data_dir} holds no copy of {info.name}, the folder {below} in it does: pass "
                         f"--data_dir={below}.")


# `load_dataset`'s datasets while `datasets_kept` is active: {(name, data_dir): Dataset}.
_kept = None


@contextlib.contextmanager
def datasets_kept():
    """Within it, `load_dataset` reads each `(name, data_dir)` once: later calls
    return the same `Dataset`, its arrays made read-only (a caller that wrote into
    them would change every later caller's data).

    `haet.search` holds it over a search, so that every trial trains on the data the
    search checked and named by their hash before its first trial, without reading
    them again (CIFAR-10's npz took 0.95-1.44 s a read (three reads) on a 2-core Intel Xeon).
    Not a cache beyond that scope: a later `load_dataset` reads the files again. A
    `functools.lru_cache` would outlive the scope and hold the arrays of every
    dataset ever loaded.
    """
    global _kept
    outer, _kept = _kept, {} if _kept is None else _kept
    try:
        yield
    finally:
        _kept = outer


def load_dataset(name, data_dir=None):
    """Loads dataset `name` as uint8 NHWC arrays in canonical order (inside
    `datasets_kept`: once, then the same read-only arrays).

    Args:
        name: a key of `DATASETS` ("cifar10", "cifar100", "mnist", "fashion_mnist"),
            or "folder" for `data_dir/{train,test}/<class name>/*.png`.
        data_dir: folder with a local copy (see the module docstring), or None to
            use tensorflow-datasets' default folder.

    Returns:
        A `Dataset`; `source` says which copy was read.

    Raises:
        ValueError: unknown dataset, a missing `data_dir`, a `data_dir` holding a
            test.npz alone or the copy in its subfolder named after the dataset, or
            malformed arrays.
        RuntimeError: no local copy and tensorflow-datasets cannot provide one (its
            partial download is removed).
    """
    if data_dir is not None and not os.path.isdir(data_dir):
        raise ValueError(
            f"data_dir {data_dir!r} is not a folder. Pass a folder holding train.npz and "
            "test.npz, or leave it unset to use tensorflow-datasets."
        )
    if _kept is None:
        return _read_dataset(name, data_dir)
    key = (name, None if data_dir is None else os.path.realpath(data_dir))
    if key not in _kept:
        dataset = _read_dataset(name, data_dir)
        for array in (dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test):
            array.flags.writeable = False
        _kept[key] = dataset
    return _kept[key]


def _read_dataset(name, data_dir):
    """`load_dataset`'s reading, every time."""
    info = dataset_info(name, data_dir)
    npz_dir = data_dir and os.path.join(data_dir, "train.npz")
    cifar_py = _cifar_python_path(info, data_dir)
    if data_dir is not None and info.name != "folder" and not os.path.exists(npz_dir) and not cifar_py:
        _check_no_local_copy(info, data_dir)
    if info.name == "folder":
        splits, source = _load_folder(info, data_dir), f"folder:{os.path.abspath(data_dir)}"
    elif npz_dir and os.path.exists(npz_dir):
        splits, source = _load_npz(data_dir), f"npz:{os.path.abspath(data_dir)}"
    elif cifar_py:
        splits, source = _load_cifar_python(info, cifar_py), f"cifar-python:{cifar_py}"
    else:
        splits, source = _load_tfds(info, data_dir), f"tfds:{info.tfds_name}"
    try:
        (x_train, y_train), (x_test, y_test) = (
            validate_arrays(*splits[s], info, s) for s in ("train", "test")
        )
    except ValueError as e:
        raise ValueError(f"{e} (Read from {source}.)") from None
    return Dataset(info, x_train, y_train, x_test, y_test, source)


def one_hot(labels, num_classes):
    """float32 `(N, num_classes)` one-hot rows of int labels `(N,)` (`keras.utils.to_categorical`)."""
    return keras.utils.to_categorical(labels, num_classes).astype(np.float32)


def select_classes(dataset, classes):
    """The dataset restricted to `classes`, relabelled `0..len(classes)-1` in that order.

    E.g. MNIST digits 5-9 become classes 0-4 (the transfer-learning setting of the
    Keras example "Transfer learning toy example": train on 0-4, fine-tune on 5-9).

    Args:
        dataset: a `Dataset`.
        classes: distinct class ids of `dataset` (at least 2); empty: all classes.

    Returns:
        A `Dataset` whose `info` has the kept class names, split sizes and a name
        like "mnist[5,6,7,8,9]".

    Raises:
        ValueError: fewer than 2 classes, repeated or unknown ids.
    """
    if not classes:
        return dataset
    classes = [int(c) for c in classes]
    k = dataset.info.num_classes
    if len(classes) < 2 or len(set(classes)) != len(classes) or any(not 0 <= c < k for c in classes):
        raise ValueError(
            f"classes must be at least 2 distinct ids in [0, {k}) of {dataset.info.name}. Received: {classes}")
    table = np.full(k, -1, dtype=np.int32)
    table[classes] = np.arange(len(classes), dtype=np.int32)

    def keep(x, y):
        mask = table[y] >= 0
        return x[mask], table[y[mask]]

    x_train, y_train = keep(dataset.x_train, dataset.y_train)
    x_test, y_test = keep(dataset.x_test, dataset.y_test)
    info = dataclasses.replace(
        dataset.info, name=f"{dataset.info.name}[{','.join(map(str, classes))}]",
        class_names=tuple(dataset.info.class_names[c] for c in classes),
        train_examples=len(y_train), test_examples=len(y_test))
    return Dataset(info, x_train, y_train, x_test, y_test, dataset.source)


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


_EXPORTED = ("train.npz", "test.npz", "subset.json")


def check_export_dir(export_dir):
    """Checks that `export_subset` can write into `export_dir`: a folder (or a path
    where one can be made) holding none of its three files.

    Raises:
        ValueError: naming the path and the fix.
    """
    if not export_dir:
        raise ValueError("--export_dir is empty: pass --export_dir=FOLDER, an empty or new folder.")
    results.check_results_dir(export_dir, "--export_dir")
    existing = [n for n in _EXPORTED if os.path.lexists(os.path.join(export_dir, n))]
    if existing:
        raise ValueError(f"--export_dir={export_dir!r} already holds {', '.join(existing)}; choose an empty "
                         "folder (nothing is overwritten).")


def export_subset(dataset, indices, export_dir, subset_seed):
    """Writes the training subset, the test split and `subset.json` into `export_dir`,
    all three or none: a failed write (a full disk) removes those this call wrote.

    Raises:
        FileExistsError: one of the three files already exists (`check_export_dir`
            says which beforehand); none is written.
        OSError: a file could not be written (none of the three is left).
    """
    os.makedirs(export_dir, exist_ok=True)
    x, y = dataset.x_train[indices], dataset.y_train[indices]
    subset = {
        "dataset": dataset.info.name,
        "source": dataset.source,
        "subset_seed": subset_seed,
        "train_size": len(indices),
        "subset_sha256": subset_sha256(x, y),
        "indices": [int(i) for i in indices],
    }
    results.write_new_files(export_dir, {
        "train.npz": lambda path: np.savez(path, x=x, y=y.astype(np.uint8)),
        "test.npz": lambda path: np.savez(path, x=dataset.x_test, y=dataset.y_test.astype(np.uint8)),
        "subset.json": json.dumps(subset),
    })


def main(argv):
    """`python -m haet.data`: loads a dataset, draws the training subset, logs its
    per-class counts and sha256, and with --export_dir writes it as npz files. Bad
    flags, data or export folder: `app.UsageError` (exit status 2), nothing written."""
    from absl import app, flags, logging

    del argv  # (haet.cli.run refuses arguments other than flags)
    f = flags.FLAGS
    try:
        if f.train_size < 0:
            raise ValueError(f"--train_size must be >= 0 (0: all training images). Received: {f.train_size}")
        if f.export_dir is not None:
            check_export_dir(f.export_dir)
        dataset = load_dataset(f.dataset, f.data_dir)
        train_size = f.train_size or len(dataset.y_train)
        indices = stratified_subset(
            dataset.y_train, train_size, dataset.info.num_classes, f.subset_seed
        )
    except (ValueError, RuntimeError) as e:  # RuntimeError: no local copy of the data
        raise app.UsageError(str(e)) from None
    x, y = dataset.x_train[indices], dataset.y_train[indices]
    logging.info(
        "%s from %s: subset of %d training images (seed %d), per class %s, sha256 %s",
        f.dataset, dataset.source, len(indices), f.subset_seed,
        np.bincount(y, minlength=dataset.info.num_classes).tolist(), subset_sha256(x, y),
    )
    if f.export_dir is not None:
        try:
            export_subset(dataset, indices, f.export_dir, f.subset_seed)
        except OSError as e:  # none of the three files is left
            cli.not_written(f"--export_dir={f.export_dir}", e)
        logging.info("Wrote %s", f.export_dir)


if __name__ == "__main__":
    from absl import flags

    flags.DEFINE_enum("dataset", "cifar10", sorted(DATASETS) + ["folder"], "Dataset name.")
    flags.DEFINE_string("data_dir", None, "Folder with a local copy; default: tensorflow-datasets.")
    flags.DEFINE_integer("train_size", 5000, "Training images to keep, class-balanced; 0 = all.")
    flags.DEFINE_integer("subset_seed", 0, "Seed choosing the training subset.")
    flags.DEFINE_string("export_dir", None, "Write the subset and test split as npz here.")
    cli.run(main)
