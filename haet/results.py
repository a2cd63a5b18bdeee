"""Results are data: every run writes a folder that is never overwritten.

`RUN_DIR/record.json` (flags, versions, device, commit, timings, accuracy),
`RUN_DIR/history.csv` (one row per epoch), `RUN_DIR/confusion_matrix.csv` (test set),
`RUN_DIR/learning_curves.png` and `RUN_DIR/model.keras`.
"""

import csv
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess

# Published numbers in the HAET-2021 CIFAR-10 setting (5,000 training images,
# 10 minutes on one GPU), for the record's comparison field.
PUBLISHED = {
    "umbc_resnet20x6": {
        "test_accuracy": 0.851,
        "source": "Hosseini, Prakash, Pirsiavash, Mohsenin (UMBC), ICLR 2021 HAET "
        "workshop; xmhosseini/HAET2021",
        "protocol": "V100, TF 2.4.1, 10 min; random unstratified 10% train sample; "
        "random 1,000-image test subset; checkpoint with the best accuracy on that "
        "test subset kept",
    }
}

_PACKAGES = ("keras", "tensorflow", "jax", "jaxlib", "numpy", "absl-py", "tensorflow-datasets")


def versions():
    """Python and package versions (absent packages are left out): dict str -> str."""
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def git_commit(path=None):
    """The checkout's commit hash, with "-dirty" if tracked files changed; None if not a git checkout."""
    path = path or os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=path, capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def make_run_dir(results_dir, name):
    """Creates and returns a new folder `results_dir/<UTC time>_<name>[_k]`.

    Never reuses an existing folder: a suffix `_1`, `_2`... is added if needed.
    """
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    os.makedirs(results_dir, exist_ok=True)
    base = os.path.join(results_dir, f"{stamp}_{name}")
    path, k = base, 0
    while True:
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            k += 1
            path = f"{base}_{k}"


def _write_new(path, write):
    """Writes a file that must not exist yet (mode 'x')."""
    with open(path, "x", newline="") as f:
        write(f)


def write_record(run_dir, record):
    """Writes `record` (JSON-serializable dict) to `run_dir/record.json`."""
    path = os.path.join(run_dir, "record.json")
    _write_new(path, lambda f: json.dump(record, f, indent=2, sort_keys=True))
    return path


def write_csv(run_dir, name, rows):
    """Writes rows (dicts with the same keys, e.g. the per-epoch history) to a new `run_dir/name`."""
    path = os.path.join(run_dir, name)

    def write(f):
        if rows:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)

    _write_new(path, write)
    return path


def write_confusion_matrix(run_dir, matrix, class_names):
    """Writes `matrix` (rows: true class, columns: predicted) to `run_dir/confusion_matrix.csv`."""
    path = os.path.join(run_dir, "confusion_matrix.csv")

    def write(f):
        w = csv.writer(f)
        w.writerow(["true \\ predicted", *class_names])
        for name, row in zip(class_names, matrix):
            w.writerow([name, *(int(v) for v in row)])

    _write_new(path, write)
    return path
