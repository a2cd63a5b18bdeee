import os
import pathlib
import pickle
import subprocess
import sys
import shutil
import tarfile
import types

import numpy as np
import pytest

from conftest import REPO, shared_dataset_dir
from haet import data


def test_stratified_subset_is_balanced_sorted_and_deterministic(cifar10_arrays):
    y = cifar10_arrays[1]
    idx = data.stratified_subset(y, 5000, 10, seed=0)
    assert len(idx) == 5000 and len(np.unique(idx)) == 5000
    assert np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(np.bincount(y[idx], minlength=10), [500] * 10)
    np.testing.assert_array_equal(idx, data.stratified_subset(y, 5000, 10, seed=0))
    other = data.stratified_subset(y, 5000, 10, seed=1)
    assert len(np.intersect1d(idx, other)) < 1000  # ~10% overlap expected by chance


def test_subset_depends_only_on_labels_and_seed():
    y = np.repeat(np.arange(4), 5)
    a = data.stratified_subset(y, 8, 4, seed=3)
    b = data.stratified_subset(y.copy(), 8, 4, seed=3)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.bincount(y[a]), [2, 2, 2, 2])


def test_full_size_takes_everything_even_when_unbalanced():
    y = np.array([0, 0, 0, 1])
    np.testing.assert_array_equal(data.stratified_subset(y, 4, 2, seed=0), [0, 1, 2, 3])


@pytest.mark.parametrize(
    "train_size, message",
    [(15, "not a multiple of the 10 classes; use e.g. 10 or 20"),
     (60, "larger than the 50 training images"),
     (0, "positive integer"),
     (40, "needs 4 images of class 9, which has only 1")],
)
def test_bad_train_size(train_size, message):
    y = np.concatenate([np.repeat(np.arange(9), 5), [9], np.zeros(4, int)])
    with pytest.raises(ValueError, match=message):
        data.stratified_subset(y, train_size, 10, seed=0)


def test_load_real_cifar10_npz():
    ds = data.load_dataset("cifar10", shared_dataset_dir("cifar10"))
    assert ds.x_train.shape == (50000, 32, 32, 3) and ds.x_train.dtype == np.uint8
    assert ds.x_test.shape == (10000, 32, 32, 3)
    assert ds.y_train.dtype == np.int32 and ds.y_train.shape == (50000,)
    # Canonical order: the first training image is a frog (6), the first test image a cat (3).
    assert ds.y_train[0] == 6 and ds.y_test[0] == 3
    # Mean documented in ../shared/data/cifar10/README.md.
    np.testing.assert_allclose(ds.x_train.mean(axis=(0, 1, 2)) / 255, [0.4914, 0.4822, 0.4465], atol=1e-4)


def test_load_real_mnist_npz():
    ds = data.load_dataset("mnist", shared_dataset_dir("mnist"))
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.info.num_classes == 10
    assert np.bincount(ds.y_test).tolist()[:3] == [980, 1135, 1032]


def _write_cifar_python(folder, x, y, per_batch):
    """Writes CIFAR-10 python pickles (data (N, 3072) in CHW order) for (x, y)."""
    os.makedirs(folder)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        sl = slice(k * per_batch, (k + 1) * per_batch)
        batch = {b"data": x[sl].transpose(0, 3, 1, 2).reshape(-1, 3072), b"labels": list(map(int, y[sl]))}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f)


