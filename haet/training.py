"""Train a classifier under a wall-clock budget, evaluate it, write the run's record.

The defaults of `TrainConfig` are the UMBC HAET-2021 recipe (Hosseini, Prakash,
Pirsiavash, Mohsenin, "Training a 5000x32x32x3 RGB dataset on Nvidia Tesla V100 in
10 minutes", ICLR 2021 HAET workshop; xmhosseini/HAET2021), with our protocol: a
stratified seeded 5,000-image subset, the full test set and the final model.
`flags/umbc_resnet20x6.flags` restates them for the command line.
"""

import dataclasses
import functools
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
from haet import evaluation, models, plots, results
from haet.augment import (FILL_MODES, RandomAffine, RandomCropFlipCutout, fill_mode_index,
                          precompute_epochs)
from haet.schedules import PiecewiseConstant, PlannedPiecewiseLinear, check_range


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run depends on. Units are in the field names or comments."""

    budget_seconds: float = 600.0  # training seconds, first step (compilation) included
    dataset: str = "cifar10"
    data_dir: str | None = None  # None: tensorflow-datasets
    train_size: int = 5000  # class-balanced training images
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
    lr_schedule: str = "wall_clock"  # or "one_cycle" (step-based, planned)
    learning_rate_boundaries: tuple = (0.8, 0.9)  # wall_clock: fractions of the budget
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
        if self.dataset != "folder":
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
        self.learning_rate_schedule()
        self.strength_schedule()
        self.make_augmentation()

    def learning_rate_schedule(self):
        """`PiecewiseConstant` over the budget fraction (wall_clock), or
        `PlannedPiecewiseLinear` over the planned steps (one_cycle)."""
        if self.lr_schedule == "one_cycle":
            return PlannedPiecewiseLinear(self.one_cycle_knots, self.one_cycle_learning_rates)
        schedule = PiecewiseConstant(
            self.learning_rate_boundaries, self.learning_rates, name="learning rate"
        )
        return check_range(schedule, 0.0, math.inf)

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
LR_SCHEDULES = ("wall_clock", "one_cycle")
INPUT_NORMALIZATIONS = ("pixel_mean", "channel_standardize")


def _published_comparison(config, test_accuracy):
    """The published UMBC number next to ours, when the setting is CIFAR-10 / 5,000."""
    if config.dataset != "cifar10" or config.train_size != 5000:
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




def load_training_data(config):
    """The dataset and its training subset for `config`.

    Returns:
        `(dataset, x_train, y_train, subset_sha256)`.
    """
    dataset = data_lib.load_dataset(config.dataset, config.data_dir)
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
    """
    mean, variance = input_statistics(config, x_train)
    backbone = models.build_model(config.model, **config.model_kwargs(info.num_classes, info.image_shape))
    augmentation = config.make_augmentation()
    in_model = None if config.precomputed_augmentation_epochs else augmentation
    return models.with_input_pipeline(backbone, mean, in_model, variance), augmentation


def make_loss(config):
    """Cross-entropy on logits; categorical (one-hot labels) when label smoothing is on."""
    if config.label_smoothing:
        return keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=config.label_smoothing)
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _make_optimizer(config, schedule):
    """Adam or Nesterov SGD, with Keras' own weight EMA when `ema_decay` > 0."""
    ema = {"use_ema": True, "ema_momentum": config.ema_decay} if config.ema_decay else {}
    # A wall-clock schedule starts at its first value; WallClockBudget moves it.
    learning_rate = schedule if isinstance(schedule, PlannedPiecewiseLinear) else schedule(0.0)
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


