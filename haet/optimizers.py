"""Optimizers and the training loss: Keras' own, chosen by the `--optimizer` flag.

- adam: `keras.optimizers.Adam` with its defaults (UMBC HAET-2021 used TF 2.4's Adam,
  beta 0.9/0.999, epsilon 1e-7);
- sgd: `keras.optimizers.SGD` with Nesterov momentum (Page's ResNet-9).
The moving average of the weights (`--ema_decay`) is `haet.averaging`'s, kept by the
engine (Keras' `use_ema` has no warm-up and leaves the batch-norm statistics out).
The loss is the softmax cross-entropy on logits, with label smoothing when set.
"""

import re

import keras
import numpy as np
from absl import logging
from keras import ops

from haet import fields
from haet.fields import Field, Kind


class _HaetOptimizer:
    """What haet adds to Keras' SGD and Adam (subclasses below; otherwise they behave
    as Keras' own):

    - per-variable learning-rate multipliers: Keras 3 optimizers have no parameter
      groups, so `learning_rate_multipliers`, pairs `(pattern, multiplier)`, scale
      the learning rate of every variable whose path matches the regular expression
      `pattern` (`re.search`; the first match wins) inside `update_step`, exactly
      as a PyTorch parameter group with that learning rate (Page's ResNet-9 gives
      batch-norm shifts 64x the learning rate, davidcpage/cifar10-fast
      bag_of_tricks.ipynb; airbench too), L2 regularization in the loss included
      (haet's models' `kernel_regularizer`s, PyTorch's coupled `weight_decay`).
      Not Keras' decoupled `weight_decay=`: Keras applies it at the base learning
      rate to every variable before `update_step` (a PyTorch group would scale it
      too), so a warning is logged when both are given;
    - a step-planned learning-rate schedule (`haet.schedules.PlannedSchedule`...)
      gets its planned-steps and plan-offset variables back when a saved model is
      loaded: Keras builds a loaded optimizer, then restores its variables only if
      their count matches the saved one, and the plan is among them. Keras
      optimizers have no hook for a schedule's own variables. A model saved before
      the plan had an offset (one variable fewer, its planned steps where the saved
      config says) loads its whole state too, the offset at 0, as it then was
      (under mixed_float16 the loss-scale optimizer's own state, its scale and
      counter, starts afresh: Keras skips it on the count).

    Raises:
        ValueError: multipliers not given as a list of `(pattern, multiplier)` pairs,
            a multiplier that is not a positive finite number, or a pattern that is
            not a regular expression (a str).
    """

    def __init__(self, *args, learning_rate_multipliers=(), **kwargs):
        super().__init__(*args, **kwargs)
        pairs = []
        given = learning_rate_multipliers or ()
        if len(given) == 2 and isinstance(given[0], str):  # one pair, not a list of pairs
            raise ValueError(f"learning_rate_multipliers takes a list of (pattern, multiplier) pairs. Received "
                             f"{given!r}: pass [{given!r}].")
        for pair in given:
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], str)):
                raise ValueError(f"learning_rate_multipliers takes (pattern, multiplier) pairs, the pattern a str. "
                                 f"Received: {pair!r}")
            pattern, multiplier = pair
            if (isinstance(multiplier, bool) or not isinstance(multiplier, (int, float, np.floating, np.integer))
                    or not 0 < multiplier < float("inf")):
                raise ValueError(f"A learning-rate multiplier must be a positive finite number. Received: "
                                 f"{multiplier!r} for {pattern!r}")
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"{pattern!r} is not a regular expression ({e}).") from None
            pairs.append((str(pattern), float(multiplier)))
        self.learning_rate_multipliers = tuple(pairs)
        if self.weight_decay and any(m != 1.0 for _, m in pairs):
            logging.warning("%s(weight_decay=%g): Keras decays every variable at the base learning rate, not "
                            "scaled by learning_rate_multipliers; for a decay the multipliers scale (as a PyTorch "
                            "parameter group), use an L2 kernel_regularizer instead", type(self).__name__,
                            self.weight_decay)

    def multiplier_of(self, variable):
        """The learning-rate multiplier of `variable` (1.0 when no pattern matches its path)."""
        for pattern, multiplier in self.learning_rate_multipliers:
            if re.search(pattern, variable.path):
                return multiplier
        return 1.0

    def update_step(self, gradient, variable, learning_rate):
        # The TensorFlow backend passes the tf.Variable inside the Keras one: look it up.
        multiplier = self._multipliers[self._get_variable_index(variable)] if self.learning_rate_multipliers else 1.0
        if multiplier != 1.0:
            learning_rate = ops.cast(learning_rate, variable.dtype) * multiplier
        return super().update_step(gradient, variable, learning_rate)

    def build(self, variables):
        schedule = getattr(self, "_learning_rate", None)
        # Only a schedule loaded with its plan: a new one left unattached must fail at
        # its first step (`fraction`), not plan one step and train at its end value.
        if (getattr(schedule, "unit", None) == "steps" and getattr(schedule, "planned_steps", 1) is None
                and schedule.saved_planned_steps is not None):
            schedule.attach(self, schedule.saved_planned_steps, plan_offset=schedule.saved_plan_offset)
        super().build(variables)
        self._multipliers = [self.multiplier_of(v) for v in variables]

    def load_own_variables(self, store):
        schedule = getattr(self, "_learning_rate", None)
        offset = getattr(schedule, "plan_offset", None)
        if offset is not None and len(store.keys()) == len(self.variables) - 1:
            # Saved before plans had an offset: every variable but it, in order.
            kept = [v for v in self.variables if v is not offset]
            plan = next(i for i, v in enumerate(kept) if v is schedule.planned_steps)
            if (all(tuple(store[str(i)].shape) == tuple(v.shape) for i, v in enumerate(kept))
                    and schedule.saved_planned_steps is not None
                    and float(store[str(plan)]) == float(schedule.saved_planned_steps)):
                for i, variable in enumerate(kept):
                    variable.assign(store[str(i)])
                return
        super().load_own_variables(store)

    def get_config(self):
        return {**super().get_config(),
                "learning_rate_multipliers": [list(pair) for pair in self.learning_rate_multipliers]}


