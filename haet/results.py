"""Results are data: every run writes a folder that is never overwritten.

`RUN_DIR/record.json` (flags, versions, device, commit, timings, accuracy),
`RUN_DIR/history.csv` (one row per epoch), `RUN_DIR/confusion_matrix.csv` (test set),
`RUN_DIR/learning_curves.png` and `RUN_DIR/model.keras`.
"""

import csv
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys

import numpy as np

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


def run_record(config, data, model, run, evaluated, timer, settings, transfer, commit):
    """The record of a finished training run (`haet.training.train`), a JSON-ready dict.

    Timings (seconds, one clock): `setup_seconds`, `train_seconds` (the budget's:
    from its start to the end of the last execution, precomputed augmentation,
    probe, compilation and validation included), `compile_seconds` (the first
    execution's excess over its steps), `probe_seconds` (the planner's discarded
    steps, compilation included), `precompute_seconds`, `eval_seconds`.
    Throughput: `images_per_second` (trained images / train seconds) and
    `images_per_second_after_compile` (the same without compilation and probe).
    """
    budget, planner = run.budget, run.planner
    test = evaluated.get("test")
    scores = test.scores[test.headline] if test else None
    train_seconds = budget.train_seconds()
    compile_seconds = budget.compile_seconds()
    probe_seconds = sum(e.seconds for e in budget.executions if e.probe)
    excluded = probe_seconds if budget.executions and budget.executions[0].probe else compile_seconds
    images = budget.steps * config.batch_size
    test_accuracy = float(scores["accuracy"]) if scores else None
    info = data.info
    record = {
        "status": "completed",
        "test_accuracy": test_accuracy,
        "test_loss": float(scores["loss"]) if scores else None,  # cross-entropy, no weight penalty
        "test_examples": int(len(data.dataset.y_test)) if test else 0,
        "train_examples": int(len(data.y_fit)),
        "validation_examples": int(len(data.y_val)),
        "dataset": info.name,
        "data_source": data.dataset.source,
        "subset_seed": config.subset_seed,
        "subset_sha256": data.subset_sha256,
        "model": model.name,
        "parameters": int(model.count_params()),
        "epochs": len(budget.history),
        "planned_epochs": planner.planned_epochs if planner else (config.epochs or None),
        "replanned_from_epochs": planner.replanned_from if planner else None,
        "epochs_completed": sum(row["complete"] for row in budget.history),
        "epochs_equivalent": round(images / len(data.y_fit), 3),
        "steps": budget.steps,
        "images_seen": images,
        "stopped_by": run.training.stopped_by,
        "steps_per_execution": config.steps_per_execution,
        "execution_loop": run.engine.loop_kind,
        "executions": sum(not e.probe for e in budget.executions),
        "step_seconds": budget.step_seconds(),
        "probe_steps": budget.probe_steps(),
        "budget_seconds": config.budget_seconds,
        "setup_seconds": round(timer.seconds.get("setup", 0.0), 3),
        "compile_seconds": round(compile_seconds, 3),
        "probe_seconds": round(probe_seconds, 3),
        "train_seconds": round(train_seconds, 3),
        "eval_seconds": round(timer.seconds.get("eval", 0.0), 3),
        "precompute_seconds": round(timer.seconds.get("precompute", 0.0), 3),
        "images_per_second": round(images / train_seconds, 2) if train_seconds else None,
        "images_per_second_after_compile": (
            round(images / (train_seconds - excluded), 2) if train_seconds > excluded else None),
        "backend": _backend(),
        "device": settings.device,
        "precision": settings.precision,
        "xla": bool(model.jit_compile),
        "versions": versions(),
        "git_commit": commit,
        "flags": dataclasses.asdict(config),
        "command": sys.argv,
        "published": published_comparison(config, test_accuracy) if test else None,
        "transfer": transfer,
        "data_parallel": settings.parallel,
    }
    for name, split in evaluated.items():
        record[f"{name}_accuracy_variants"] = {k: v["accuracy"] for k, v in split.scores.items()}
        record[f"{name}_loss_variants"] = {k: v["loss"] for k, v in split.scores.items()}
        if split.snapshot_accuracies:
            record[f"{name}_snapshot_accuracies"] = split.snapshot_accuracies
    if "validation" in evaluated:
        split = evaluated["validation"]
        record["validation_accuracy"] = split.scores[split.headline]["accuracy"]
        record["validation_loss"] = split.scores[split.headline]["loss"]
        val_history = [row["val_accuracy"] for row in budget.history if row.get("val_accuracy") is not None]
        if val_history:
            best = int(np.argmax(val_history))
            record["best_validation_epoch"] = best + 1
            record["best_validation_accuracy_during_training"] = val_history[best]
        record["stopped_early"] = run.training.stopped_by == "early_stopping"
    return record


def write_run(run_dir, record, model, run, evaluated, class_names, save_model=True):
    """Writes a finished run's folder: `history.csv`, `health.csv` (with the health
    monitor), `confusion_matrix.csv` (test set), `learning_curves.png`, `model.keras`
    (if `save_model`) and `record.json` (with `run_dir` added)."""
    from haet import plots

    history = run.budget.history
    write_csv(run_dir, "history.csv", history)
    if run.health is not None:
        write_csv(run_dir, "health.csv", run.health.rows)
    test = evaluated.get("test")
    if test:
        write_confusion_matrix(run_dir, test.scores[test.headline]["confusion_matrix"], class_names)
    if history:
        score = (f"test accuracy {record['test_accuracy']:.2%}" if test else
                 f"validation accuracy {record['validation_accuracy']:.2%}")
        plots.plot_learning_curves(
            history, f"{record['model']} on {record['dataset']} ({record['train_examples']} images), "
            f"{record['budget_seconds']:g} s budget, {record['backend']}: {score}",
            os.path.join(run_dir, "learning_curves.png"))
    if save_model:
        model.save(os.path.join(run_dir, "model.keras"), overwrite=False)
    record["run_dir"] = run_dir
    write_record(run_dir, record)