def test_cifar10_python_folder_and_tarball_match_npz(tmp_path, cifar10_arrays):
    x, y = cifar10_arrays[0][:60], cifar10_arrays[1][:60]
    root = tmp_path / "py"
    _write_cifar_python(str(root / "cifar-10-batches-py"), x, y, per_batch=10)
    ds = data.load_dataset("cifar10", str(root))
    assert ds.source.startswith("cifar-python:")
    np.testing.assert_array_equal(ds.x_train, x[:50])
    np.testing.assert_array_equal(ds.y_train, y[:50])
    np.testing.assert_array_equal(ds.x_test, x[50:])

    tar_root = tmp_path / "tar"
    tar_root.mkdir()
    with tarfile.open(tar_root / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(root / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    ds_tar = data.load_dataset("cifar10", str(tar_root))
    np.testing.assert_array_equal(ds_tar.x_train, x[:50])
    np.testing.assert_array_equal(ds_tar.y_test, y[50:])


def _fake_tfds(monkeypatch, load, prepare=None, default_dir="/nonexistent/tensorflow_datasets"):
    """tensorflow-datasets as haet calls it: `builder(name, data_dir=)` with `is_prepared`,
    `download_and_prepare(download_dir=)` (`prepare(data_dir, download_dir)`, if given) and
    `as_dataset(split=, batch_size=)` (`load(name, split, data_dir, batch_size)`)."""

    class Builder:
        def __init__(self, name, data_dir=None):
            self.name, self.data_dir = name, data_dir

        def is_prepared(self):
            return prepare is None

        def download_and_prepare(self, download_dir):
            prepare(self.data_dir, download_dir)

        def as_dataset(self, split, batch_size):
            return load(self.name, split=split, data_dir=self.data_dir, batch_size=batch_size)

    constants = types.SimpleNamespace(DATA_DIR=default_dir)
    module = types.SimpleNamespace(builder=Builder, as_numpy=lambda d: d,
                                   core=types.SimpleNamespace(constants=constants))
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", module)


def test_tfds_order_is_restored_from_ids(monkeypatch, cifar10_arrays):
    x, y = cifar10_arrays[0][:20], cifar10_arrays[1][:20]
    shuffle = np.random.default_rng(0).permutation(20)

    def load(name, split, data_dir, batch_size):
        assert name == "cifar10" and batch_size == -1
        ids = np.array([f"{split}_{i:05d}".encode() for i in range(20)])
        return {"image": x[shuffle], "label": y[shuffle].astype(np.int64), "id": ids[shuffle]}

    _fake_tfds(monkeypatch, load)
    ds = data.load_dataset("cifar10", None)
    assert ds.source == "tfds:cifar10"
    np.testing.assert_array_equal(ds.x_train, x)
    np.testing.assert_array_equal(ds.y_test, y)


def test_offline_without_local_copy_says_how_to_provide_data_and_leaves_no_partial_download(monkeypatch, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "other.tar.gz").write_text("an earlier download")
    seen = []

    def prepare(data_dir, download_dir):
        # What tensorflow-datasets leaves behind offline: partial downloads, an incomplete dataset folder;
        # meanwhile another process prepares another version in the same folder.
        root = pathlib.Path(data_dir or "/nonexistent")
        seen.append(download_dir)
        assert pathlib.Path(download_dir).parent == root and os.listdir(download_dir) == []
        (pathlib.Path(download_dir) / "cifar10" / "cifar-10-binary.tar.gz.tmp.1").mkdir(parents=True)
        (pathlib.Path(download_dir) / "extracted").mkdir()
        (root / "cifar10" / f"incomplete.{len(seen)}_3.0.2").mkdir(parents=True, exist_ok=True)
        (root / "cifar10" / "3.0.1").mkdir(exist_ok=True)  # another process's
        raise ConnectionError("no route to host")

    def load(*args, **kwargs):
        pytest.fail("read after a failed download")

    _fake_tfds(monkeypatch, load, prepare)
    with pytest.raises(RuntimeError, match=r"Offline\? Pass --data_dir=DIR.*cifar-10-python.tar.gz"):
        data.load_dataset("cifar10", str(tmp_path))
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "cifar10", "cifar10/3.0.1", "downloads", "downloads/other.tar.gz", "notes.txt"]
    # The dataset's folder that was there before stays whole, and so does another process's version.
    with pytest.raises(RuntimeError, match="Offline"):
        data.load_dataset("cifar10", str(tmp_path))
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "cifar10", "cifar10/3.0.1", "downloads", "downloads/other.tar.gz", "notes.txt"]
    # A default folder it made, left empty, is removed; an interrupted download cleans up too.
    default = tmp_path / "default"

    def interrupted(data_dir, download_dir):
        assert data_dir is None and pathlib.Path(download_dir).parent == default
        (default / "cifar10" / "incomplete.9_3.0.2").mkdir(parents=True)
        raise KeyboardInterrupt

    _fake_tfds(monkeypatch, load, interrupted, default_dir=str(default))
    with pytest.raises(KeyboardInterrupt):
        data.load_dataset("cifar10")
    assert not default.exists()