@keras.saving.register_keras_serializable(package="haet")
class SGD(_HaetOptimizer, keras.optimizers.SGD):
    """`keras.optimizers.SGD` with per-variable learning-rate multipliers and a planned
    schedule restored on load (see `_HaetOptimizer`)."""


@keras.saving.register_keras_serializable(package="haet")
class Adam(_HaetOptimizer, keras.optimizers.Adam):
    """`keras.optimizers.Adam` with per-variable learning-rate multipliers and a planned
    schedule restored on load (see `_HaetOptimizer`)."""


# The batch-norm statistics of the averaged weights (`--ema_statistics`).
EMA_STATISTICS = ("average", "recompute", "raw")

# Batch-norm shifts (betas) of Keras' BatchNormalization and haet's GhostBatchNormalization.
BATCH_NORM_SHIFTS = r"(^|/)beta$"


def learning_rate_multipliers(config):
    """The `(pattern, multiplier)` pairs of `config` (`bn_shift_lr_multiplier`)."""
    if config.bn_shift_lr_multiplier == 1.0:
        return ()
    return ((BATCH_NORM_SHIFTS, config.bn_shift_lr_multiplier),)


def _adam(learning_rate, multipliers):
    return Adam(learning_rate, learning_rate_multipliers=multipliers)


def _sgd(learning_rate, momentum, multipliers):
    return SGD(learning_rate, momentum=momentum, nesterov=True, learning_rate_multipliers=multipliers)


