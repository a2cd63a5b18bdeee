"""Train a classifier under a wall-clock budget, evaluate it, write the run's record.

`train(config)` is a run of named steps; each is a function that returns values,
and the other commands reuse them (`haet.sanity`, `haet.lr_find`, `haet.search`,
`haet.bench`):

1. `haet.device.run_settings`: precision policy, seeds, data-parallel devices
   (restored afterwards);
2. `prepare_data`: the dataset, its stratified training subset, the validation split;
3. `build_model`: the uint8-input model with its normalization and augmentation;
4. `build_optimizer` and `compile_model`: the learning-rate schedule, the optimizer,
   the loss;
5. `build_run`: the engine (training images on the accelerator), the budget and the
   hooks (planner, validation, EMA, early stopping, snapshots, health, TensorBoard);
6. `Run.fit`: epochs of compiled executions until the budget, the plan, the epochs or
   early stopping end them;
7. `evaluate`: every variant of the final model on the validation and test sets;
8. `haet.results.run_record` / `write_run`: the record and the run folder.

The defaults of `haet.config.TrainConfig` are the UMBC HAET-2021 recipe.
"""

import contextlib
import dataclasses
import os
import sys
import time

import keras
import numpy as np
from absl import logging

from haet import augment, budget as budget_lib, data as data_lib, device as device_lib, evaluation, models
from haet import optimizers, results, schedules
from haet.config import TrainConfig
from haet.engine import current_weights, make_engine
from haet.hooks import MovingAverage, SnapshotKeeper, TrainingHealth, Validation
from haet.loop import KerasCallbacks, Training

__all__ = ["TrainConfig", "train", "prepare_data", "build_model", "build_optimizer", "compile_model",
           "build_run", "evaluate"]


def train(config, results_dir="results/runs", clock=time.perf_counter):
    """Trains `config` within its budget, evaluates it, and writes the run folder
    (see `haet.results`).

    Args:
        config: a `TrainConfig` (checked when it was made).
        results_dir: parent folder of the new run folder.
        clock: the one clock of the run (seconds; tests pass a fake), shared by the
            phase timer and the budget.

    Returns:
        `(record, run_dir)`: the record dict also written to `run_dir/record.json`.

    Raises:
        ValueError: malformed data, before training starts.
        RuntimeError: no data can be found or downloaded.
    """
    timer = budget_lib.PhaseTimer(clock)
    commit = results.git_commit()  # the code this process runs, not the tree at the end
    with settings_of(config) as settings:
        with timer.phase("setup"):
            data = prepare_data(config)
            model, augmentation, transfer = build_model(config, data)
            optimizer, schedule = build_optimizer(config, data.steps_per_epoch(config))
            compile_model(config, model, optimizer, settings)
            # The run folder exists once the data and model are known to be good.
            run_dir = results.make_run_dir(results_dir, config.run_name())
            run = build_run(config, model, augmentation, schedule, data, run_dir, clock, timer)
        run.fit()
        with timer.phase("eval"):
            evaluated = evaluate(config, model, data, run)
    record = results.run_record(config, data, model, run, evaluated, timer, settings, transfer, commit)
    results.write_run(run_dir, record, model, run, evaluated, data.info.class_names, save_model=config.save_model)
    logging.info(
        "%s; %d epochs (%d steps, %s); setup %.1f s, compile %.1f s, train %.1f s, eval %.1f s, %.1f images/s -> %s",
        "; ".join(f"{name} accuracy {v.scores[v.headline]['accuracy']:.4f}" for name, v in evaluated.items()),
        record["epochs"], record["steps"], record["stopped_by"], record["setup_seconds"], record["compile_seconds"],
        record["train_seconds"], record["eval_seconds"], record["images_per_second"] or 0, run_dir)
    return record, run_dir


def settings_of(config):
    """`haet.device.run_settings` for `config`: its precision, seed and data parallelism."""
    return device_lib.run_settings(config.precision, config.seed,
                                   config.batch_size if config.data_parallel else None)