def test_a_prepared_download_is_read_and_its_archives_removed(monkeypatch, tmp_path, cifar10_arrays):
    x, y = cifar10_arrays[0][:10], cifar10_arrays[1][:10]

    def prepare(data_dir, download_dir):
        (pathlib.Path(download_dir) / "cifar-10-binary.tar.gz").write_text("archive")
        (pathlib.Path(data_dir) / "cifar10" / "3.0.2").mkdir(parents=True)

    _fake_tfds(monkeypatch, lambda name, split, data_dir, batch_size: {"image": x, "label": y}, prepare)
    assert data.load_dataset("cifar10", str(tmp_path)).source == "tfds:cifar10"
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["cifar10", "cifar10/3.0.2"]


def test_a_copy_missed_by_one_folder_or_file_is_refused_before_tensorflow_datasets_downloads(
        monkeypatch, tmp_path, cifar10_slice_dir):
    _fake_tfds(monkeypatch, lambda *args, **kwargs: pytest.fail("tensorflow-datasets was asked"))
    shutil.copytree(cifar10_slice_dir, tmp_path / "cifar10")
    with pytest.raises(ValueError, match=rf"{tmp_path} holds no copy of cifar10, the folder {tmp_path}/cifar10 in "
                                         rf"it does: pass --data_dir={tmp_path}/cifar10\."):
        data.load_dataset("cifar10", str(tmp_path))
    os.remove(tmp_path / "cifar10" / "train.npz")
    with pytest.raises(ValueError, match="holds test.npz but no train.npz: --data_dir needs both"):
        data.load_dataset("cifar10", str(tmp_path / "cifar10"))


@pytest.mark.parametrize(
    "x, y, message",
    [
        (np.zeros((4, 32, 32, 3), np.float32), np.zeros(4, int), "must be uint8"),
        (np.zeros((4, 32, 32), np.uint8), np.zeros(4, int), r"shape \(N, 32, 32, 3\)"),
        (np.zeros((4, 28, 28, 3), np.uint8), np.zeros(4, int), r"Received shape \(4, 28, 28, 3\)\. \(Read from npz:"),
        (np.zeros((4, 28, 28, 1), np.uint8), np.zeros(4, int),
         r"Those are the images of fashion_mnist or mnist: pass the --dataset they are, or the --data_dir of "
         r"cifar10\. \(Read from npz:/"),
        (np.zeros((4, 32, 32, 3), np.uint8), np.zeros(3, int), "4 images but 3 labels"),
        (np.zeros((4, 32, 32, 3), np.uint8), np.array([0, 1, 2, 10]), r"labels must be in \[0, 10\)"),
        (np.zeros((4, 32, 32, 3), np.uint8), np.zeros(4, float), "labels must be integers"),
    ],
)
def test_malformed_arrays_are_rejected(tmp_path, x, y, message):
    np.savez(tmp_path / "train.npz", x=x, y=y)
    np.savez(tmp_path / "test.npz", x=np.zeros((2, 32, 32, 3), np.uint8), y=np.zeros(2, int))
    with pytest.raises(ValueError, match=message):
        data.load_dataset("cifar10", str(tmp_path))


def test_column_labels_are_flattened():
    info = data.dataset_info("cifar10")
    _, y = data.validate_arrays(np.zeros((2, 32, 32, 3), np.uint8), np.array([[1], [2]]), info, "train")
    assert y.shape == (2,) and y.dtype == np.int32


def test_unknown_dataset_and_missing_folder():
    with pytest.raises(ValueError, match="Unknown dataset .cifar11.. Allowed: cifar10, cifar100, fashion_mnist, mnist, folder"):
        data.load_dataset("cifar11")
    with pytest.raises(ValueError, match="is not a folder"):
        data.load_dataset("cifar10", "/nonexistent/folder")