def train(config, results_dir="results/runs", clock=None):
    """Trains `config` within its budget, evaluates on the whole test split, and
    writes the run folder (see `haet.results`).

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
    previous_policy = keras.mixed_precision.global_policy()
    try:
        with timer.phase("setup"):
            device = device_lib.describe_device()
            policy = device_lib.resolve_precision(config.precision, device)
            keras.mixed_precision.set_global_policy(policy)
            keras.utils.set_random_seed(config.seed)
            dataset, x_train, y_train, sha = load_training_data(config)
            info = dataset.info
            logging.info("backend %s, device %s, precision %s",
                         keras.backend.backend(), device, policy)
            model, augmentation = build_training_model(config, info, x_train)
            precompute = config.precomputed_augmentation_epochs
            steps_per_epoch = len(y_train) // config.batch_size
            schedule = config.learning_rate_schedule()
            one_cycle = isinstance(schedule, PlannedPiecewiseLinear)
            optimizer = _make_optimizer(config, schedule)
            if one_cycle:
                planned = (config.epochs or 1000) * steps_per_epoch
                schedule.attach(optimizer, planned)
            loss = make_loss(config)
            model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"], jit_compile=True)
            logging.info("model %s: %d parameters, XLA %s", model.name,
                         model.count_params(), model.jit_compile)
            clock = clock or time.perf_counter
            affine = augmentation if isinstance(augmentation, RandomAffine) else None
            budget = budget_lib.WallClockBudget(
                config.budget_seconds,
                None if one_cycle else schedule,
                augmentation=affine,
                augmentation_strength=config.strength_schedule() if affine else None,
                fill_modes=config.fill_modes,
                seed=config.seed,
                clock=clock,
            )
            callbacks = [budget]
            planner = None
            if one_cycle and not config.epochs:
                planner = budget_lib.StepPlanner(
                    budget, schedule.planned_steps, steps_per_epoch, config.planner_probe_steps)
                callbacks.append(planner)
            raw_weights = _FinalWeights() if config.ema_decay else None
            if raw_weights:
                callbacks.append(raw_weights)
        epoch_images = None
        if precompute:
            # Precomputed augmentation counts toward the budget: its clock starts here.
            budget.start = clock()
            with timer.phase("precompute"):
                mean = input_statistics(config, x_train)[0]
                epoch_images = precompute_epochs(x_train, augmentation, precompute, 255.0 * mean)
        batches = data_lib.ShuffledBatches(
            x_train, y_train, config.batch_size, seed=config.seed,
            one_hot_classes=info.num_classes if config.label_smoothing else None,
            epoch_images=epoch_images,
        )
        model.fit(
            batches,
            epochs=config.epochs or sys.maxsize,  # else the budget (or planner) stops training
            shuffle=False,  # ShuffledBatches draws a seeded permutation per epoch
            verbose=0,
            callbacks=callbacks,
        )
        with timer.phase("eval"):
            evaluate = functools.partial(
                evaluation.evaluate, model, dataset.x_test, dataset.y_test, info.num_classes,
                config.eval_batch_size)
            variants = {}
            # After fit, an optimizer with EMA has written the averages into the model.
            prefix = "ema" if config.ema_decay else "final"
            variants[prefix] = evaluate()
            if config.tta != "none":
                variants[f"{prefix}_tta_{config.tta}"] = evaluate(tta=config.tta)
            if config.ema_decay:
                averaged = [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]
                raw_weights.restore(model)
                variants["raw"] = evaluate()
                if config.tta != "none":
                    variants[f"raw_tta_{config.tta}"] = evaluate(tta=config.tta)
                for v, value in zip(model.trainable_variables, averaged):
                    v.assign(value)
            scores = variants[f"{prefix}_tta_{config.tta}" if config.tta != "none" else prefix]
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)

    train_seconds = budget.train_seconds()
    images = budget.steps * config.batch_size
    compile_seconds = budget.compile_seconds()
    test_accuracy = float(scores["accuracy"])
    record = {
        "test_accuracy": test_accuracy,
        "test_loss": float(scores["loss"]),  # cross-entropy, no weight penalty
        "test_examples": int(len(dataset.y_test)),
        "train_examples": int(len(y_train)),
        "dataset": info.name,
        "data_source": dataset.source,
        "subset_seed": config.subset_seed,
        "subset_sha256": sha,
        "model": model.name,
        "parameters": int(model.count_params()),
        "test_accuracy_variants": {k: v["accuracy"] for k, v in variants.items()},
        "test_loss_variants": {k: v["loss"] for k, v in variants.items()},
        "epochs": len(budget.history),
        "planned_epochs": planner.planned_epochs if planner else (config.epochs or None),
        "epochs_completed": sum(row["complete"] for row in budget.history),
        "epochs_equivalent": round(images / len(y_train), 3),
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
        "git_commit": results.git_commit(),
        "flags": dataclasses.asdict(config),
        "command": sys.argv,
        "published": _published_comparison(config, test_accuracy),
    }
    run_dir = results.make_run_dir(results_dir, config.run_name())
    results.write_csv(run_dir, "history.csv", budget.history)
    results.write_confusion_matrix(run_dir, scores["confusion_matrix"], info.class_names)
    if budget.history:
        plots.plot_learning_curves(
            budget.history,
            f"{model.name} on {info.name} ({len(y_train)} images), "
            f"{config.budget_seconds:g} s budget, {keras.backend.backend()}: "
            f"test accuracy {test_accuracy:.2%}",
            os.path.join(run_dir, "learning_curves.png"),
        )
    if config.save_model:
        model.save(os.path.join(run_dir, "model.keras"), overwrite=False)
    record["run_dir"] = run_dir
    results.write_record(run_dir, record)
    logging.info(
        "test accuracy %.4f (loss %.4f) on %d images after %d epochs (%d steps); "
        "setup %.1f s, compile %.1f s, train %.1f s, eval %.1f s, %.1f images/s -> %s",
        test_accuracy, record["test_loss"], record["test_examples"], record["epochs"],
        record["steps"], record["setup_seconds"], record["compile_seconds"],
        record["train_seconds"], record["eval_seconds"], record["images_per_second"] or 0,
        run_dir,
    )
    return record, run_dir
