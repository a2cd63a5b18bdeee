"""Train a classifier under a wall-clock budget, evaluate it, write the run's record.

The defaults of `TrainConfig` are the UMBC HAET-2021 recipe (Hosseini, Prakash,
Pirsiavash, Mohsenin, "Training a 5000x32x32x3 RGB dataset on Nvidia Tesla V100 in
10 minutes", ICLR 2021 HAET workshop; xmhosseini/HAET2021), with our protocol: a
stratified seeded 5,000-image subset, the full test set and the final model.
`flags/umbc_resnet20x6.flags` restates them for the command line.
"""

import contextlib
import dataclasses
import inspect
import math
import os
import sys
import time

import keras
import numpy as np
from absl import logging

from haet import budget as budget_lib
from haet import data as data_lib
from haet import device as device_lib
from haet import distribute
from haet import evaluation, models, plots, results
from haet.callbacks import SnapshotKeeper, TrainingHealth
from haet.augment import (FILL_MODES, RandomAffine, RandomCropFlipCutout, fill_mode_index,
                          precompute_epochs)
from haet.schedules import (LR_SHAPES, BudgetSchedule, PiecewiseConstant, PlannedPiecewiseLinear,
                            PlannedSchedule, check_range, lr_shape)


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run depends on. Units are in the field names or comments."""

    budget_seconds: float = 600.0  # training seconds, first step (compilation) included
    dataset: str = "cifar10"
    data_dir: str | None = None  # None: tensorflow-datasets
    train_size: int = 5000  # class-balanced training images
    classes: tuple = ()  # class ids to keep, relabelled 0..k-1 in this order; (): all
    subset_seed: int = 0
    seed: int = 0  # weights, shuffling, augmentation, fill-mode draws
    model: str = "resnet20"
    width_multiplier: float = 6  # resnet20: an integer
    dropout_rate: float = 0.25  # resnet20
    weight_decay: float = 1e-4  # L2 factor on kernels: loss += wd * sum(w**2)
    activation: str = "celu"  # resnet9
    celu_alpha: float = 0.3  # resnet9
    ghost_batch_splits: int = 1  # resnet9: batch-norm groups per batch
    frozen_bn_scale: bool = True  # resnet9
    logit_scale: float = 0.125  # resnet9
    input_normalization: str = "pixel_mean"  # or "channel_standardize"
    batch_size: int = 32  # examples per step
    precision: str = "auto"
    optimizer: str = "adam"  # or "sgd" (Nesterov momentum)
    momentum: float = 0.9  # sgd
    label_smoothing: float = 0.0
    lr_schedule: str = "wall_clock"  # one_cycle, or a shape of haet.schedules.LR_SHAPES
    lr_schedule_unit: str = "budget"  # shapes: "budget" (wall-clock fraction) or "steps" (planned steps)
    learning_rate: float = 1e-3  # shapes: the peak learning rate
    warmup: float = 0.0  # shapes: fraction of the run ramping linearly from 0 to learning_rate
    final_learning_rate: float = 0.0  # cosine, cosine_restarts, linear: value at the end
    lr_decay_factor: float = 0.1  # step: factor at each of learning_rate_boundaries
    lr_cycles: int = 1  # cosine_restarts: cycles in the run
    inverse_sqrt_timescale: float = 0.1  # inverse_sqrt: fraction of the run
    lr_scaling_reference_batch: int = 0  # > 0: every learning rate x batch_size / this (linear scaling rule)
    learning_rate_boundaries: tuple = (0.8, 0.9)  # wall_clock, step: fractions of the run
    learning_rates: tuple = (1e-3, 1e-4, 1e-5)  # wall_clock: per interval
    one_cycle_knots: tuple = (0.0, 0.2, 1.0)  # one_cycle: fractions of the planned steps
    one_cycle_learning_rates: tuple = (0.0, 0.4, 0.0)  # one_cycle: at the knots
    epochs: int = 0  # > 0: train this many epochs (the budget still caps); 0: the budget decides
    planner_probe_steps: int = 20  # one_cycle with epochs=0: steps timed before planning
    ema_decay: float = 0.0  # per-step EMA momentum of the weights; 0: off
    tta: str = "none"  # test-time augmentation: none, flip, flip_translate
    augmentation: str = "affine"  # or "crop_flip_cutout", "none"
    crop_padding: int = 4  # crop_flip_cutout: pixels
    cutout_size: int = 8  # crop_flip_cutout: pixels, 0: off
    precomputed_augmentation_epochs: int = 0  # > 0: augment that many copies before training (counted in the budget)
    shift_range: float = 0.2  # fraction of image height/width
    zoom_range: float = 0.2  # zoom in [1 - z, 1 + z]
    rotation_range: float = 15.0  # degrees
    shear_range: float = 15.0  # degrees
    horizontal_flip: bool = True
    fill_modes: tuple = FILL_MODES  # one drawn per epoch
    augment_strength_boundaries: tuple = (0.3, 0.65, 0.75, 0.8, 0.85, 0.9)  # fractions
    augment_strengths: tuple = (1.0, 0.87, 0.73, 0.6, 0.47, 0.33, 0.0)  # x the ranges
    eval_batch_size: int = 500  # examples per evaluation step
    validation_size: int = 0  # class-balanced images held out of the training subset
    early_stopping_patience: int = 0  # epochs without a better validation accuracy; 0: off
    keep_best: bool = False  # end with the weights of the best validation accuracy
    evaluate_test: bool = True  # False: never touch the test set (hyperparameter search)
    tensorboard: bool = False  # write TensorBoard logs under the run folder
    data_parallel: bool = False  # train on all local devices (MirroredStrategy / DataParallel)
    health_every_steps: int = 0  # > 0: update/weight ratios and gradient norms every this many steps
    snapshot_ensemble: bool = False  # keep a snapshot at each cycle end; evaluate them as an ensemble
    init_from: str | None = None  # a saved model.keras to fine-tune (same model and width)
    freeze_stages: int = 0  # init_from: leading stages of the backbone kept frozen
    save_model: bool = True

    def validate(self):
        """Checks every setting that needs no data. Raises ValueError naming the bad value."""
        if not (isinstance(self.budget_seconds, (int, float)) and self.budget_seconds > 0
                and math.isfinite(self.budget_seconds)):
            raise ValueError(
                f"budget must be a positive number of seconds. Received: budget={self.budget_seconds!r}"
            )
        if self.dataset == "folder":
            if not self.data_dir:
                raise ValueError("--dataset=folder needs --data_dir=DIR with DIR/train/<class>/ and DIR/test/<class>/.")
        else:
            data_lib.dataset_info(self.dataset)
        for name, value, allowed in (
            ("augmentation", self.augmentation, AUGMENTATIONS),
            ("optimizer", self.optimizer, OPTIMIZERS),
            ("lr_schedule", self.lr_schedule, LR_SCHEDULES),
            ("lr_schedule_unit", self.lr_schedule_unit, LR_SCHEDULE_UNITS),
            ("input_normalization", self.input_normalization, INPUT_NORMALIZATIONS),
            ("tta", self.tta, evaluation.TTA_MODES),
        ):
            if value not in allowed:
                raise ValueError(f"Unknown {name} {value!r}. Allowed: {', '.join(allowed)}.")
        if self.model == "resnet20" and float(self.width_multiplier) != int(self.width_multiplier):
            raise ValueError(f"resnet20 needs an integer width_multiplier. Received: {self.width_multiplier!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1). Received: {self.label_smoothing!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (0: off). Received: {self.ema_decay!r}")
        if self.precomputed_augmentation_epochs < 0:
            raise ValueError(
                f"precomputed_augmentation_epochs must be >= 0. Received: {self.precomputed_augmentation_epochs}")
        if self.precomputed_augmentation_epochs and self.augmentation != "crop_flip_cutout":
            raise ValueError(
                "precomputed_augmentation_epochs needs --augmentation=crop_flip_cutout (affine "
                f"augmentation follows the clock). Received: augmentation={self.augmentation!r}")
        if self.epochs < 0 or self.planner_probe_steps < 1:
            raise ValueError(
                f"epochs must be >= 0 and planner_probe_steps >= 1. Received: {self.epochs}, {self.planner_probe_steps}"
            )
        if self.model not in models.MODELS:
            raise ValueError(
                f"Unknown model {self.model!r}. Allowed: {', '.join(sorted(models.MODELS))}."
            )
        if self.precision not in device_lib.PRECISIONS:
            raise ValueError(
                f"Unknown precision {self.precision!r}. Allowed: {', '.join(device_lib.PRECISIONS)}."
            )
        for mode in self.fill_modes:
            fill_mode_index(mode)
        if not self.fill_modes:
            raise ValueError(f"fill_modes must name at least one of {FILL_MODES}.")
        for name in ("batch_size", "eval_batch_size", "train_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer. Received: {name}={value!r}")
        if not self.width_multiplier > 0:
            raise ValueError(f"width_multiplier must be positive. Received: {self.width_multiplier!r}")
        if self.init_from is not None and not os.path.isfile(self.init_from):
            raise ValueError(f"init_from={self.init_from!r} is not a file: pass a model.keras of a run folder.")
        if self.freeze_stages and not self.init_from:
            raise ValueError("freeze_stages needs --init_from (a trained model to fine-tune).")
        n_stages = len(models.STAGES.get(self.model, ()))
        if not 0 <= self.freeze_stages <= n_stages:
            raise ValueError(f"freeze_stages must be in [0, {n_stages}] for {self.model}. "
                             f"Received: {self.freeze_stages}")
        if self.dataset != "folder" and not self.classes:
            info = data_lib.dataset_info(self.dataset)
            if self.train_size % info.num_classes and self.train_size != info.train_examples:
                raise ValueError(
                    f"train_size={self.train_size} is not a multiple of the {info.num_classes} "
                    f"classes of {info.name}."
                )
            if self.train_size > info.train_examples:
                raise ValueError(
                    f"train_size={self.train_size} is larger than the {info.train_examples} "
                    f"training images of {info.name}."
                )
        if self.batch_size > self.train_size:
            raise ValueError(
                f"batch_size={self.batch_size} is larger than train_size={self.train_size}."
            )
        if self.warmup and self.lr_schedule in ("wall_clock", "one_cycle"):
            raise ValueError(
                f"--warmup applies to the shapes {', '.join(LR_SHAPES)}, not to "
                f"lr_schedule={self.lr_schedule!r} (one_cycle warms up through its knots; for a "
                "stepped schedule with warmup use --lr_schedule=step).")
        if self.lr_scaling_reference_batch < 0:
            raise ValueError(
                f"lr_scaling_reference_batch must be >= 0 (0: off). Received: {self.lr_scaling_reference_batch}")
        if self.health_every_steps < 0:
            raise ValueError(f"health_every_steps must be >= 0 (0: off). Received: {self.health_every_steps}")
        if self.validation_size < 0 or self.early_stopping_patience < 0:
            raise ValueError(
                f"validation_size and early_stopping_patience must be >= 0. Received: "
                f"{self.validation_size}, {self.early_stopping_patience}")
        if (self.early_stopping_patience or self.keep_best) and not self.validation_size:
            raise ValueError(
                "early stopping and keep_best select on validation accuracy: set --validation_size "
                "(images held out of the training subset), e.g. --validation_size=500.")
        if self.keep_best and self.ema_decay:
            raise ValueError(
                "keep_best and ema_decay each choose the final weights (best validation snapshot "
                "vs. the moving average); set one of them.")
        if self.validation_size and self.validation_size + self.batch_size > self.train_size:
            raise ValueError(
                f"validation_size={self.validation_size} leaves fewer than batch_size={self.batch_size} "
                f"of the train_size={self.train_size} images for training.")
        if self.tensorboard:
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard.")
        if self.snapshot_ensemble and (self.ema_decay or self.keep_best):
            raise ValueError(
                "snapshot_ensemble keeps the raw weights at each cycle end; it cannot be combined "
                "with ema_decay or keep_best, which replace the final weights.")
        if not self.evaluate_test and not self.validation_size:
            raise ValueError("evaluate_test=False needs --validation_size: a run must be scored on something.")
        self.learning_rate_schedule()
        self.strength_schedule()
        self.make_augmentation()

    def learning_rate_scale(self):
        """`batch_size / lr_scaling_reference_batch` (the linear scaling rule of Goyal et al.
        2017, "Accurate, large minibatch SGD"), or 1 when off."""
        if not self.lr_scaling_reference_batch:
            return 1.0
        return self.batch_size / self.lr_scaling_reference_batch

    def learning_rate_schedule(self):
        """The learning rate over the run, every value times `learning_rate_scale()`:
        - wall_clock: `PiecewiseConstant` over the budget fraction;
        - one_cycle: `PlannedPiecewiseLinear` over the planned steps;
        - a shape of `haet.schedules.LR_SHAPES`: `BudgetSchedule` (unit budget) or
          `PlannedSchedule` (unit steps) of `lr_shape(...)`.
        """
        scale = self.learning_rate_scale()
        if self.lr_schedule == "one_cycle":
            return PlannedPiecewiseLinear(self.one_cycle_knots,
                                          [v * scale for v in self.one_cycle_learning_rates])
        if self.lr_schedule == "wall_clock":
            schedule = PiecewiseConstant(
                self.learning_rate_boundaries, [v * scale for v in self.learning_rates],
                name="learning rate")
            return check_range(schedule, 0.0, math.inf)
        shape = lr_shape(self.lr_schedule, self.learning_rate * scale, warmup=self.warmup,
                         final_learning_rate=self.final_learning_rate * scale,
                         boundaries=self.learning_rate_boundaries, decay_factor=self.lr_decay_factor,
                         cycles=self.lr_cycles, timescale=self.inverse_sqrt_timescale)
        return PlannedSchedule(shape) if self.lr_schedule_unit == "steps" else BudgetSchedule(shape)

    def cycle_ends(self):
        """Fractions of the run where a cosine_restarts cycle ends (the last is 1)."""
        if self.lr_schedule != "cosine_restarts":
            return (1.0,)
        ends = [self.warmup + (1.0 - self.warmup) * (i + 1) / self.lr_cycles for i in range(self.lr_cycles - 1)]
        return (*ends, 1.0)  # exactly 1: no rounding past the end of the run

    def make_augmentation(self):
        """The training augmentation layer, or None."""
        if self.augmentation == "affine":
            return RandomAffine(self.shift_range, self.zoom_range, self.rotation_range,
                                self.shear_range, self.horizontal_flip, seed=self.seed,
                                name="augmentation")
        if self.augmentation == "crop_flip_cutout":
            return RandomCropFlipCutout(self.crop_padding, self.horizontal_flip, self.cutout_size,
                                        seed=self.seed, name="augmentation")
        return None

    def model_kwargs(self, num_classes, input_shape):
        """The arguments of the model function that this config sets."""
        fn = models.MODELS[self.model]
        names = inspect.signature(fn).parameters
        kwargs = {k: v for k, v in dataclasses.asdict(self).items() if k in names}
        if self.model == "resnet20":
            kwargs["width_multiplier"] = int(self.width_multiplier)
        return {**kwargs, "num_classes": num_classes, "input_shape": input_shape}

    def strength_schedule(self):
        schedule = PiecewiseConstant(
            self.augment_strength_boundaries, self.augment_strengths, name="augmentation strength"
        )
        return check_range(schedule, 0.0, 1.0)

    def run_name(self):
        return (
            f"{self.dataset}{self.train_size}_{self.model}x{self.width_multiplier:g}_"
            f"{self.budget_seconds:g}s_{keras.backend.backend()}_seed{self.seed}"
        )


AUGMENTATIONS = ("affine", "crop_flip_cutout", "none")
OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("wall_clock", "one_cycle") + LR_SHAPES
LR_SCHEDULE_UNITS = ("budget", "steps")
INPUT_NORMALIZATIONS = ("pixel_mean", "channel_standardize")


def _published_comparison(config, test_accuracy):
    """The published UMBC number next to ours, when the setting is CIFAR-10 / 5,000."""
    if config.dataset != "cifar10" or config.train_size != 5000 or config.classes:
        return None
    ref = results.PUBLISHED["umbc_resnet20x6"]
    differences = [
        "ours: stratified seeded 5,000-image subset, full 10,000-image test set, final model",
    ]
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




def load_dataset_of(config):
    """The dataset of `config` (all splits), restricted to `config.classes` if set."""
    return data_lib.select_classes(data_lib.load_dataset(config.dataset, config.data_dir), config.classes)


def load_training_data(config):
    """The dataset and its training subset for `config`.

    Returns:
        `(dataset, x_train, y_train, subset_sha256)`.
    """
    dataset = load_dataset_of(config)
    indices = data_lib.stratified_subset(
        dataset.y_train, config.train_size, dataset.info.num_classes, config.subset_seed
    )
    x_train, y_train = dataset.x_train[indices], dataset.y_train[indices]
    sha = data_lib.subset_sha256(x_train, y_train)
    logging.info(
        "%s from %s: %d training images (subset seed %d, sha256 %s), %d test images",
        dataset.info.name, dataset.source, len(y_train), config.subset_seed, sha,
        len(dataset.y_test),
    )
    return dataset, x_train, y_train, sha


def input_statistics(config, x_train):
    """`(mean, variance)` of the training images on the [0, 1] scale: per pixel
    (variance None) or per channel, as `config.input_normalization` says."""
    scaled = x_train.astype(np.float32) / 255.0
    if config.input_normalization == "pixel_mean":
        return scaled.mean(axis=0), None
    return scaled.mean(axis=(0, 1, 2)), scaled.var(axis=(0, 1, 2))


def build_training_model(config, info, x_train):
    """The uint8-input model of `config` and its augmentation layer (or None).

    With precomputed augmentation the layer is returned but left out of the model.
    With `init_from`, the saved model's weights are copied in (new head) and the
    first `freeze_stages` stages frozen (`haet.models.transfer_weights`); the
    summary of that is in `model.transfer` (else None).
    """
    mean, variance = input_statistics(config, x_train)
    backbone = models.build_model(config.model, **config.model_kwargs(info.num_classes, info.image_shape))
    augmentation = config.make_augmentation()
    in_model = None if config.precomputed_augmentation_epochs else augmentation
    model = models.with_input_pipeline(backbone, mean, in_model, variance)
    model.transfer = None
    if config.init_from:
        source = keras.saving.load_model(config.init_from, compile=False)
        model.transfer = {"init_from": config.init_from, "source_model": source.name,
                          **models.transfer_weights(source, model, config.model, config.freeze_stages)}
        logging.info("fine-tuning from %s: %s", config.init_from, model.transfer)
    return model, augmentation


def make_loss(config):
    """Cross-entropy on logits; categorical (one-hot labels) when label smoothing is on."""
    if config.label_smoothing:
        return keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=config.label_smoothing)
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def make_optimizer(config, learning_rate):
    """Adam or Nesterov SGD (`config.optimizer`, `config.momentum`) at `learning_rate` (a
    float or a `keras.optimizers.schedules` schedule), with Keras' own weight EMA when
    `config.ema_decay` > 0."""
    ema = {"use_ema": True, "ema_momentum": config.ema_decay} if config.ema_decay else {}
    if config.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=config.momentum, nesterov=True, **ema)
    return keras.optimizers.Adam(learning_rate, **ema)


class _FinalWeights(keras.callbacks.Callback):
    """Keeps the trainable weights of the last epoch's end, before an EMA optimizer
    overwrites them with their averages when `fit` ends."""

    def on_epoch_end(self, epoch, logs=None):
        if self._model.stop_training or epoch + 1 >= self.params["epochs"]:
            self.values = [keras.ops.convert_to_numpy(v) for v in self.model.trainable_variables]

    def restore(self, model):
        for v, value in zip(model.trainable_variables, self.values):
            v.assign(value)


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


def _progress(budget, planner, planned_steps):
    """A function giving the fraction of the run done: of the budget, or of the
    planned steps for a step-based schedule."""
    if planned_steps is None:
        return lambda: min(1.0, budget.elapsed() / budget.budget_seconds)

    def steps_done():
        planned = planner.planned_steps_value if planner else planned_steps
        return 0.0 if not planned else min(1.0, budget.steps / planned)

    return steps_done


def train(config, results_dir="results/runs", clock=None):
    """Trains `config` within its budget, evaluates it, and writes the run folder
    (see `haet.results`).

    With `validation_size` > 0 that many class-balanced images are held out of the
    training subset (`split_validation`, seed `subset_seed + 1`); Keras validates on
    them after each epoch (time counted in the budget, except after the last step),
    `early_stopping_patience` and `keep_best` use `keras.callbacks.EarlyStopping` on
    validation accuracy, and the record gets the final model's validation accuracy.
    With `evaluate_test` False the test set is never read beyond loading.

    Args:
        config: a `TrainConfig`.
        results_dir: parent folder of the new run folder.
        clock: seconds function for the budget (tests pass a fake); default
            `time.perf_counter`.

    Returns:
        `(record, run_dir)`: the record dict also written to `run_dir/record.json`.

    Raises:
        ValueError: any bad setting or malformed data, before training starts.
        RuntimeError: no data can be found or downloaded.
    """
    timer = budget_lib.PhaseTimer()
    config.validate()
    commit = results.git_commit()  # the code this process runs, not the tree at the end
    previous_policy = keras.mixed_precision.global_policy()
    stack = contextlib.ExitStack()
    try:
        with timer.phase("setup"):
            parallel = None
            if config.data_parallel:
                # Open until evaluation ends: Keras' JAX trainer shards each batch by it.
                parallel = stack.enter_context(distribute.data_parallel(config.batch_size))
                logging.info("data-parallel training: %s", parallel)
            device = device_lib.describe_device()
            policy = device_lib.resolve_precision(config.precision, device)
            keras.mixed_precision.set_global_policy(policy)
            keras.utils.set_random_seed(config.seed)
            dataset, x_train, y_train, sha = load_training_data(config)
            info = dataset.info
            x_fit, y_fit, x_val, y_val = split_validation(
                x_train, y_train, config.validation_size, info.num_classes, config.subset_seed + 1)
            logging.info("backend %s, device %s, precision %s",
                         keras.backend.backend(), device, policy)
            model, augmentation = build_training_model(config, info, x_fit)
            precompute = config.precomputed_augmentation_epochs
            steps_per_epoch = len(y_fit) // config.batch_size
            schedule = config.learning_rate_schedule()
            planned = isinstance(schedule, (PlannedPiecewiseLinear, PlannedSchedule))
            # A wall-clock schedule starts at its first value; WallClockBudget moves it.
            optimizer = make_optimizer(config, schedule if planned else schedule(0.0))
            planned_steps = None
            if planned:
                planned_steps = (config.epochs or 1000) * steps_per_epoch
                schedule.attach(optimizer, planned_steps)
            loss = make_loss(config)
            model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"],
                          jit_compile=parallel["xla"] if parallel else True)
            logging.info("model %s: %d parameters, XLA %s", model.name,
                         model.count_params(), model.jit_compile)
            clock = clock or time.perf_counter
            affine = augmentation if isinstance(augmentation, RandomAffine) else None
            budget = budget_lib.WallClockBudget(
                config.budget_seconds,
                None if planned else schedule,
                augmentation=affine,
                augmentation_strength=config.strength_schedule() if affine else None,
                fill_modes=config.fill_modes,
                seed=config.seed,
                clock=clock,
            )
            callbacks = [budget]
            planner = None
            if planned and not config.epochs:
                planner = budget_lib.StepPlanner(
                    budget, schedule.planned_steps, steps_per_epoch, config.planner_probe_steps)
            raw_weights = _FinalWeights() if config.ema_decay else None
            if raw_weights:
                callbacks.append(raw_weights)
            early_stopping = None
            if config.early_stopping_patience or config.keep_best:
                early_stopping = keras.callbacks.EarlyStopping(
                    monitor="val_accuracy", mode="max",
                    patience=config.early_stopping_patience or sys.maxsize,
                    restore_best_weights=config.keep_best)
                callbacks.append(early_stopping)
            snapshots = None
            if config.snapshot_ensemble:
                snapshots = SnapshotKeeper(
                    config.cycle_ends(), _progress(budget, planner, planned_steps))
                callbacks.append(snapshots)
            # The run folder exists once the data and model are known to be good.
            run_dir = results.make_run_dir(results_dir, config.run_name())
            logging.info("run folder %s", run_dir)
            if config.tensorboard:
                callbacks.append(keras.callbacks.TensorBoard(
                    os.path.join(run_dir, "tensorboard"), write_graph=False))
            if planner:
                # Last: its epoch end measures the time the other callbacks took too.
                callbacks.append(planner)
            one_hot = info.num_classes if config.label_smoothing else None

            def loss_targets(labels):  # what the loss takes: one-hot with label smoothing
                return data_lib.one_hot(labels, one_hot) if one_hot else labels

            health = None
            if config.health_every_steps:
                probe = slice(0, config.batch_size)
                health = TrainingHealth(
                    x_fit[probe], loss_targets(y_fit[probe]), loss, config.health_every_steps,
                    os.path.join(run_dir, "tensorboard", "health") if config.tensorboard else None)
                callbacks.insert(0, health)  # before the budget, which copies its epoch logs
        epoch_images = None
        if precompute:
            # Precomputed augmentation counts toward the budget: its clock starts here.
            budget.start = clock()
            with timer.phase("precompute"):
                mean = input_statistics(config, x_fit)[0]
                epoch_images = precompute_epochs(x_fit, augmentation, precompute, 255.0 * mean)
        batches = data_lib.ShuffledBatches(
            x_fit, y_fit, config.batch_size, seed=config.seed, one_hot_classes=one_hot,
            epoch_images=epoch_images,
        )
        validation_data = None
        if config.validation_size:
            validation_data = (x_val, loss_targets(y_val))
        model.fit(
            batches,
            epochs=config.epochs or sys.maxsize,  # else the budget (or planner) stops training
            shuffle=False,  # ShuffledBatches draws a seeded permutation per epoch
            verbose=0,
            callbacks=callbacks,
            validation_data=validation_data,
            validation_batch_size=config.eval_batch_size,
        )
        with timer.phase("eval"):
            # After fit, an optimizer with EMA has written the averages into the model,
            # and keep_best has restored the best validation snapshot.
            prefix = "ema" if config.ema_decay else "best" if config.keep_best else "final"
            sets = {}
            if config.validation_size:
                sets["validation"] = (x_val, y_val)
            if config.evaluate_test:
                sets["test"] = (dataset.x_test, dataset.y_test)
            evaluated = {name: _evaluate_variants(config, model, x, y, info.num_classes, prefix,
                                                  raw_weights, snapshots)
                         for name, (x, y) in sets.items()}
    finally:
        stack.close()
        keras.mixed_precision.set_global_policy(previous_policy)

    headline = f"{prefix}_tta_{config.tta}" if config.tta != "none" else prefix
    test = evaluated.get("test")
    scores = test[0][headline] if test else None
    train_seconds = budget.train_seconds()
    images = budget.steps * config.batch_size
    compile_seconds = budget.compile_seconds()
    test_accuracy = float(scores["accuracy"]) if scores else None
    record = {
        "test_accuracy": test_accuracy,
        "test_loss": float(scores["loss"]) if scores else None,  # cross-entropy, no weight penalty
        "test_examples": int(len(dataset.y_test)) if test else 0,
        "train_examples": int(len(y_fit)),
        "validation_examples": int(len(y_val)),
        "dataset": info.name,
        "data_source": dataset.source,
        "subset_seed": config.subset_seed,
        "subset_sha256": sha,
        "model": model.name,
        "parameters": int(model.count_params()),
        "epochs": len(budget.history),
        "planned_epochs": planner.planned_epochs if planner else (config.epochs or None),
        "replanned_from_epochs": planner.replanned_from if planner else None,
        "epochs_completed": sum(row["complete"] for row in budget.history),
        "epochs_equivalent": round(images / len(y_fit), 3),
        "steps": budget.steps,
        "images_seen": images,
        "budget_seconds": config.budget_seconds,
        "setup_seconds": round(timer.seconds["setup"], 3),
        "compile_seconds": round(compile_seconds, 3),
        "train_seconds": round(train_seconds, 3),
        "eval_seconds": round(timer.seconds["eval"], 3),
        "precompute_seconds": round(timer.seconds.get("precompute", 0.0), 3),
        "images_per_second": round(images / train_seconds, 2) if train_seconds else None,
        "images_per_second_after_compile": (
            round(images / (train_seconds - compile_seconds), 2)
            if train_seconds > compile_seconds else None
        ),
        "backend": keras.backend.backend(),
        "device": device,
        "precision": policy,
        "xla": bool(model.jit_compile),
        "versions": results.versions(),
        "git_commit": commit,
        "flags": dataclasses.asdict(config),
        "command": sys.argv,
        "published": _published_comparison(config, test_accuracy) if test else None,
        "transfer": model.transfer,
        "data_parallel": parallel,
    }
    for name, (variants, members) in evaluated.items():
        record[f"{name}_accuracy_variants"] = {k: v["accuracy"] for k, v in variants.items()}
        record[f"{name}_loss_variants"] = {k: v["loss"] for k, v in variants.items()}
        if members:
            record[f"{name}_snapshot_accuracies"] = members
    if "validation" in evaluated:
        record["validation_accuracy"] = evaluated["validation"][0][headline]["accuracy"]
        record["validation_loss"] = evaluated["validation"][0][headline]["loss"]
        val_history = [row["val_accuracy"] for row in budget.history if row.get("val_accuracy") is not None]
        if val_history:
            best = int(np.argmax(val_history))
            record["best_validation_epoch"] = best + 1
            record["best_validation_accuracy_during_training"] = val_history[best]
        record["stopped_early"] = bool(early_stopping and early_stopping.stopped_epoch)
    results.write_csv(run_dir, "history.csv", budget.history)
    if health is not None:
        results.write_csv(run_dir, "health.csv", health.rows)
    if scores:
        results.write_confusion_matrix(run_dir, scores["confusion_matrix"], info.class_names)
    if budget.history:
        score_text = (f"test accuracy {test_accuracy:.2%}" if test else
                      f"validation accuracy {record['validation_accuracy']:.2%}")
        plots.plot_learning_curves(
            budget.history,
            f"{model.name} on {info.name} ({len(y_fit)} images), "
            f"{config.budget_seconds:g} s budget, {keras.backend.backend()}: {score_text}",
            os.path.join(run_dir, "learning_curves.png"),
        )
    if config.save_model:
        model.save(os.path.join(run_dir, "model.keras"), overwrite=False)
    record["run_dir"] = run_dir
    results.write_record(run_dir, record)
    logging.info(
        "%s; %d epochs (%d steps); setup %.1f s, compile %.1f s, train %.1f s, eval %.1f s, "
        "%.1f images/s -> %s",
        "; ".join(f"{name} accuracy {v[0][headline]['accuracy']:.4f}" for name, v in evaluated.items()),
        record["epochs"], record["steps"], record["setup_seconds"], record["compile_seconds"],
        record["train_seconds"], record["eval_seconds"], record["images_per_second"] or 0, run_dir,
    )
    return record, run_dir


def _evaluate_variants(config, model, x, y, num_classes, prefix, raw_weights, snapshots):
    """Scores of the final model on `(x, y)` and of its variants: with/without TTA,
    raw weights next to EMA, each snapshot and the snapshot ensemble.

    Returns:
        `(variants, snapshot_accuracies)`: variant name -> `evaluation.scores` dict, and
        the accuracy of each snapshot (empty without snapshots).
    """
    tta_modes = ["none"] + ([config.tta] if config.tta != "none" else [])

    def name(base, tta):
        return base if tta == "none" else f"{base}_tta_{tta}"

    def probabilities(tta):
        return evaluation.predict_probabilities(model, x, config.eval_batch_size, tta)

    final = {t: probabilities(t) for t in tta_modes}
    variants = {name(prefix, t): evaluation.scores(final[t], y, num_classes) for t in tta_modes}
    if raw_weights:
        averaged = [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]
        raw_weights.restore(model)
        for t in tta_modes:
            variants[name("raw", t)] = evaluation.scores(probabilities(t), y, num_classes)
        for v, value in zip(model.trainable_variables, averaged):
            v.assign(value)
    members = []
    if snapshots and snapshots.snapshots:
        # The last snapshot is the final model, already predicted above.
        earlier = [weights for _, weights in snapshots.snapshots[:-1]]
        kept = model.get_weights()
        member_probabilities = {t: [] for t in tta_modes}
        for weights in earlier:
            model.set_weights(weights)
            for t in tta_modes:
                member_probabilities[t].append(probabilities(t))
        model.set_weights(kept)
        for t in tta_modes:
            member_scores, ensemble_scores = evaluation.ensemble(
                member_probabilities[t] + [final[t]], y, num_classes)
            variants[name("snapshot_ensemble", t)] = ensemble_scores
            if t == "none":
                members = [m["accuracy"] for m in member_scores]
    return variants, members
