"""Weight averaging inside the compiled training step: an exponential moving average
of the weights and of the batch-norm statistics, with a warm-up and updates every k
steps.

Keras optimizers keep a moving average of the trainable weights (`use_ema`), but
one that (a) starts from the first step's weights with the full momentum, so a run
of a few hundred steps at momentum 0.998 ends with weights still close to their
random initialization (a 10 s run reported 10.00%); (b) leaves the batch-norm
moving statistics out, so averaged weights are evaluated with the statistics of
the raw ones; (c) updates at every step. Hence this class (TensorFlow's
`tf.train.ExponentialMovingAverage` has the warm-up but no Keras 3 or JAX form).

An averager is state next to the model's: `variables` (Keras variables, part of the
engine's training state, its snapshots and checkpoints), and `update`, a pure
function of the weights, its own values and the optimizer's that `haet.engine` calls
after every optimizer step, inside the compiled execution (nothing crosses to the
host). `Lookahead` (airbench's) writes its average back into the weights.
"""

import keras
import numpy as np
from keras import ops

from haet import fields, schedules
from haet.layers import GhostBatchNormalization

# Layers whose non-trainable variables are batch statistics (averaged with the weights).
NORMALIZATION_LAYERS = (keras.layers.BatchNormalization, GhostBatchNormalization)


def _layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _layers(layer)


def batch_norm_statistics(model):
    """The moving means and variances of `model`'s batch-norm layers (nested models
    included), in the order of `model.non_trainable_variables`: a list of variables."""
    wanted = {id(v) for layer in _layers(model) if isinstance(layer, NORMALIZATION_LAYERS)
              for v in (layer.moving_mean, layer.moving_variance)}
    return [v for v in model.non_trainable_variables if id(v) in wanted]


