"""Train a classifier under a wall-clock budget, evaluate it, write the run's record.

The defaults of `TrainConfig` are the UMBC HAET-2021 recipe (Hosseini, Prakash,
Pirsiavash, Mohsenin, "Training a 5000x32x32x3 RGB dataset on Nvidia Tesla V100 in
10 minutes", ICLR 2021 HAET workshop; xmhosseini/HAET2021), with our protocol: a
stratified seeded 5,000-image subset, the full test set and the final model.
`flags/umbc_resnet20x6.flags` restates them for the command line.
"""

import dataclasses
import math
import os
import sys

import keras
import numpy as np
from absl import logging

from haet import budget as budget_lib
from haet import data as data_lib
from haet import device as device_lib
from haet import evaluation, models, plots, results
from haet.augment import FILL_MODES, RandomAffine, fill_mode_index
from haet.schedules import PiecewiseConstant, check_range


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
    width_multiplier: int = 6
    dropout_rate: float = 0.25
    weight_decay: float = 1e-4  # L2 factor on conv kernels
    batch_size: int = 32  # examples per step
    precision: str = "auto"
    learning_rate_boundaries: tuple = (0.8, 0.9)  # fractions of the budget
    learning_rates: tuple = (1e-3, 1e-4, 1e-5)  # Adam
    augment: bool = True
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
        info = data_lib.dataset_info(self.dataset)
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
        for name in ("batch_size", "eval_batch_size", "train_size", "width_multiplier"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer. Received: {name}={value!r}")
        if self.train_size % info.num_classes and self.train_size != info.train_examples:
            raise ValueError(
                f"train_size={self.train_size} is not a multiple of the {info.num_classes} "
                f"classes of {info.name}."
            )
        if self.batch_size > self.train_size:
            raise ValueError(
                f"batch_size={self.batch_size} is larger than train_size={self.train_size}."
            )
        if self.train_size > info.train_examples:
            raise ValueError(
                f"train_size={self.train_size} is larger than the {info.train_examples} "
                f"training images of {info.name}."
            )
        self.learning_rate_schedule()
        self.strength_schedule()
        RandomAffine(self.shift_range, self.zoom_range, self.rotation_range, self.shear_range)

    def learning_rate_schedule(self):
        schedule = PiecewiseConstant(
            self.learning_rate_boundaries, self.learning_rates, name="learning rate"
        )
        return check_range(schedule, 0.0, math.inf)

    def strength_schedule(self):
        schedule = PiecewiseConstant(
            self.augment_strength_boundaries, self.augment_strengths, name="augmentation strength"
        )
        return check_range(schedule, 0.0, 1.0)

    def run_name(self):
        return (
            f"{self.dataset}{self.train_size}_{self.model}x{self.width_multiplier}_"
            f"{self.budget_seconds:g}s_{keras.backend.backend()}_seed{self.seed}"
        )


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
            dataset = data_lib.load_dataset(config.dataset, config.data_dir)
            info = dataset.info
            indices = data_lib.stratified_subset(
                dataset.y_train, config.train_size, info.num_classes, config.subset_seed
            )
            x_train, y_train = dataset.x_train[indices], dataset.y_train[indices]
            sha = data_lib.subset_sha256(x_train, y_train)
            logging.info(
                "%s from %s: %d training images (subset seed %d, sha256 %s), %d test images",
                info.name, dataset.source, len(y_train), config.subset_seed, sha,
                len(dataset.y_test),
            )
            logging.info("backend %s, device %s, precision %s",
                         keras.backend.backend(), device, policy)
            pixel_mean = (x_train.astype(np.float32) / 255.0).mean(axis=0)
            backbone = models.build_model(
                config.model,
                width_multiplier=config.width_multiplier,
                dropout_rate=config.dropout_rate,
                weight_decay=config.weight_decay,
                num_classes=info.num_classes,
                input_shape=info.image_shape,
            )
            augmentation = None
            if config.augment:
                augmentation = RandomAffine(
                    config.shift_range, config.zoom_range, config.rotation_range,
                    config.shear_range, config.horizontal_flip, seed=config.seed,
                    name="augmentation",
                )
            model = models.with_input_pipeline(backbone, pixel_mean, augmentation)
            lr_schedule = config.learning_rate_schedule()
            model.compile(
                optimizer=keras.optimizers.Adam(learning_rate=lr_schedule(0.0)),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"],
                jit_compile=True,
            )
            logging.info("model %s: %d parameters, XLA %s", model.name,
                         model.count_params(), model.jit_compile)
            clock_kwargs = {"clock": clock} if clock else {}
            budget = budget_lib.WallClockBudget(
                config.budget_seconds,
                lr_schedule,
                augmentation=augmentation,
                augmentation_strength=config.strength_schedule() if augmentation else None,
                fill_modes=config.fill_modes,
                seed=config.seed,
                **clock_kwargs,
            )
            batches = data_lib.ShuffledBatches(
                x_train, y_train, config.batch_size, seed=config.seed
            )
        model.fit(
            batches,
            epochs=sys.maxsize,  # the budget callback stops training
            shuffle=False,  # ShuffledBatches draws a seeded permutation per epoch
            verbose=0,
            callbacks=[budget],
        )
        with timer.phase("eval"):
            scores = evaluation.evaluate(
                model, dataset.x_test, dataset.y_test, info.num_classes, config.eval_batch_size
            )
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
        "epochs": len(budget.history),
        "epochs_completed": sum(row["complete"] for row in budget.history),
        "epochs_equivalent": round(images / len(y_train), 3),
        "steps": budget.steps,
        "images_seen": images,
        "budget_seconds": config.budget_seconds,
        "setup_seconds": round(timer.seconds["setup"], 3),
        "compile_seconds": round(compile_seconds, 3),
        "train_seconds": round(train_seconds, 3),
        "eval_seconds": round(timer.seconds["eval"], 3),
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
        "flags": {k: list(v) if isinstance(v, tuple) else v
                  for k, v in dataclasses.asdict(config).items()},
        "command": sys.argv,
        "published": _published_comparison(config, test_accuracy),
    }
    run_dir = results.make_run_dir(results_dir, config.run_name())
    results.write_history(run_dir, budget.history)
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