@dataclasses.dataclass(frozen=True)
class TrainingData:
    """A run's data: every split of the dataset, the training subset split into the
    images it fits (`x_fit`, `y_fit`) and the validation images (`x_val`, `y_val`;
    empty without a validation split), and the subset's sha256. Images are uint8
    NHWC, labels int32."""

    dataset: data_lib.Dataset
    x_fit: np.ndarray
    y_fit: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    subset_sha256: str

    @property
    def info(self):
        return self.dataset.info

    def steps_per_epoch(self, config):
        return len(self.y_fit) // config.batch_size


def load_dataset_of(config):
    """The dataset of `config` (all splits), restricted to `config.classes` if set."""
    return data_lib.select_classes(data_lib.load_dataset(config.dataset, config.data_dir), config.classes)


def prepare_data(config):
    """Loads the dataset and takes the training subset and validation split of `config`.

    The subset is `haet.data.stratified_subset(..., config.subset_seed)`; with
    `validation_size` > 0 that many class-balanced images are held out of it
    (`split_validation`, seed `subset_seed + 1`).

    Returns:
        `TrainingData`.

    Raises:
        ValueError: malformed data. RuntimeError: no data found.
    """
    dataset = load_dataset_of(config)
    info = dataset.info
    indices = data_lib.stratified_subset(dataset.y_train, config.train_size, info.num_classes, config.subset_seed)
    x_train, y_train = dataset.x_train[indices], dataset.y_train[indices]
    sha = data_lib.subset_sha256(x_train, y_train)
    logging.info("%s from %s: %d training images (subset seed %d, sha256 %s), %d test images",
                 info.name, dataset.source, len(y_train), config.subset_seed, sha, len(dataset.y_test))
    x_fit, y_fit, x_val, y_val = split_validation(x_train, y_train, config.validation_size, info.num_classes,
                                                  config.subset_seed + 1)
    return TrainingData(dataset, x_fit, y_fit, x_val, y_val, sha)


def split_validation(x, y, validation_size, num_classes, seed):
    """Holds `validation_size` class-balanced images out of a training subset.

    The held-out indices are `haet.data.stratified_subset(y, validation_size,
    num_classes, seed)`, so the split depends only on the labels and the seed.

    Returns:
        `(x_fit, y_fit, x_validation, y_validation)`; the validation arrays are empty
        when `validation_size` is 0.

    Raises:
        ValueError: `validation_size` not a multiple of `num_classes` or too large.
    """
    if not validation_size:
        return x, y, x[:0], y[:0]
    held = data_lib.stratified_subset(y, validation_size, num_classes, seed)
    keep = np.ones(len(y), dtype=bool)
    keep[held] = False
    return x[keep], y[keep], x[held], y[held]


def input_statistics(config, x_train):
    """`(mean, variance)` of the training images on the [0, 1] scale: per pixel
    (variance None) or per channel, as `config.input_normalization` says."""
    scaled = x_train.astype(np.float32) / 255.0
    if config.input_normalization == "pixel_mean":
        return scaled.mean(axis=0), None
    return scaled.mean(axis=(0, 1, 2)), scaled.var(axis=(0, 1, 2))


def build_model(config, data):
    """The uint8-input model of `config`, its augmentation layer and the fine-tuning summary.

    The model normalizes with the statistics of `data.x_fit` and augments inside
    (in training only), except with precomputed augmentation, where the layer is
    returned but left out. With `init_from`, the saved model's weights are copied
    in (new head) and the first `freeze_stages` stages frozen
    (`haet.models.transfer_weights`).

    Returns:
        `(model, augmentation, transfer)`: a `keras.Model` from uint8 images to
        float32 logits, the layer or None, and a dict (or None without `init_from`).
    """
    info = data.info
    mean, variance = input_statistics(config, data.x_fit)
    backbone = models.build_backbone(config, info.num_classes, info.image_shape)
    augmentation = augment.build_augmentation(config)
    in_model = None if config.precomputed_augmentation_epochs else augmentation
    model = models.with_input_pipeline(backbone, mean, in_model, variance)
    transfer = None
    if config.init_from:
        source = keras.saving.load_model(config.init_from, compile=False)
        transfer = {"init_from": config.init_from, "source_model": source.name,
                    **models.transfer_weights(source, model, config.model, config.freeze_stages)}
        logging.info("fine-tuning from %s: %s", config.init_from, transfer)
    return model, augmentation, transfer