@pytest.mark.e2e
def test_export_cli_writes_subset_and_refuses_to_overwrite(tmp_path, cifar10_slice_dir):
    out = tmp_path / "export"
    cmd = [sys.executable, "-m", "haet.data", "--dataset=cifar10", f"--data_dir={cifar10_slice_dir}",
           "--train_size=200", "--subset_seed=5", f"--export_dir={out}"]
    env = dict(os.environ, PYTHONPATH=REPO)
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    exported = data.load_dataset("cifar10", str(out))
    original = data.load_dataset("cifar10", cifar10_slice_dir)
    idx = data.stratified_subset(original.y_train, 200, 10, seed=5)
    np.testing.assert_array_equal(exported.x_train, original.x_train[idx])
    np.testing.assert_array_equal(exported.x_test, original.x_test)
    # Re-selecting from the export (train_size == its size) keeps it whole: same sha256.
    again = data.stratified_subset(exported.y_train, 200, 10, seed=123)
    assert data.subset_sha256(exported.x_train[again], exported.y_train[again]) == \
        data.subset_sha256(original.x_train[idx], original.y_train[idx])
    before = (out / "train.npz").read_bytes()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert result.returncode == 2 and "already holds train.npz, test.npz, subset.json" in result.stderr
    assert "haet.data: error: " in result.stderr and "Traceback" not in result.stderr
    assert (out / "train.npz").read_bytes() == before
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    into_file = subprocess.run([*cmd[:-1], f"--export_dir={a_file}"], env=env, capture_output=True, text=True)
    assert into_file.returncode == 2 and "is a file, not a folder" in into_file.stderr
    assert "Traceback" not in into_file.stderr and a_file.read_text() == ""


def test_cifar100_python_tarball(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (12, 32, 32, 3)).astype(np.uint8)
    y = np.arange(12) * 8  # fine labels up to 88
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, sl in (("train", slice(0, 8)), ("test", slice(8, 12))):
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": x[sl].transpose(0, 3, 1, 2).reshape(-1, 3072),
                         b"fine_labels": list(map(int, y[sl])), b"coarse_labels": [0] * len(y[sl])}, f)
    with tarfile.open(tmp_path / "cifar-100-python.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname="cifar-100-python")
    import shutil
    shutil.rmtree(folder)
    ds = data.load_dataset("cifar100", str(tmp_path))
    assert ds.info.num_classes == 100 and ds.info.class_names[88] == "tiger" and ds.info.class_names[99] == "worm"
    np.testing.assert_array_equal(ds.x_train, x[:8])
    np.testing.assert_array_equal(ds.y_test, y[8:])


@pytest.mark.parametrize("name, shape, classes", [("cifar100", (32, 32, 3), 100), ("fashion_mnist", (28, 28, 1), 10)])
def test_tfds_path_for_datasets_we_cannot_download(monkeypatch, name, shape, classes):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (30, *shape)).astype(np.uint8)
    y = (np.arange(30) * 7) % classes

    def load(tfds_name, split, data_dir, batch_size):
        assert tfds_name == name
        return {"image": x, "label": y}  # fashion_mnist has no ids: tfds order kept

    _fake_tfds(monkeypatch, load)
    ds = data.load_dataset(name)
    assert ds.x_train.shape == (30, *shape) and ds.info.num_classes == classes
    np.testing.assert_array_equal(ds.y_train, y)