def recompute_batch_norm_statistics(model, images, batch_size, max_images=2048, seed=0):
    """Sets every batch-norm layer's moving mean and variance to the mean of its batch
    statistics over training batches, computed with the model's current weights (in
    training mode: augmentation and dropout as in training). SWA's `update_bn`
    (Izmailov et al. 2018, "Averaging weights leads to wider optima and better
    generalization"): averaged weights are evaluated with statistics that belong to
    them, neither the raw weights' nor an average of past ones.

    Each layer's momentum is set to `(k - 1) / k` for the `k`-th batch (a cumulative
    mean: Keras reads it when the layer is called, here eagerly) and restored after.
    Frozen layers (`trainable=False`) keep their statistics. Every member of an
    `haet.models.EnsembleModel` sees each whole batch.

    Args:
        model: a built `keras.Model` (uint8 input pipeline included).
        images: training images as the model takes them, `(N, H, W, C)`.
        batch_size: images per forward pass (the training batch size: ghost batch
            norm needs a multiple of its splits).
        max_images: at most this many images (whole batches; at least one batch,
            or all N images when they are fewer than a batch), drawn without
            replacement with `seed`.
        seed: int seed of the draw.

    Returns:
        The number of images used.

    Raises:
        ValueError: no images (the statistics would be NaN), or a `batch_size` or
            `max_images` that is not a positive integer; before any layer is changed.
    """
    for name, value in (("batch_size", batch_size), ("max_images", max_images)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer. Received: {value!r}")
    if not len(images):
        raise ValueError("recompute_batch_norm_statistics needs training images: received none (the statistics "
                         "would be NaN).")
    layers = [layer for layer in _layers(model) if isinstance(layer, NORMALIZATION_LAYERS)]
    count = min(len(images), max(1, min(len(images), max_images) // batch_size) * batch_size)
    chosen = np.random.default_rng(seed).permutation(len(images))[:count]
    momenta = [layer.momentum for layer in layers]
    from haet.models import for_every_member

    try:
        for k, start in enumerate(range(0, count, batch_size), start=1):
            for layer in layers:
                layer.momentum = (k - 1) / k
            model(for_every_member(model, images[np.sort(chosen[start:start + batch_size])]), training=True)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
    return count


def _variable_name(prefix, variable):
    return f"{prefix}_{variable.path.replace('/', '_')}"


class ExponentialMovingAverage:
    """Exponential moving average of the weights (and batch-norm statistics), updated
    inside the compiled training step.

    After every `every_steps`-th step the average moves toward the current values:
    `average = d * average + (1 - d) * value` with, for the `n`-th update (from 0),
    `d = min(decay ** every_steps, (1 + n) / (10 + n))` when `warmup` is on (the
    `num_updates` rule of TensorFlow's `tf.train.ExponentialMovingAverage`: early
    updates weigh the current weights heavily, so the average of a short run is
    close to its last weights instead of its initial ones), or `decay ** every_steps`
    without it. `decay` is per step, so changing `every_steps` keeps the horizon
    (about `1 / (1 - decay)` steps). Page's bag of tricks (davidcpage/cifar10-fast,
    bag_of_tricks.ipynb): decay 0.99 per step applied every 5 steps (0.99**5), batch
    statistics averaged too.

    Averages start at the weights' values when `build` is called.

    Args:
        decay: per-step momentum in [0, 1).
        every_steps: update every this many optimizer steps (>= 1).
        warmup: the `(1 + n) / (10 + n)` cap on the decay of update `n`.
        statistics: also average the batch-norm moving means and variances
            (`batch_norm_statistics`), so averaged weights are evaluated with
            statistics that match them.

    Attributes (after `build`):
        variables: `[steps (int32), *averages]`: the steps seen, then one float32
            average per trainable variable and per averaged statistic.

    Raises:
        ValueError: a decay outside [0, 1) or `every_steps` < 1.
    """

    prefix = "ema"

    def __init__(self, decay, every_steps=1, warmup=True, statistics=True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1) (momentum per step). Received: decay={decay!r}")
        if not (isinstance(every_steps, (int, np.integer)) and every_steps >= 1):
            raise ValueError(f"every_steps must be a positive integer. Received: every_steps={every_steps!r}")
        self.decay = float(decay)
        self.every_steps = int(every_steps)
        self.warmup = bool(warmup)
        self.statistics = bool(statistics)
        self.variables = None

    def build(self, model):
        """Creates the averages, starting at `model`'s current values."""
        self.trainable_count = len(model.trainable_variables)
        statistics = batch_norm_statistics(model) if self.statistics else []
        positions = {id(v): i for i, v in enumerate(model.non_trainable_variables)}
        self.statistic_indices = [positions[id(v)] for v in statistics]
        sources = [*model.trainable_variables, *statistics]
        self.steps = keras.Variable(0, dtype="int32", trainable=False, name=f"{self.prefix}_steps")
        # Copies on the host: an average must not share its buffer with the weight.
        self.averages = [keras.Variable(np.array(keras.ops.convert_to_numpy(v.value), np.float32), trainable=False,
                                        name=_variable_name(self.prefix, v)) for v in sources]
        self.variables = [self.steps, *self.averages]

    def update(self, trainable, non_trainable, values, optimizer_values=None):
        """One step: `(trainable, non_trainable, values)` after it (pure; the weights are
        returned unchanged). `values` holds the current values of `variables`."""
        steps = values[0] + 1
        update = ops.equal(ops.mod(steps, self.every_steps), 0)
        n = ops.cast(steps // self.every_steps - 1, "float32")  # updates before this one
        decay = ops.convert_to_tensor(self.decay ** self.every_steps, "float32")
        if self.warmup:
            decay = ops.minimum(decay, (1.0 + n) / (10.0 + n))
        decay = ops.where(update, decay, 1.0)
        current = [*trainable, *(non_trainable[i] for i in self.statistic_indices)]
        averages = [decay * a + (1.0 - decay) * ops.cast(v, "float32") for a, v in zip(values[1:], current)]
        return trainable, non_trainable, [steps, *averages]

    def average_weights(self, model):
        """`(trainable, non_trainable)` value lists of `model` with the averages in place
        of the weights (and the averaged statistics), NumPy arrays in the variables'
        dtypes; the model is left untouched."""
        values = [keras.ops.convert_to_numpy(a.value) for a in self.averages]
        trainable = [v.astype(t.dtype) for v, t in zip(values, model.trainable_variables)]
        non_trainable = [keras.ops.convert_to_numpy(v.value) for v in model.non_trainable_variables]
        for i, value in zip(self.statistic_indices, values[self.trainable_count:]):
            non_trainable[i] = value.astype(non_trainable[i].dtype)
        return trainable, non_trainable

    def write_into(self, model):
        """Writes `average_weights(model)` into `model`'s variables (the weights and
        the averaged statistics take the averages' values)."""
        for variables, values in zip((model.trainable_variables, model.non_trainable_variables),
                                     self.average_weights(model)):
            for variable, value in zip(variables, values):
                variable.assign(value)


class Lookahead(ExponentialMovingAverage):
    """airbench's "lookahead" (KellerJordan/cifar10-airbench, airbench94.py since its
    commit 74e145d of 2024-03-26, the 94.01% version, kept as legacy/airbench94.py): an
    exponential moving average of the weights and batch-norm statistics that is
    copied back into them, inside the compiled step.

    Every `every_steps`-th step from `start_step` on, the average moves toward the
    current values with momentum `rho = decay ** every_steps * (step / total_steps) **
    power` (averaging weakly early, strongly at the end) and the weights take the
    average's values. With `start_step` 0 (airbench) the average starts at the
    weights' values when `build` is called (the initial weights); otherwise its first
    update takes the current values (`rho` 0). At the end of training the weights
    take the average's values once more (`haet.hooks.LookaheadEnd`, airbench's
    `update(decay=1.0)` after its last step): the steps since the last update are
    dropped. (airbench before 74e145d started at epoch 3 and copied back after every
    epoch too, which drops the steps since the last update at each epoch end; haet did
    so before 2026-11-25.) The run's length is `plan`, the planned-steps variable of a
    step-planned schedule (`haet.schedules`; set by the planner or from `--epochs`,
    read inside the step), else `total_steps`; with the schedule's `plan_offset` the
    ramp reads the same fraction of the plan as the schedule
    (`haet.schedules.plan_fraction`), so a re-plan does not move it at once.

    Args:
        total_steps: steps of the run without a plan (>= 1), or None.
        plan: the schedule's planned-steps variable (one of the optimizer's), or None.
        plan_offset: the schedule's plan-offset variable (one of the optimizer's), or None.
        decay: per-step base momentum in [0, 1) (airbench: 0.95).
        every_steps: update every this many steps (airbench: 5).
        power: exponent of the ramp over the fraction of the run done (airbench: 3).
        start_step: first step that may update (airbench: 0).
        statistics: also average (and copy back) the batch-norm statistics.

    Attributes (after `build`):
        started: int32 variable, 1 once the average holds values to copy back.

    Raises:
        ValueError: bad values, or no plan and no `total_steps` (at `build`).
    """

    prefix = "lookahead"

    def __init__(self, total_steps=None, decay=0.95, every_steps=5, power=3.0, start_step=0, statistics=True,
                 plan=None, plan_offset=None):
        super().__init__(decay, every_steps, warmup=False, statistics=statistics)
        if total_steps is not None and not total_steps >= 1:
            raise ValueError(f"total_steps must be >= 1. Received: {total_steps!r}")
        if not (isinstance(start_step, (int, np.integer)) and start_step >= 0):
            raise ValueError(f"start_step must be a non-negative integer. Received: {start_step!r}")
        self.total_steps = None if total_steps is None else float(total_steps)
        fields.at_least(0)(power, "power")  # (-1: the weights grew from 0.4 to 10)
        self.power = float(power)
        self.start_step = int(start_step)
        self.plan = plan
        self.plan_offset = plan_offset

    def build(self, model):
        super().build(model)
        # Where the plan sits in the optimizer's state (the engine passes its values).
        self.plan_index = next((i for i, v in enumerate(model.optimizer.variables) if v is self.plan), None)
        self.offset_index = next((i for i, v in enumerate(model.optimizer.variables) if v is self.plan_offset), None)
        if self.plan_index is None and self.total_steps is None:
            raise ValueError("Lookahead needs the run's length: a step-planned schedule's plan (one_cycle...) or "
                             "total_steps (--epochs > 0).")
        # From step 0 the average starts at the initial weights (airbench's LookaheadState(model)).
        self.started = keras.Variable(int(self.start_step == 0), dtype="int32", trainable=False,
                                      name=f"{self.prefix}_started")
        self.variables.append(self.started)

    def done(self, steps, optimizer_values=None):
        """The fraction of the run done after `steps` steps (float32, not clipped): of
        the schedule's plan, read from `optimizer_values` (the optimizer's variables'
        values, in order), else of `total_steps`."""
        if self.plan_index is not None:
            offset = 0.0 if self.offset_index is None else optimizer_values[self.offset_index]
            return schedules.plan_fraction(steps, optimizer_values[self.plan_index], offset)
        return ops.cast(steps, "float32") / self.total_steps

    def update(self, trainable, non_trainable, values, optimizer_values=None):
        steps, averages, started = values[0] + 1, values[1:-1], values[-1]
        update = ops.logical_and(ops.equal(ops.mod(steps, self.every_steps), 0), steps >= self.start_step)
        ramp = ops.minimum(self.done(steps, optimizer_values), 1.0) ** self.power
        rho = ops.where(started > 0, self.decay ** self.every_steps * ramp, 0.0)
        rho = ops.where(update, rho, 1.0)
        current = [*trainable, *(non_trainable[i] for i in self.statistic_indices)]
        averages = [rho * a + (1.0 - rho) * ops.cast(v, "float32") for a, v in zip(averages, current)]
        started = ops.where(update, 1, started)
        # The weights take the average after an update.
        count = len(trainable)
        trainable = [ops.where(update, ops.cast(a, v.dtype), v) for a, v in zip(averages[:count], trainable)]
        non_trainable = list(non_trainable)
        for i, a in zip(self.statistic_indices, averages[count:]):
            non_trainable[i] = ops.where(update, ops.cast(a, non_trainable[i].dtype), non_trainable[i])
        return trainable, non_trainable, [steps, *averages, ops.cast(started, "int32")]