def build_optimizer(config, steps_per_epoch):
    """The learning-rate schedule of `config` and the optimizer that follows it.

    A schedule of unit "steps" runs inside the compiled step over a planned number
    of steps, a variable created here (`--epochs` x steps per epoch, or set by the
    planner before training); one of unit "budget" starts the optimizer at its
    first value and is written by the budget as the clock runs.

    Returns:
        `(optimizer, schedule)`.
    """
    schedule = schedules.learning_rate_schedule(config)
    if schedule.unit == "steps":
        optimizer = optimizers.make_optimizer(config, schedule)
        schedule.attach(optimizer, max(1, config.epochs) * steps_per_epoch)
    else:
        optimizer = optimizers.make_optimizer(config, schedule(0.0))
    return optimizer, schedule


def compile_model(config, model, optimizer, settings):
    """Compiles `model` with `optimizer`, the loss of `config` and accuracy; XLA unless
    the data-parallel engine cannot (`settings` from `haet.device.run_settings`)."""
    xla = settings.parallel["xla"] if settings.parallel else True
    model.compile(optimizer=optimizer, loss=optimizers.make_loss(config), metrics=["accuracy"], jit_compile=xla)
    logging.info("model %s: %d parameters, XLA %s", model.name, model.count_params(), xla)


@dataclasses.dataclass
class Run:
    """The training side of a run: the engine, the budget, the loop and its hooks
    (None where the config does not use them); after `fit`, what they measured."""

    engine: object
    budget: budget_lib.WallClockBudget
    training: Training
    planner: budget_lib.StepPlanner | None = None
    moving_average: MovingAverage | None = None
    early_stopping: keras.callbacks.EarlyStopping | None = None
    snapshots: SnapshotKeeper | None = None
    health: TrainingHealth | None = None

    def fit(self):
        """Trains (see `haet.loop.Training.fit`); returns `self`."""
        self.training.fit()
        return self


def build_run(config, model, augmentation, schedule, data, run_dir, clock=time.perf_counter, timer=None):
    """The engine, budget and hooks that train `model` as `config` says.

    With precomputed augmentation the budget starts here: the augmented copies are
    made now (phase "precompute" of `timer`) and count toward it.

    Returns:
        `Run` (not yet fitted).
    """
    steps_per_epoch = data.steps_per_epoch(config)
    affine = augmentation if isinstance(augmentation, augment.RandomAffine) else None
    budget = budget_lib.WallClockBudget(
        config.budget_seconds, schedule if schedule.unit == "budget" else None, augmentation=affine,
        augmentation_strength=augment.strength_schedule(config) if affine else None,
        fill_modes=config.fill_modes, seed=config.seed, clock=clock)
    images, copies = data.x_fit, 1
    if config.precomputed_augmentation_epochs:
        budget.begin()  # precomputed augmentation counts toward the budget
        with timer.phase("precompute") if timer else contextlib.nullcontext():
            mean = input_statistics(config, data.x_fit)[0]
            epochs = augment.precompute_epochs(data.x_fit, augmentation, config.precomputed_augmentation_epochs,
                                               255.0 * mean)
        images, copies = np.concatenate(epochs), len(epochs)
    one_hot = data.info.num_classes if config.label_smoothing else None
    engine = make_engine(model, images, data.y_fit, config.batch_size, seed=config.seed, one_hot_classes=one_hot,
                         steps_per_execution=config.steps_per_execution, copies=copies,
                         execution_loop=config.execution_loop)
    run = Run(engine, budget, training=None)
    hooks = []
    if config.validation_size:
        hooks.append(Validation(data.x_val, data.y_val, data.info.num_classes, config.eval_batch_size))
    if config.health_every_steps:
        probe = slice(0, config.batch_size)
        labels = data.y_fit[probe] if not one_hot else data_lib.one_hot(data.y_fit[probe], one_hot)
        run.health = TrainingHealth(
            data.x_fit[probe], labels, model.loss, config.health_every_steps,
            os.path.join(run_dir, "tensorboard", "health") if config.tensorboard else None)
        hooks.append(run.health)
    hooks.append(budget)
    if config.ema_decay:
        run.moving_average = MovingAverage()
        hooks.append(run.moving_average)
    callbacks = []
    if config.early_stopping_patience or config.keep_best:
        run.early_stopping = keras.callbacks.EarlyStopping(
            monitor="val_accuracy", mode="max", patience=config.early_stopping_patience or sys.maxsize,
            restore_best_weights=config.keep_best)
        callbacks.append(run.early_stopping)
    if config.tensorboard:
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(run_dir, "tensorboard"), write_graph=False))
    if callbacks:
        hooks.append(KerasCallbacks(callbacks, model, epochs=config.epochs or None))
    if schedule.unit == "steps" and not config.epochs:
        run.planner = budget_lib.StepPlanner(budget, schedule.planned_steps, steps_per_epoch,
                                             config.planner_probe_steps)
    if config.snapshot_ensemble:
        planned = None
        if schedule.unit == "steps":
            planned = (lambda: run.planner.planned_steps_value) if run.planner else (
                lambda: config.epochs * steps_per_epoch)
        run.snapshots = SnapshotKeeper(schedules.cycle_ends(config), budget_lib.Progress(budget, planned))
        hooks.append(run.snapshots)
    if run.planner:
        hooks.append(run.planner)  # last: its epoch end measures the time the other hooks took
    run.training = Training(engine, budget, hooks, epochs=config.epochs)
    return run


