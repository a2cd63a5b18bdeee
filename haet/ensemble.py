"""Ensembles of independently trained runs: average their predicted probabilities.

    python -m haet.ensemble --runs=results/runs/A,results/runs/B,results/runs/C \
        [--tta=flip] [--data_dir=../shared/data/cifar10]

Each run folder must hold `model.keras` and `record.json` (from `python -m haet.train`;
runs with different seeds are independent members, Lakshminarayanan et al. 2017,
"Simple and scalable predictive uncertainty estimation using deep ensembles"). All
members must have been trained on the same dataset and classes; the test set is
loaded as the first member's record says (`--data_dir` overrides where it lives).
The ensemble's class probabilities are the mean of the members' softmax outputs.

Writes a new folder under `--results_dir` (default `results/ensembles`) with
`record.json`: every member's test accuracy and loss, the ensemble's, the mean and
best member, the wall-clock training seconds the members took together.
"""

import dataclasses
import os

import keras
import numpy as np
from absl import logging

from haet import config as config_lib
from haet import cli, evaluation, results, training
from haet import models as models_lib


def config_of_run(run_dir):
    """The `TrainConfig` written in `run_dir/record.json` (`haet.config.config_from_record`).

    Raises:
        ValueError: no readable record in `run_dir`, or a run that did not complete.
    """
    record = results.read_record(run_dir)
    status = record.get("status", "completed")
    if status != "completed":
        raise ValueError(f"{run_dir} did not complete (status {status!r}): only completed runs are members.")
    if not isinstance(record.get("flags"), dict):
        raise ValueError(f"{run_dir}/record.json has no flags.")
    # Only the data settings are used: a fine-tuned member's source model need not exist.
    return config_lib.config_from_record(record["flags"], init_from=None, freeze_stages=0), record


def check_members(runs):
    """Checks the member folders before any work.

    Raises:
        ValueError: an empty entry (a stray comma), fewer than two, or one folder
            given twice (under any spelling of its path): an ensemble of a run with
            itself is that run.
    """
    empty = [i for i, run in enumerate(runs) if not run.strip()]
    if empty:
        raise ValueError(f"--runs has an empty entry (number {empty[0] + 1} of {len(runs)}: a stray comma?). "
                         f"Received: {list(runs)}")
    if len(runs) < 2:
        raise ValueError(f"--runs needs at least two run folders. Received: {list(runs)}")
    seen = {}
    for run in runs:
        real = os.path.realpath(run)
        if real in seen:
            raise ValueError(f"--runs names {seen[real]!r} and {run!r}, the same run folder; each member must be "
                             "an independently trained run.")
        seen[real] = run


def evaluate_ensemble(models, images, labels, num_classes, batch_size=500, tta="none"):
    """Scores of each model and of their probability-averaged ensemble on a test set.

    Args:
        models: list of uint8-input classifiers returning logits `(N, num_classes)`.
        images: uint8 `(N, H, W, C)`; labels: int `(N,)`.
        tta: test-time augmentation of every member (`haet.evaluation.TTA_MODES`).

    Returns:
        `(member_scores, ensemble_scores)` as `haet.evaluation.ensemble`.
    """
    probabilities = [evaluation.predict_probabilities(m, images, batch_size, tta) for m in models]
    return evaluation.ensemble(probabilities, labels, num_classes)


def main(argv):
    del argv
    from absl import app, flags

    f = flags.FLAGS
    commit = results.git_commit()  # the code this process runs
    try:
        check_members(f.runs)
        configs, records = zip(*(config_of_run(r) for r in f.runs))
    except ValueError as e:
        raise app.UsageError(str(e), exitcode=cli.USAGE_ERROR) from None
    # Everything that can be refused is checked before the first member is scored.
    try:
        results.check_results_dir(f.results_dir)
        data_keys = ("dataset", "classes")
        first = {k: getattr(configs[0], k) for k in data_keys}
        for run, config in zip(f.runs, configs):
            theirs = {k: getattr(config, k) for k in data_keys}
            if theirs != first:
                raise ValueError(f"{run} was trained on {theirs}, {f.runs[0]} on {first}: members must share the "
                                 f"data.")
        config = dataclasses.replace(configs[0], data_dir=f.data_dir or configs[0].data_dir)
        dataset = training.load_dataset_of(config)
        if not len(dataset.y_test):
            raise ValueError(f"The {dataset.info.name} test split from {dataset.source} holds no images.")
        models = []
        for run in f.runs:
            path = os.path.join(run, "model.keras")
            if not os.path.exists(path):
                raise ValueError(f"{path} does not exist: train the member with --save_model.")
            models.append(models_lib.load_saved_model(path, path, "Train the member again (with "
                                                      "--save_model).", compile=True))
    except (ValueError, RuntimeError) as e:
        raise app.UsageError(str(e), exitcode=cli.USAGE_ERROR) from None
    members, ensemble_scores = evaluate_ensemble(
        models, dataset.x_test, dataset.y_test, dataset.info.num_classes, f.eval_batch_size, f.tta)
    accuracies = [m["accuracy"] for m in members]
    record = {
        "ensemble_test_accuracy": ensemble_scores["accuracy"],
        "ensemble_test_loss": ensemble_scores["loss"],
        "member_test_accuracies": accuracies,
        "member_test_losses": [m["loss"] for m in members],
        "mean_member_test_accuracy": float(np.mean(accuracies)),
        "best_member_test_accuracy": float(np.max(accuracies)),
        "members": list(f.runs),
        "member_git_commits": [r.get("git_commit") for r in records],
        "member_train_seconds": [r.get("train_seconds") for r in records],
        "total_train_seconds": float(sum(r.get("train_seconds") or 0.0 for r in records)),
        "tta": f.tta,
        "dataset": dataset.info.name,
        "test_examples": int(len(dataset.y_test)),
        "backend": keras.backend.backend(),
        "versions": results.versions(),
        "git_commit": commit,
    }
    for run, accuracy in zip(f.runs, accuracies):
        print(f"member {run}: test accuracy {accuracy:.2%}")
    print(f"ensemble of {len(models)}: test accuracy {ensemble_scores['accuracy']:.2%} "
          f"(mean member {record['mean_member_test_accuracy']:.2%})", flush=True)
    try:
        with cli.StopSignalsHeld("the ensemble's record"):  # (a stop signal now: the folder is written first)
            run_dir = results.write_run_folder(f.results_dir, f"{dataset.info.name}_ensemble_of_{len(models)}", {
                "record.json": results.record_text(record),
                "confusion_matrix.csv": results.confusion_matrix_text(ensemble_scores["confusion_matrix"],
                                                                      dataset.info.class_names)})
    except OSError as e:  # all or nothing: no half-written folder for the report to meet
        cli.not_written(f"the ensemble's record under {f.results_dir}", e)
    print(f"wrote {run_dir}")
    logging.info("ensemble record %s", run_dir)


if __name__ == "__main__":
    from absl import flags

    flags.DEFINE_list("runs", [], "Run folders (model.keras + record.json), comma-separated.")
    flags.DEFINE_string("data_dir", None, "Where the test data lives, if not where the runs read it.")
    flags.DEFINE_enum("tta", "none", list(evaluation.TTA_MODES), "Test-time augmentation of every member.")
    flags.DEFINE_integer("eval_batch_size", 500, "Test images per prediction step.", lower_bound=1)
    flags.DEFINE_string("results_dir", "results/ensembles", "A new folder is made under it.")
    cli.run(main)