# The optimizers the `--optimizer` flag names; every builder also takes
# `learning_rate` (a float or a keras schedule) and `multipliers` (`learning_rate_multipliers`).
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
    Field("ema_statistics", "average", "EMA: the batch-norm statistics the averaged weights are evaluated "
          "with: average (averaged with the weights, as Page), recompute (after training, the mean of the batch "
          "statistics of up to 2,048 training images under the averaged weights, as SWA; outside the budget, "
          "recorded as ema_statistics_seconds) or raw (the raw weights' own).",
          fields.one_of(EMA_STATISTICS, "ema_statistics")),
    Field("bn_shift_lr_multiplier", 1.0, "Learning rate of the batch-norm shifts (betas) x this (Page's "
          "ResNet-9 and airbench: 64, with frozen scales).", fields.positive()),
    Field("lookahead", False, "airbench's lookahead: from --lookahead_start_epochs on, every "
          "--lookahead_every_steps steps the weights (and batch-norm statistics) move to a moving average of "
          "themselves with momentum --lookahead_decay ** k * (fraction of the plan done) ** --lookahead_power, and "
          "take its values once more when training ends; needs --epochs or a planned schedule."),
    Field("lookahead_decay", 0.95, "lookahead: base momentum per step, in [0, 1).", fields.in_range(0, 1, high_open=True)),
    Field("lookahead_every_steps", 5, "lookahead: steps between updates.", fields.positive(integer=True)),
    Field("lookahead_power", 3.0, "lookahead: exponent of the (fraction of the plan done) ramp of the momentum.",
          fields.at_least(0)),
    Field("lookahead_start_epochs", 0.0, "lookahead: epochs before the first update (airbench94: 0, the average "
          "starting at the initial weights; 3 before its March 2024 version).", fields.at_least(0)),
    Field("label_smoothing", 0.0, "Label smoothing of the cross-entropy, in [0, 1).",
          fields.in_range(0, 1, high_open=True)),
)


def make_lookahead(config, steps_per_epoch, total_steps, plan, plan_offset=None):
    """The `haet.averaging.Lookahead` of `config` (None without `lookahead`); the run's
    length is `plan` (a schedule's planned-steps variable, with its `plan_offset`) or
    else `total_steps`."""
    from haet.averaging import Lookahead

    if not config.lookahead:
        return None
    return Lookahead(total_steps, config.lookahead_decay, config.lookahead_every_steps,
                     config.lookahead_power, round(config.lookahead_start_epochs * steps_per_epoch), plan=plan,
                     plan_offset=plan_offset)


def make_moving_average(config):
    """The `haet.averaging.ExponentialMovingAverage` of `config`, or None without `ema_decay`."""
    from haet.averaging import ExponentialMovingAverage

    if not config.ema_decay:
        return None
    return ExponentialMovingAverage(config.ema_decay, config.ema_every_steps, config.ema_warmup,
                                    config.ema_statistics == "average")


def make_optimizer(config, learning_rate):
    """The optimizer `config.optimizer` at `learning_rate` (a float or a
    `keras.optimizers.schedules.LearningRateSchedule`)."""
    return fields.build(OPTIMIZERS, "optimizer", config.optimizer, config, learning_rate=learning_rate,
                        multipliers=learning_rate_multipliers(config))


def make_loss(config):
    """Cross-entropy on logits; categorical (one-hot labels) when label smoothing is on."""
    if config.label_smoothing:
        return keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=config.label_smoothing)
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def inner(optimizer):
    """The optimizer that holds the variables: the one a `LossScaleOptimizer`
    (mixed_float16) wraps, else `optimizer` itself."""
    return getattr(optimizer, "inner_optimizer", optimizer)


def learning_rate_variable(optimizer):
    """The variable holding `optimizer`'s learning rate when it is a number (not a
    schedule): the one a host-driven schedule writes.

    Raises:
        ValueError: the optimizer follows a schedule of its own.
    """
    holder = inner(optimizer)
    for variable in holder.variables:
        if variable.name == "learning_rate":
            return variable
    raise ValueError(f"{type(holder).__name__} has no learning-rate variable: it follows a schedule.")