@dataclasses.dataclass(frozen=True)
class Evaluated:
    """Scores of the variants of the final model on one split.

    Attributes:
        scores: variant name -> `haet.evaluation.scores` dict (accuracy, loss,
            confusion matrix); names like "ema", "ema_tta_flip", "raw", "snapshot_ensemble".
        headline: the variant the run reports (the final weights, with the
            configured test-time augmentation).
        snapshot_accuracies: accuracy of each snapshot (empty without snapshots).
    """

    scores: dict
    headline: str
    snapshot_accuracies: list


def evaluate(config, model, data, run):
    """Scores of the final model and its variants on the validation split (when there
    is one) and the test set (unless `evaluate_test` is False).

    The final weights are named "ema" (moving average), "best" (keep_best) or
    "final"; next to EMA weights the raw ones are scored as "raw"; with snapshots,
    each snapshot and their ensemble ("snapshot_ensemble"); each also with the
    configured test-time augmentation ("<name>_tta_<mode>"). Weights other than the
    final ones are passed to the predictor, never written into the model.

    Returns:
        dict split name ("validation", "test") -> `Evaluated`.
    """
    prefix = "ema" if config.ema_decay else "best" if config.keep_best else "final"
    headline = f"{prefix}_tta_{config.tta}" if config.tta != "none" else prefix
    splits = {}
    if config.validation_size:
        splits["validation"] = (data.x_val, data.y_val)
    if config.evaluate_test:
        splits["test"] = (data.dataset.x_test, data.dataset.y_test)
    final = current_weights(model)
    weights = {prefix: final}
    if run.moving_average is not None:
        weights["raw"] = (run.moving_average.raw_weights, final[1])
    snapshots = [w for _, w in run.snapshots.snapshots] if run.snapshots else []
    evaluated = {}
    for name, (x, y) in splits.items():
        scores, members = _evaluate_variants(config, model, x, y, data.info.num_classes, weights, snapshots)
        evaluated[name] = Evaluated(scores, headline, members)
    return evaluated


def _evaluate_variants(config, model, x, y, num_classes, weights, snapshots):
    tta_modes = ["none"] + ([config.tta] if config.tta != "none" else [])

    def name(base, tta):
        return base if tta == "none" else f"{base}_tta_{tta}"

    def probabilities(w, tta):
        return evaluation.predict_probabilities(model, x, config.eval_batch_size, tta, weights=w)

    variants, members, final = {}, [], {}
    for base, w in weights.items():
        for tta in tta_modes:
            predicted = probabilities(w, tta)
            final.setdefault(tta, predicted)  # the first weights are the final ones
            variants[name(base, tta)] = evaluation.scores(predicted, y, num_classes)
    if snapshots:
        for tta in tta_modes:
            # The last snapshot is taken when training ends: the final weights, predicted above.
            member_scores, ensemble_scores = evaluation.ensemble(
                [probabilities(w, tta) for w in snapshots[:-1]] + [final[tta]], y, num_classes)
            variants[name("snapshot_ensemble", tta)] = ensemble_scores
            if tta == "none":
                members = [m["accuracy"] for m in member_scores]
    return variants, members
