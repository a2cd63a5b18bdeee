"""Sanity checks before spending a budget, for any recipe and dataset.

    python -m haet.sanity --flagfile=flags/page_resnet9.flags --data_dir=../shared/data/cifar10

The two checks of Karpathy's "A Recipe for Training Neural Networks" (2019) and
Johnson's "Training Neural Networks, part 2" (2020):

1. **Initial loss.** With weight decay and label smoothing off, the untrained
   model's mean cross-entropy on the sample should be near ln(number of classes)
   (uniform predictions): within `--initial_loss_tolerance` times ln(K).
2. **Overfit a small sample.** With every regularizer off (weight decay, dropout,
   augmentation, label smoothing), Adam at a constant 1e-3 trains on
   `--sanity_batches` fixed batches; the training accuracy must reach
   `--target_accuracy` within `--max_steps` steps. Adam at a fixed rate tests the
   model and the data, whatever the recipe's optimizer.

Both build the model as a training run does (`haet.training.build_model`, the
input statistics of the whole training subset) under the recipe's precision policy.

Prints one PASS/FAIL line per check; the exit code is 0 when both pass, 1 otherwise.
"""

import dataclasses
import math

import keras
import numpy as np
from absl import logging

from haet import cli, evaluation, models, training
from haet.budget import WallClockBudget
from haet.engine import make_engine
from haet.loop import StepLimit, Training


def unregularized(config):
    """`config` with weight decay, dropout, augmentation and label smoothing off."""
    return dataclasses.replace(config, weight_decay=0.0, dropout_rate=0.0, augmentation="none",
                               label_smoothing=0.0, precomputed_augmentation_epochs=0)


def sample(config, x_train, y_train, batches):
    """The first `batches * batch_size` images of the training subset (class-balanced
    order is not needed: the subset is sorted by canonical index).

    Raises:
        ValueError: the subset holds fewer images than that, naming the flags.
    """
    n = batches * config.batch_size
    if n > len(y_train):
        raise ValueError(f"--sanity_batches={batches} batches of --batch_size={config.batch_size} are {n} images, "
                         f"more than the {len(y_train)} training images: use --sanity_batches="
                         f"{max(1, len(y_train) // config.batch_size)} or fewer.")
    return x_train[:n], y_train[:n]


def check_initial_loss(config, data, x, y, tolerance=0.25, source=None):
    """Mean cross-entropy of the untrained, unregularized model of `config` (built as a
    run builds it from `data`, under its precision policy) on `(x, y)`, from
    training-mode forward passes of `config.batch_size` images (of an ensemble, the
    mean over its members). `source`: the `--init_from` model, already loaded
    (`haet.training.load_init_from`); None: `build_model` loads it.

    Returns:
        dict: `passed` (|loss - ln K| <= tolerance * ln K), `loss`, `expected` (ln K).
    """
    config = unregularized(config)
    with training.settings_of(config):
        model, _, _ = training.build_model(config, data, source)
        # Training-mode forward passes (batch statistics in batch norm, as the first
        # steps see them; the untrained moving statistics would say nothing), with
        # dropout and augmentation already off.
        # Of an ensemble, every member takes every batch.
        batches = range(0, len(x), config.batch_size)
        logits = np.concatenate([
            np.asarray(model(models.for_every_member(model, x[i:i + config.batch_size]), training=True),
                       dtype=np.float64) for i in batches])
        y = np.concatenate([models.for_every_member(model, y[i:i + config.batch_size]) for i in batches])
    loss = evaluation.cross_entropy(logits, y)
    expected = math.log(data.info.num_classes)
    return {"passed": abs(loss - expected) <= tolerance * expected, "loss": loss, "expected": expected}


class _StopAtAccuracy(StepLimit):
    """Stops when an epoch's training accuracy reaches `target`, or after `max_steps`."""

    crosses_epochs = False  # it stops at the first epoch end with the accuracy

    def __init__(self, target, max_steps):
        super().__init__(max_steps)
        self.target, self.accuracy = target, 0.0

    def on_epoch_end(self, run, epoch, logs):
        self.accuracy = logs["accuracy"]
        if self.accuracy >= self.target:
            run.stop("target_accuracy")