def test_image_folder_dataset(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(2)
    written = {}
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "ant", "bee"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                image = rng.integers(0, 256, (12, 10, 3)).astype(np.uint8)
                Image.fromarray(image).save(tmp_path / split / cls / f"{i}.png")
                written[(split, cls, i)] = image
    ds = data.load_dataset("folder", str(tmp_path))
    assert ds.info.class_names == ("ant", "bee", "cat") and ds.info.image_shape == (12, 10, 3)
    assert ds.x_train.shape == (9, 12, 10, 3) and ds.x_test.shape == (6, 12, 10, 3)
    np.testing.assert_array_equal(ds.y_train, [0, 0, 0, 1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(ds.x_train[0], written[("train", "ant", 0)])
    np.testing.assert_array_equal(ds.x_test[5], written[("test", "cat", 1)])
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(tmp_path / "train" / "ant" / "9.png")
    with pytest.raises(ValueError, match=r"9.png has shape \(5, 5, 3\); all images must share the first one's \(12, 10, 3\)"):
        data.load_dataset("folder", str(tmp_path))
    with pytest.raises(ValueError, match="needs --data_dir"):
        data.load_dataset("folder")


def test_the_download_path_imports_without_the_network(monkeypatch, tmp_path):
    """tensorflow-datasets' CIFAR-10 builder can be made with what haet installs (its
    undeclared importlib_resources among it) and no network."""
    import socket

    tfds = pytest.importorskip("tensorflow_datasets")

    def no_network(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    builder = tfds.builder("cifar10", data_dir=str(tmp_path))
    assert builder.info.features["label"].num_classes == 10 and builder.info.splits is not None


def test_an_offline_error_is_one_short_line(monkeypatch, tmp_path):
    def load(*args, **kwargs):
        raise ConnectionError("Failed to download\n" + "\n".join(f"  traceback line {i}" for i in range(190)))

    _fake_tfds(monkeypatch, load)
    with pytest.raises(RuntimeError) as error:
        data.load_dataset("cifar10", str(tmp_path))
    message = str(error.value)
    assert len(message.splitlines()) == 1 and "(ConnectionError: Failed to download)" in message
    assert "Offline? Pass --data_dir=DIR" in message and error.value.__cause__ is None


def test_an_export_that_fails_leaves_none_of_its_files(tmp_path, cifar10_slice_dir, monkeypatch):
    import errno

    dataset = data.load_dataset("cifar10", cifar10_slice_dir)
    indices = data.stratified_subset(dataset.y_train, 100, 10, seed=0)
    savez = np.savez

    def full_at_the_test_split(path, **arrays):
        if "test" in os.path.basename(path):
            raise OSError(errno.ENOSPC, "No space left on device", path)
        savez(path, **arrays)

    monkeypatch.setattr(np, "savez", full_at_the_test_split)
    with pytest.raises(OSError, match="No space left"):
        data.export_subset(dataset, indices, str(tmp_path / "export"), 0)
    assert os.listdir(tmp_path / "export") == []  # train.npz, written first, is removed too
    monkeypatch.setattr(np, "savez", savez)
    data.export_subset(dataset, indices, str(tmp_path / "export"), 0)  # the rerun is not refused
    assert sorted(os.listdir(tmp_path / "export")) == ["subset.json", "test.npz", "train.npz"]


def test_datasets_kept_reads_a_dataset_once_and_hands_out_read_only_arrays(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("test", 10)):
        np.savez(tmp_path / f"{split}.npz", x=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 y=np.arange(n) % 10)
    reads = []
    read = data._load_npz
    monkeypatch.setattr(data, "_load_npz", lambda d: reads.append(d) or read(d))
    with data.datasets_kept():
        first = data.load_dataset("cifar10", str(tmp_path))
        # The same folder by another path, and a scope inside the first: no new read.
        with data.datasets_kept():
            again = data.load_dataset("cifar10", str(tmp_path) + "/")
        assert again is first and len(reads) == 1
        for array in (first.x_train, first.y_train, first.x_test, first.y_test):
            with pytest.raises(ValueError, match="read-only"):
                array[0] = 0
        # Another dataset name is another dataset (the folder refused as MNIST, before any read).
        with pytest.raises(ValueError, match="shape"):
            data.load_dataset("mnist", str(tmp_path))
        assert len(reads) == 2
    # Outside the scope: read every time, arrays of its own, writable.
    outside = data.load_dataset("cifar10", str(tmp_path))
    assert len(reads) == 3 and outside is not first and outside.x_train.flags.writeable
    np.testing.assert_array_equal(outside.x_train, first.x_train)
