"""Optimizers and the training loss: Keras' own, chosen by the `--optimizer` flag.

- adam: `keras.optimizers.Adam` with its defaults (UMBC HAET-2021 used TF 2.4's Adam,
  beta 0.9/0.999, epsilon 1e-7);
- sgd: `keras.optimizers.SGD` with Nesterov momentum (Page's ResNet-9).
The moving average of the weights (`--ema_decay`) is `haet.averaging`'s, kept by the
engine (Keras' `use_ema` has no warm-up and leaves the batch-norm statistics out).
The loss is the softmax cross-entropy on logits, with label smoothing when set.
"""

import keras

from haet import fields
from haet.fields import Field, Kind


class _PlanOnBuild:
    """Keras optimizers whose step-planned learning-rate schedule
    (`haet.schedules.PlannedSchedule`...) gets its planned-steps variable back when a
    saved model is loaded: Keras builds a loaded optimizer, then restores its
    variables only if their count matches the saved one, and the plan is one of
    them. Keras optimizers have no hook for a schedule's own variables, hence these
    two subclasses; they behave as Keras' SGD and Adam otherwise."""

    def build(self, variables):
        schedule = getattr(self, "_learning_rate", None)
        if getattr(schedule, "unit", None) == "steps" and getattr(schedule, "planned_steps", 1) is None:
            schedule.attach(self, schedule.saved_planned_steps or 1.0)
        super().build(variables)


@keras.saving.register_keras_serializable(package="haet")
class SGD(_PlanOnBuild, keras.optimizers.SGD):
    """`keras.optimizers.SGD` that restores a planned schedule's plan on load (see `_PlanOnBuild`)."""


@keras.saving.register_keras_serializable(package="haet")
class Adam(_PlanOnBuild, keras.optimizers.Adam):
    """`keras.optimizers.Adam` that restores a planned schedule's plan on load (see `_PlanOnBuild`)."""


def _adam(learning_rate):
    return Adam(learning_rate)


def _sgd(learning_rate, momentum):
    return SGD(learning_rate, momentum=momentum, nesterov=True)


# The optimizers the `--optimizer` flag names; every builder also takes
# `learning_rate` (a float or a keras schedule).
OPTIMIZERS = {
    "adam": Kind(_adam, (), None, "Adam"),
    "sgd": Kind(_sgd, ("momentum",), None, "SGD with Nesterov momentum"),
}

FIELDS = (
    Field("optimizer", "adam", "Optimizer. " + fields.table_help(OPTIMIZERS) + ".",
          fields.one_of(OPTIMIZERS, "optimizer")),
    Field("momentum", 0.9, "sgd: momentum, in [0, 1).", fields.in_range(0, 1, high_open=True)),
    Field("ema_decay", 0.0, "Momentum per step of the exponential moving average of the weights, in [0, 1) "
          "(horizon about 1 / (1 - decay) steps); the averaged weights are the final ones. 0: off.",
          fields.in_range(0, 1, high_open=True)),
    Field("ema_every_steps", 1, "EMA: update the average every this many steps, with momentum "
          "ema_decay ** ema_every_steps (Page: 0.99 per step, every 5 steps).", fields.positive(integer=True)),
    Field("ema_warmup", True, "EMA: the n-th update's momentum is at most (1 + n) / (10 + n) (TensorFlow's "
          "ExponentialMovingAverage num_updates), so short runs average recent weights, not initial ones."),
    Field("ema_batch_norm_statistics", True, "EMA: average the batch-norm moving means and variances with the "
          "weights (else the averaged weights are evaluated with the raw weights' statistics)."),
    Field("label_smoothing", 0.0, "Label smoothing of the cross-entropy, in [0, 1).",
          fields.in_range(0, 1, high_open=True)),
)


def make_moving_average(config):
    """The `haet.averaging.ExponentialMovingAverage` of `config`, or None without `ema_decay`."""
    from haet.averaging import ExponentialMovingAverage

    if not config.ema_decay:
        return None
    return ExponentialMovingAverage(config.ema_decay, config.ema_every_steps, config.ema_warmup,
                                    config.ema_batch_norm_statistics)


def make_optimizer(config, learning_rate):
    """The optimizer `config.optimizer` at `learning_rate` (a float or a
    `keras.optimizers.schedules.LearningRateSchedule`)."""
    return fields.build(OPTIMIZERS, "optimizer", config.optimizer, config, learning_rate=learning_rate)


def make_loss(config):
    """Cross-entropy on logits; categorical (one-hot labels) when label smoothing is on."""
    if config.label_smoothing:
        return keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=config.label_smoothing)
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def learning_rate_variable(optimizer):
    """The variable holding `optimizer`'s learning rate when it is a number (not a
    schedule): the one a host-driven schedule writes.

    Raises:
        ValueError: the optimizer follows a schedule of its own.
    """
    inner = getattr(optimizer, "inner_optimizer", optimizer)  # LossScaleOptimizer (mixed_float16)
    for variable in inner.variables:
        if variable.name == "learning_rate":
            return variable
    raise ValueError(f"{type(inner).__name__} has no learning-rate variable: it follows a schedule.")