def check_overfit(config, data, x, y, max_steps=500, target_accuracy=0.99, source=None):
    """Trains the unregularized model on `(x, y)` (Adam 1e-3, the
    recipe's precision policy) with haet's engine.

    An epoch is one pass over the sample; the check passes when an epoch's training
    accuracy reaches `target_accuracy` within `max_steps` steps. `source`: as
    `check_initial_loss`.

    Returns:
        dict: `passed`, `accuracy` (the last epoch's), `steps`.
    """
    config = unregularized(config)
    with training.settings_of(config) as settings:
        model, _, _ = training.build_model(config, data, source)
        model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"], jit_compile=settings.parallel["xla"] if settings.parallel else True)
        engine = make_engine(model, x, y, min(config.batch_size, len(y)), seed=config.seed,
                             steps_per_execution=config.steps_per_execution)
        budget = WallClockBudget(math.inf)
        stop = _StopAtAccuracy(target_accuracy, max_steps)
        Training(engine, budget, [budget, stop]).fit()
    return {"passed": stop.accuracy >= target_accuracy, "accuracy": stop.accuracy, "steps": budget.steps}


def main(argv):
    del argv
    from absl import app, flags

    from haet import train as entry

    f = flags.FLAGS
    cli.refuse_unread({"resume": "the checks train a fresh model (--init_from=MODEL to check a trained one).",
                       "results_dir": "the checks write no files."})
    config = entry.config_from_flags()
    try:
        source = training.load_init_from(config)  # a damaged --init_from, before the data are read
        data = training.prepare_data(config)
        x, y = sample(config, data.x_fit, data.y_fit, f.sanity_batches)
    except (ValueError, RuntimeError) as e:  # bad data, or a sample larger than the subset
        raise app.UsageError(str(e), exitcode=cli.USAGE_ERROR) from None
    try:
        initial = check_initial_loss(config, data, x, y, f.initial_loss_tolerance, source)
    except training.SetupError as e:  # an --init_from model that does not fit this one
        raise app.UsageError(str(e), exitcode=cli.USAGE_ERROR) from None
    print(f"{'PASS' if initial['passed'] else 'FAIL'} initial loss {initial['loss']:.4f}, "
          f"expected ln({data.info.num_classes}) = {initial['expected']:.4f} "
          f"(tolerance {f.initial_loss_tolerance:.0%})")
    overfit = check_overfit(config, data, x, y, f.max_steps, f.target_accuracy, source)
    print(f"{'PASS' if overfit['passed'] else 'FAIL'} overfit {len(y)} images: training accuracy "
          f"{overfit['accuracy']:.4f} after {overfit['steps']} steps (target {f.target_accuracy})")
    logging.info("sanity checks on %s, model %s", data.info.name, config.model)
    raise SystemExit(0 if initial["passed"] and overfit["passed"] else 1)


if __name__ == "__main__":
    from absl import flags

    import haet.train  # noqa: F401 -- defines the training flags (--flagfile recipes work)

    flags.DEFINE_integer("sanity_batches", 5, "Batches of the training subset in the sample.", lower_bound=1)
    flags.DEFINE_float("initial_loss_tolerance", 0.25, "Allowed |loss - ln K| as a fraction of ln K.",
                       lower_bound=0.0)
    flags.DEFINE_integer("max_steps", 500, "Training steps allowed to overfit the sample.", lower_bound=1)
    flags.DEFINE_float("target_accuracy", 0.99, "Training accuracy the overfit check needs.", lower_bound=0.0,
                       upper_bound=1.0)
    for name in ("initial_loss_tolerance", "target_accuracy"):  # (absl's bounds let nan through)
        flags.register_validator(name, math.isfinite, f"--{name} must be a finite number.")
    cli.run(main)
