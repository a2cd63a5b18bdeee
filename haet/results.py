"""Results are data: every run writes a folder that is never overwritten.

`RUN_DIR/record.json` (flags, versions, device, commit, timings, accuracy, status),
`RUN_DIR/history.csv` (one row per epoch), `RUN_DIR/confusion_matrix.csv` (test set),
`RUN_DIR/learning_curves.png`, `RUN_DIR/model.keras` and, while a run can still be
resumed, `RUN_DIR/checkpoint.npz` (`haet.checkpoint`).

The record exists from the start of a run: `RunFolder` writes it with
`status: "running"` before the model is built, appends each epoch's history row as
the epoch ends, and replaces the record atomically (a new file renamed over the
old) when the run ends as one of `STATUSES`. Records are strict JSON: a non-finite
number is written as null (`json_safe`).
"""

import contextlib
import csv
import dataclasses
import datetime
import importlib.metadata
import io
import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys

import numpy as np
from absl import logging

# How a run ended. "running": the run's process has not ended it (or was killed).
STATUSES = ("running", "completed", "interrupted", "diverged", "failed")

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


def _backend():
    import keras

    return keras.backend.backend()


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


def _nearest_existing(path):
    """The deepest part of the absolute `path` that exists (the path itself if it does)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    return probe


def check_results_dir(results_dir, flag="--results_dir", file_flag=None):
    """Checks, before any work, that run folders can be made under `results_dir`
    (given by the flag `flag`; or, with `file_flag` (e.g. "--out"), the folder of
    that flag's file).

    Raises:
        ValueError: `results_dir` (or a parent of it) is a file, or the folder that
            would hold it cannot be written; the message names the path and the fix.
    """
    probe = _nearest_existing(results_dir)
    name = f"{file_flag.lstrip('-')}'s folder" if file_flag else flag.lstrip("-")
    if not os.path.isdir(probe):
        raise ValueError(f"{name} {results_dir!r} cannot be made: {probe!r} is a file, not a folder. " + (
            f"Pass {file_flag}=FILE in a folder, or where one can be made." if file_flag else
            f"Pass {flag}=FOLDER (a folder, or a path where one can be made)."))
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{name} {results_dir!r} cannot be written: no write permission on {probe!r}. " + (
            f"Pass {file_flag}=FILE in a writable folder." if file_flag else f"Pass {flag}=FOLDER somewhere writable."))


def check_new_file(path, flag):
    """Checks, before any work, that the file `path` (given by the flag `flag`, e.g.
    "--out") does not exist and can be made: its missing parent folders are made by
    `make_parents` when the file is written.

    Raises:
        ValueError: `path` exists (nothing is overwritten), is empty, or a parent of it
            is a file or cannot be written; the message names the path and the fix.
    """
    if not path:
        raise ValueError(f"{flag} is empty: pass {flag}=FILE, a new file.")
    if os.path.isdir(path) or path.endswith(os.sep):
        raise ValueError(f"{flag}={path!r} is a folder: pass {flag}=FILE, a new file in it.")
    if os.path.lexists(path):
        raise ValueError(f"{flag}={path!r} exists and is not overwritten: choose a new file.")
    probe = _nearest_existing(os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(probe):
        raise ValueError(f"{flag}={path!r} cannot be made: {probe!r} is a file, not a folder.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{flag}={path!r} cannot be written: no write permission on {probe!r}.")


def make_parents(path):
    """Makes the missing parent folders of the file `path`; returns `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return path


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


def json_safe(value):
    """`value` as strict JSON data: NumPy scalars and arrays as Python numbers and
    lists, tuples as lists, non-finite floats (NaN, +-inf) as None."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_new_file(path, write):
    """Writes the new file `path` whole or not at all: `write(temporary)` fills a
    temporary sibling with the same suffix (matplotlib, NumPy and Keras read the format
    from it), which is then renamed to `path`. On any failure (a full disk, a
    read-only folder, an exception in `write`) the temporary is removed and nothing is
    left at `path`, so a rerun is not refused by a truncated file. Returns `path`.

    Raises:
        FileExistsError: `path` exists (checked before `write` and again before the
            rename; nothing is replaced).
        OSError: the write or the rename failed.
    """
    if os.path.lexists(path):
        raise FileExistsError(f"{path} exists and is not overwritten")
    folder, name = os.path.split(os.path.abspath(path))
    stem, suffix = os.path.splitext(name)
    temporary = os.path.join(folder, f".{stem}.tmp{os.getpid()}{suffix}")
    try:
        write(temporary)
        try:
            os.link(temporary, path)  # fails if `path` appeared meanwhile
        except FileExistsError:
            raise FileExistsError(f"{path} exists and is not overwritten") from None
        except OSError:  # a file system without hard links
            if os.path.lexists(path):
                raise FileExistsError(f"{path} exists and is not overwritten") from None
            os.replace(temporary, path)
    finally:
        _remove(temporary)
    return path


def _write_text(path, text):
    with open(path, "x", newline="") as f:
        f.write(text)


def write_new_text(path, text):
    """Writes `text` to the new file `path`, whole or not at all (`write_new_file`)."""
    return write_new_file(path, lambda temporary: _write_text(temporary, text))


def write_new_files(folder, files):
    """Writes the new files of `files` (name -> text, or a function filling the path
    it is given) into `folder`, all of them or none: after a failure, those already
    written are removed.

    Raises:
        FileExistsError, OSError: as `write_new_file`; none of the files is left.
    """
    written = []
    try:
        for name, content in files.items():
            path = os.path.join(folder, name)
            written.append(write_new_text(path, content) if isinstance(content, str)
                           else write_new_file(path, content))
    except BaseException:
        for path in written:
            _remove(path)
        raise
    return written


def write_run_folder(results_dir, name, files):
    """A new folder `results_dir/<UTC time>_<name>` (`make_run_dir`) holding `files`
    (`write_new_files`), or none: after a failed write the folder is removed, so a
    results scan meets no half-written folder. Returns its path.

    Raises:
        OSError: a file or the folder could not be written.
    """
    path = make_run_dir(results_dir, name)
    try:
        write_new_files(path, files)
    except BaseException:
        _remove(path)
        raise
    return path


def write_json_atomic(path, data):
    """Writes `json_safe(data)` to `path` through a temporary file renamed over it, so
    a reader (or a crash) sees the old file or the new one, never a part."""
    write_text_atomic(path, record_text(data))


def write_text_atomic(path, text):
    """(Re)writes the text file `path` through a temporary file renamed over it: a
    reader (or a crash, or a full disk) sees the old file or the new one, never a part.

    Raises:
        OSError: the write failed; `path` is as it was, the temporary removed.
    """
    temporary = f"{path}.tmp{os.getpid()}"
    try:
        with open(temporary, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
    return path


def record_text(record):
    """`record` as the text of a `record.json`: strict JSON (see `json_safe`), sorted keys."""
    return json.dumps(json_safe(record), indent=2, sort_keys=True, allow_nan=False) + "\n"


def write_record(run_dir, record):
    """Writes `record` to a new `run_dir/record.json` (strict JSON, see `json_safe`)."""
    return write_new_text(os.path.join(run_dir, "record.json"), record_text(record))


def read_record(run_dir):
    """The record of run folder `run_dir` (a dict).

    Raises:
        ValueError: no readable JSON object at `run_dir/record.json`, naming the file.
    """
    path = os.path.join(run_dir, "record.json")
    try:
        with open(path) as f:
            record = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist: expected the folder of a python -m haet.train run.") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a readable run record: {e}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path} is not a run record (a JSON object).")
    return record


class RunFolder:
    """The folder of one run, written while the run goes (see the module docstring).

    Attributes:
        path: the folder.
        record: the record as last written (a dict).
        artifact_errors: file name -> error text, for the files that could not be
            written (a full disk...); the run goes on without them.

    Args:
        path: an existing folder (`make_run_dir`, or a run folder being resumed).
        record: the record to start from.
    """

    def __init__(self, path, record):
        self.path = path
        self.record = dict(record)
        self.artifact_errors = dict(record.get("artifact_errors") or {})
        self._history_fields = None

    @classmethod
    def create(cls, results_dir, name, record):
        """Makes a new run folder under `results_dir` and writes `record` there
        (with `status` "running" unless it says otherwise and `run_dir`)."""
        path = make_run_dir(results_dir, name)
        folder = cls(path, {"status": "running", **record, "run_dir": path})
        folder.write_record()
        return folder

    def update(self, **fields):
        """Adds `fields` to the record and writes it again."""
        self.record.update(fields)
        self.write_record()

    def write_record(self, record=None):
        """Replaces `record.json` atomically with `record` (or the current one).

        A write that fails is logged and kept in `artifact_errors`, not raised; the
        record stays in memory.
        """
        if record is not None:
            self.record = dict(record)
        if self.artifact_errors:
            self.record["artifact_errors"] = dict(self.artifact_errors)
        try:
            write_json_atomic(os.path.join(self.path, "record.json"), self.record)
            return True
        except OSError as e:
            self.report_failure("record.json", e)
            return False

    def report_failure(self, name, error):
        """Logs that file `name` could not be written and lists it in `artifact_errors`."""
        self.artifact_errors[name] = f"{type(error).__name__}: {error}"
        logging.error("could not write %s in %s: %s", name, self.path, error)

    def artifact(self, name, write, whole=True):
        """Runs `write(path)` for the file (or folder) `name` of the folder; an OSError
        (a full disk, a read-only folder) is logged and kept in `artifact_errors`.
        Returns whether it was written.

        `whole`: `write` makes the file anew, through `write_new_file` (whole or not
        at all: a failed or killed write leaves no truncated file behind, and the
        removed temporary frees the space for the record that lists it). An existing
        `name` is never replaced. False: `write` appends to the file in place."""
        path = os.path.join(self.path, name)
        try:
            if whole:
                write_new_file(path, write)
            else:
                write(path)
            return True
        except OSError as e:
            self.report_failure(name, e)
            return False
        except KeyboardInterrupt as e:  # (a second stop signal: listed, then raised)
            self.report_failure(name, e)
            raise

    def start_history(self, rows=()):
        """(Re)writes `history.csv` with `rows` (a resumed run's rows so far)."""
        self._history_fields = None
        self.artifact("history.csv", lambda p: write_rows(p, list(rows)), whole=False)  # replaced atomically
        if rows:
            self._history_fields = _fields_of(rows)

    def append_history(self, row, rows):
        """Appends `row` (a dict) to `history.csv`; a row with a column the file lacks,
        a file gone, or a file whose last append failed, rewrites it whole with all of
        `rows` (the history so far, `row` last). An append that fails (a full disk)
        is cut off again: a partial row left in place took the next row's fields
        (a row of 19 columns, an accuracy read from another field), and the rows in
        between were lost."""
        def write(path):
            if (self._history_fields is not None and set(row) <= set(self._history_fields)
                    and os.path.exists(path)):
                size = os.path.getsize(path)
                try:
                    with open(path, "a", newline="") as f:
                        csv.DictWriter(f, fieldnames=self._history_fields, restval="").writerow(json_safe(row))
                except OSError:
                    self._history_fields = None  # the next row rewrites the file whole
                    with contextlib.suppress(OSError):
                        os.truncate(path, size)
                    raise
            else:
                write_rows(path, rows)
                self._history_fields = _fields_of(rows)
                self.artifact_errors.pop("history.csv", None)  # (whole again: every row so far)

        self.artifact("history.csv", write, whole=False)


def _remove(path):
    """Removes the file or folder `path` if it exists (errors ignored: cleaning up after a failure)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.remove(path)


def _fields_of(rows):
    names = []
    for row in rows:
        names += [k for k in row if k not in names]
    return names


def write_rows(path, rows):
    """Writes dict `rows` as CSV to `path` (the union of their keys as columns) through a
    temporary file renamed over it: for files a run rewrites as it goes."""
    temporary = f"{path}.tmp{os.getpid()}"
    try:
        with open(temporary, "w", newline="") as f:
            if rows:
                w = csv.DictWriter(f, fieldnames=_fields_of(rows), restval="")
                w.writeheader()
                w.writerows(json_safe(r) for r in rows)
        os.replace(temporary, path)
    finally:
        _remove(temporary)  # left only by a failed write


def csv_text(rows):
    """Dict `rows` with the same keys as CSV text (empty without rows)."""
    out = io.StringIO(newline="")
    if rows:
        w = csv.DictWriter(out, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return out.getvalue()


def confusion_matrix_text(matrix, class_names):
    """`matrix` (rows: true class, columns: predicted) as CSV text, classes named."""
    out = io.StringIO(newline="")
    w = csv.writer(out)
    w.writerow(["true \\ predicted", *class_names])
    for name, row in zip(class_names, matrix):
        w.writerow([name, *(int(v) for v in row)])
    return out.getvalue()


def published_comparison(config, test_accuracy):
    """The published UMBC number next to ours when the setting is CIFAR-10 / 5,000
    images (else None), with the protocol differences."""
    if config.dataset != "cifar10" or config.train_size != 5000 or config.classes:
        return None
    ref = PUBLISHED["umbc_resnet20x6"]
    differences = ["ours: stratified seeded 5,000-image subset, full 10,000-image test set, final model"]
    if config.budget_seconds != 600:
        differences.append(f"ours: budget {config.budget_seconds:g} s, theirs 600 s")
    return {
        "name": "umbc_resnet20x6",
        "test_accuracy": ref["test_accuracy"],
        "difference": round(test_accuracy - ref["test_accuracy"], 4),
        "source": ref["source"],
        "protocol": ref["protocol"],
        "protocol_differences": differences,
    }


def utc_now():
    """The current UTC time as ISO 8601 text, e.g. "2026-11-22T10:00:00Z"."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def start_record(config, settings, commit):
    """The record a run writes before building its model (`status` "running"):
    settings, code, versions, device, command, process."""
    return {
        "status": "running",
        "test_accuracy": None,  # set when a completed run is evaluated on the test set
        "started_utc": utc_now(),
        "budget_seconds": config.budget_seconds,
        "dataset": config.dataset,
        "backend": _backend(),
        "device": settings.device,
        "precision": settings.precision,
        "deterministic": settings.deterministic,
        "data_parallel": settings.parallel,
        "versions": versions(),
        "git_commit": commit,
        "flags": dataclasses.asdict(config),
        # Set flags that change nothing here (flag -> the flag whose choice ignores it).
        "ignored_settings": config.ignored_settings(),
        "command": sys.argv,
        "process": {"pid": os.getpid(), "host": socket.gethostname()},
    }


def data_fields(config, data):
    """Record fields of the run's data (`haet.training.TrainingData`)."""
    return {
        "dataset": data.info.name,
        "data_source": data.dataset.source,
        "subset_seed": config.subset_seed,
        "subset_sha256": data.subset_sha256,
        "train_examples": int(len(data.y_fit)),
        "validation_examples": int(len(data.y_val)),
        "test_examples": int(len(data.dataset.y_test)) if config.evaluate_test else 0,
    }


def model_fields(model, transfer):
    """Record fields of the built model."""
    return {"model": model.name, "parameters": int(model.count_params()), "xla": bool(model.jit_compile),
            "transfer": transfer}


def training_fields(config, data, run, timer):
    """Record fields of the training so far (`haet.training.Run`), on one clock.

    Timings (seconds): `setup_seconds` (this process's setup), `train_seconds` (the
    budget's: from its start to the end of the last execution, precomputed
    augmentation, probe, compilation and validation included; checkpoint writing
    excluded), `compile_seconds` (each process's first execution's excess over its
    steps), `probe_seconds` (the planner's discarded steps, compilation included),
    `checkpoint_seconds` (writing checkpoints: the budget's clock is paused),
    `precompute_seconds`, `eval_seconds`; `between_executions_seconds`: the part of
    `train_seconds` with no execution running (precomputed augmentation, epoch ends,
    hooks, validation); `executions_span_epochs`: whether executions ran on past epoch
    ends (`haet.loop`). Throughput: `images_per_second` (trained images / train seconds) and `images_per_second_after_compile` (the same without
    compilation and probe), counting each ensemble member's images (`images_seen` and
    `epochs_equivalent` are each member's). `over_budget_seconds`: training past the budget;
    `over_budget`: past it by more than one typical execution.

    Epochs: `epochs` (ended, complete or cut short where training stopped inside
    one, and pending; not an epoch a run stopped at once inside: its steps are in
    `steps`), `epochs_completed` (of all their steps), `epochs_pending`: of these,
    the epochs that ended on the device in the last execution of an interrupted run
    before the host ended them; they have no history row yet: the checkpoint keeps
    them and a resumed run ends them first. A diverged run has none: the epochs that
    ended before its first non-finite step got their rows, the later ones are not
    counted (`haet.training`).
    """
    budget, planner = run.budget, run.planner
    # Epochs the device ended in the last execution that the host has not ended yet
    # (only an interrupted run leaves any: see haet.loop.Training).
    pending = len(run.engine.ended_epochs)
    train_seconds = budget.train_seconds()
    compile_seconds = budget.compile_seconds()
    probe_seconds = sum(e.seconds for e in budget.executions if e.probe)
    excluded = probe_seconds if budget.executions and budget.executions[0].probe else compile_seconds
    images = budget.steps * config.batch_size  # what each network (each ensemble member) trained on
    through = images * config.ensemble_members  # images through a network: the device's work
    over = max(0.0, train_seconds - budget.budget_seconds)
    typical = budget.typical_execution_seconds()
    return {
        "epochs": len(budget.history) + pending,
        "planned_epochs": planner.planned_epochs if planner else (config.epochs or None),
        # (fewer than an epoch's steps when not one epoch fitted the budget)
        "planned_steps": planner.planned_steps_value if planner else None,
        "replanned_from_epochs": planner.replanned_from if planner else None,
        "replans": planner.replans if planner else [],
        "epochs_completed": sum(row["complete"] for row in budget.history) + pending,
        "epochs_pending": pending,
        "epochs_equivalent": round(images / len(data.y_fit), 3),
        "steps": budget.steps,
        "images_seen": images,
        "stopped_by": run.training.stopped_by,
        "steps_per_execution": config.steps_per_execution,
        "execution_loop": run.engine.loop_kind,
        # Whether executions ran on past epoch ends (--span_epochs, and no hook that needs
        # to see each epoch's end: see haet.loop).
        "executions_span_epochs": bool(run.engine.spans_epochs
                                       and all(hook.crosses_epochs for hook in run.training.hooks)),
        "executions": sum(not e.probe for e in budget.executions),
        "step_seconds": budget.step_seconds(),
        "probe_steps": budget.probe_steps(),
        "setup_seconds": round(timer.seconds.get("setup", 0.0), 3),
        "compile_seconds": round(compile_seconds, 3),
        "probe_seconds": round(probe_seconds, 3),
        "train_seconds": round(train_seconds, 3),
        # Of the train seconds, those with no execution running (host work between them).
        "between_executions_seconds": round(budget.between_executions_seconds(), 3),
        "checkpoint_seconds": round(budget.paused_seconds, 3),
        "checkpoints": run.checkpointer.saved if run.checkpointer else 0,
        "precompute_seconds": round(timer.seconds.get("precompute", 0.0), 3),
        # Recomputing the averaged weights' batch-norm statistics after training (--ema_statistics=recompute).
        "ema_statistics_seconds": (round(run.moving_average.recompute_seconds, 3) if run.moving_average is not None
                                   and run.moving_average.recompute_seconds is not None else None),
        "over_budget_seconds": round(over, 3),
        # Past the budget by more than one typical execution (by anything when the only
        # executions compiled: the compilation alone outlasted the budget).
        "over_budget": bool(over > (typical if typical is not None else 0.0)),
        "images_per_second": round(through / train_seconds, 2) if train_seconds else None,
        "images_per_second_after_compile": (
            round(through / (train_seconds - excluded), 2) if train_seconds > excluded else None),
    }


def evaluation_fields(config, data, run, evaluated, timer):
    """Record fields of the final evaluation (`haet.training.evaluate`)."""
    test = evaluated.get("test")
    scores = test.scores[test.headline] if test else None
    test_accuracy = float(scores["accuracy"]) if scores else None
    record = {
        "test_accuracy": test_accuracy,
        "test_loss": float(scores["loss"]) if scores else None,  # cross-entropy, no weight penalty
        "eval_seconds": round(timer.seconds.get("eval", 0.0), 3),
        "published": published_comparison(config, test_accuracy) if test else None,
    }
    split = next(iter(evaluated.values()), None)
    if split is not None:
        record["headline_variant"] = split.headline
        record["headline_chosen_on"] = "validation" if config.ema_decay and "validation" in evaluated else None
    for name, split in evaluated.items():
        record[f"{name}_accuracy_variants"] = {k: v["accuracy"] for k, v in split.scores.items()}
        record[f"{name}_loss_variants"] = {k: v["loss"] for k, v in split.scores.items()}
        if split.snapshot_accuracies:
            record[f"{name}_snapshot_accuracies"] = split.snapshot_accuracies
        if split.member_scores:
            accuracies = [m["accuracy"] for m in split.member_scores]
            record[f"member_{name}_accuracies"] = accuracies
            record[f"member_{name}_losses"] = [m["loss"] for m in split.member_scores]
            record[f"mean_member_{name}_accuracy"] = float(np.mean(accuracies))
            record[f"best_member_{name}_accuracy"] = float(np.max(accuracies))
    if "validation" in evaluated:
        split = evaluated["validation"]
        record["validation_accuracy"] = split.scores[split.headline]["accuracy"]
        record["validation_loss"] = split.scores[split.headline]["loss"]
        val_history = [row["val_accuracy"] for row in run.budget.history if row.get("val_accuracy") is not None]
        if val_history:
            best = int(np.argmax(val_history))
            record["best_validation_epoch"] = best + 1
            record["best_validation_accuracy_during_training"] = val_history[best]
        record["stopped_early"] = run.training.stopped_by == "early_stopping"
    return record


def write_artifacts(folder, model, run, evaluated, class_names, save_model=True, export="none"):
    """Writes a finished run's files into `folder` (a `RunFolder`): `health.csv` (with
    the health monitor), `confusion_matrix.csv` (test set), `learning_curves.png` and
    `model.keras` (if `save_model`) and `saved_model/` (with `export="saved_model"`: a
    TensorFlow SavedModel serving uint8 images). A file that cannot be written is logged and
    listed in `folder.artifact_errors`; the others are still written."""
    from haet import plots

    record = folder.record
    if run.health is not None:
        folder.artifact("health.csv", lambda p: write_rows(p, run.health.rows))
    test = evaluated.get("test")
    if test:
        text = confusion_matrix_text(test.scores[test.headline]["confusion_matrix"], class_names)
        folder.artifact("confusion_matrix.csv", lambda p: _write_text(p, text))
    history = run.budget.history
    if history:
        score = (f"test accuracy {record['test_accuracy']:.2%}" if test else
                 f"validation accuracy {record['validation_accuracy']:.2%}")
        title = (f"{record['model']} on {record['dataset']} ({record['train_examples']} images), "
                 f"{record['budget_seconds']:g} s budget, {record['backend']}: {score}")
        folder.artifact("learning_curves.png", lambda p: plots.plot_learning_curves(history, title, p))
    if save_model:
        folder.artifact("model.keras", lambda p: model.save(p))
    if export == "saved_model":
        folder.artifact("saved_model", lambda p: model.export(p, format="tf_saved_model", verbose=False))
