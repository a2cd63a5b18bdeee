"""Learning-rate schedules as data, over the run measured in budget or in steps.

Every schedule has a `unit`:
- "budget": a function of the elapsed fraction of the wall-clock budget. A
  wall-clock recipe (UMBC HAET-2021: learning rate 1e-3 for the first 80% of the
  time, 1e-4 for the next 10%, 1e-5 for the last 10%) needs the elapsed *time*,
  which only the host knows, whatever the machine's speed. The host evaluates it
  before each compiled execution and writes the value into the variable the step
  reads when it changes (`haet.budget.WallClockBudget`); `next_change(fraction)`
  tells where the value next steps, so that an execution ends there.
- "steps": a `keras.optimizers.schedules.LearningRateSchedule` of the optimizer's
  step over the planned number of steps, a variable the planner sets
  (`haet.budget.StepPlanner`), evaluated inside the compiled step.

`LR_SCHEDULES` is the table of the `--lr_schedule` flag; `learning_rate_schedule(config)`
builds the one a run config names.
"""

import bisect
import math

import keras
from keras import ops

from haet import fields
from haet.fields import Field, Kind


class PiecewiseConstant:
    """A value that steps at given fractions of the budget.

    `values[i]` holds for `boundaries[i-1] <= fraction < boundaries[i]`; the last
    value holds from the last boundary on (also past the end of the budget).

    Args:
        boundaries: strictly increasing fractions in (0, 1), may be empty.
        values: `len(boundaries) + 1` finite numbers.
        name: what the values are, for error messages ("learning rate").

    Raises:
        ValueError: wrong count, non-increasing or out-of-range boundaries, or a
            non-finite value.
    """

    def __init__(self, boundaries, values, name="value"):
        boundaries = [float(b) for b in boundaries]
        values = [float(v) for v in values]
        if len(values) != len(boundaries) + 1:
            raise ValueError(
                f"{name} schedule needs one more value than boundaries. Received "
                f"{len(boundaries)} boundaries {boundaries} and {len(values)} values {values}."
            )
        if any(not 0.0 < b < 1.0 for b in boundaries) or any(
            a >= b for a, b in zip(boundaries, boundaries[1:])
        ):
            raise ValueError(
                f"{name} schedule boundaries must be strictly increasing fractions of "
                f"the budget in (0, 1). Received: {boundaries}"
            )
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"{name} schedule values must be finite. Received: {values}")
        self.boundaries = tuple(boundaries)
        self.values = tuple(values)
        self.name = name

    unit = "budget"

    def __call__(self, fraction):
        """The value at `fraction` (elapsed seconds / budget seconds, >= 0)."""
        return self.values[bisect.bisect_right(self.boundaries, fraction)]

    def next_change(self, fraction):
        """The first boundary after `fraction`, or None past the last one."""
        index = bisect.bisect_right(self.boundaries, fraction)
        return self.boundaries[index] if index < len(self.boundaries) else None

    def __repr__(self):
        return f"PiecewiseConstant(boundaries={list(self.boundaries)}, values={list(self.values)})"


def check_range(schedule, low, high):
    """Raises ValueError if a value of `schedule` lies outside `[low, high]`."""
    bad = [v for v in schedule.values if not low <= v <= high]
    if bad:
        raise ValueError(
            f"{schedule.name} schedule values must be in [{low}, {high}]. Received: {bad}"
        )
    return schedule


def _check_knots(knots, values, name, unit="fraction"):
    """Knots and values as floats. `unit` "fraction": knots from 0 to 1 (fractions of the
    planned steps); "epochs": knots from 0, any finite end."""
    knots = [float(k) for k in knots]
    values = [float(v) for v in values]
    if len(knots) != len(values) or len(knots) < 2:
        raise ValueError(
            f"{name} schedule needs as many values as knots, at least 2. Received knots {knots}, values {values}."
        )
    increasing = knots[0] == 0.0 and all(a < b for a, b in zip(knots, knots[1:])) and all(map(math.isfinite, knots))
    if unit == "fraction" and not (increasing and knots[-1] == 1.0):
        raise ValueError(
            f"{name} schedule knots must increase strictly from 0 to 1 (fractions of the "
            f"planned steps). Received: {knots}"
        )
    if unit == "epochs" and not increasing:
        raise ValueError(f"{name} schedule knots in epochs must increase strictly from 0. Received: {knots}")
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(f"{name} schedule values must be finite and >= 0. Received: {values}")
    return knots, values


class _PlannedSteps(keras.optimizers.schedules.LearningRateSchedule):
    """A schedule over the fraction of the planned steps done, where the plan is held
    in variables the compiled step reads (see `attach`).

    The fraction at optimizer step `s` is `(s + o) / (P + o)`: `P` the planned steps,
    `o` the plan's offset, 0 until a plan changes during the run. A planner that
    re-plans at step `s0` to `P'` steps sets `o` so that the fraction at `s0` stays
    where it was and reaches 1 at `P'` (`plan_offset`): the schedule goes on from
    where it is, over the steps left, instead of jumping to the new plan's position
    (0.40 of a 10-step plan would be 0.57 of a 7-step one: a step down of the
    learning rate in a decay, up in a warm-up). Keras schedules have no variables
    of their own; these live among the optimizer's (`attach`)."""

    planned_steps = None
    plan_offset = None
    saved_planned_steps = None  # the plan of a schedule loaded from a saved model
    saved_plan_offset = 0.0
    unit = "steps"

    def attach(self, optimizer, planned_steps, steps_per_epoch=None, plan_offset=0.0):
        """Creates the planned-steps and plan-offset variables in `optimizer`, set to
        `planned_steps` and `plan_offset`. `steps_per_epoch` is read by schedules whose
        knots are epochs (`PlannedPiecewiseLinear`); the others take it and ignore it,
        so that every caller attaches any planned schedule the same way.

        A loaded model's optimizer (`haet.optimizers`' SGD and Adam) calls it when it
        builds, before Keras restores its variables, so the optimizer state loads
        whole.

        Raises:
            ValueError: `planned_steps` not a positive finite number of steps (nan,
                0, -5 and "100" were taken), or `plan_offset` not finite.
        """
        if isinstance(planned_steps, (bool, str)) or not 0 < planned_steps < math.inf:
            raise ValueError(f"planned_steps must be a positive finite number of steps. Received: {planned_steps!r}")
        if isinstance(plan_offset, (bool, str)) or not math.isfinite(plan_offset):
            raise ValueError(f"plan_offset must be a finite number of steps. Received: {plan_offset!r}")
        self.planned_steps = optimizer.add_variable(
            shape=(), initializer=keras.initializers.Constant(float(planned_steps)),
            dtype="float32", name="planned_steps",
        )
        self.plan_offset = optimizer.add_variable(
            shape=(), initializer=keras.initializers.Constant(float(plan_offset)),
            dtype="float32", name="plan_offset",
        )
        return self.planned_steps

    def _with_plan(self, config):
        """`config` with the current plan (saved with the model)."""
        if self.planned_steps is not None:
            config["planned_steps"] = float(keras.ops.convert_to_numpy(self.planned_steps))
            config["plan_offset"] = float(keras.ops.convert_to_numpy(self.plan_offset))
        elif self.saved_planned_steps is not None:
            config["planned_steps"] = self.saved_planned_steps
            config["plan_offset"] = self.saved_plan_offset
        return config

    @staticmethod
    def _loaded(schedule, config):
        schedule.saved_planned_steps = config.pop("planned_steps", None)
        schedule.saved_plan_offset = float(config.pop("plan_offset", 0.0) or 0.0)  # 0: saved before offsets
        return schedule

    def fraction(self, step):
        """`(step + plan_offset) / (planned_steps + plan_offset)` as a float32 tensor
        (not clipped: past the plan it exceeds 1).

        Raises:
            ValueError: `attach` was not called.
        """
        if self.planned_steps is None:
            raise ValueError(f"{type(self).__name__}.attach(optimizer, planned_steps) was not called: a schedule "
                             f"over the planned steps needs the plan (haet.fit and python -m haet.train attach it; "
                             f"before Keras' model.fit, call schedule.attach(model.optimizer, epochs * "
                             f"steps_per_epoch, steps_per_epoch) after compile).")
        return plan_fraction(step, self.planned_steps, self.plan_offset)


def plan_fraction(step, planned_steps, plan_offset=0.0):
    """The fraction of a plan done at `step`: `(step + plan_offset) / max(planned_steps
    + plan_offset, 1)`, at least 0, float32 (tensors or numbers; see `_PlannedSteps`);
    a None offset is 0."""
    offset = ops.cast(0.0 if plan_offset is None else plan_offset, "float32")
    done = (ops.cast(step, "float32") + offset) / ops.maximum(ops.cast(planned_steps, "float32") + offset, 1.0)
    return ops.maximum(done, 0.0)


def plan_fraction_value(step, planned_steps, plan_offset=0.0):
    """`plan_fraction` on the host, for Python numbers: a float, at least 0."""
    return max(0.0, (step + plan_offset) / max(planned_steps + plan_offset, 1.0))


def replanned_offset(step, planned_steps, plan_offset, new_planned_steps):
    """The plan offset that keeps the fraction at `step` (`plan_fraction`) when the
    plan changes from `planned_steps` to `new_planned_steps`, so that it reaches 1 at
    `new_planned_steps`. A plan that ends at or before `step`, or one already done,
    keeps `plan_offset` (the run stops there).

    Solves `(step + o') / (new + o') = f`, f the fraction at `step`: `o' = (f new -
    step) / (1 - f)`. Floats (steps) in, a float out."""
    done = plan_fraction_value(step, planned_steps, plan_offset)
    if done >= 1.0 or new_planned_steps <= step:
        return float(plan_offset)
    return float((done * new_planned_steps - step) / (1.0 - done))


KNOT_UNITS = ("fraction", "epochs")


def _steps_per_epoch(value):
    """`value` as a float, refused unless a positive finite number (0 or -5 held the
    first knot's rate forever; nan gave a nan learning rate)."""
    if isinstance(value, (bool, str)) or not 0 < value < math.inf:
        raise ValueError(f"steps_per_epoch must be a positive finite number. Received: {value!r}")
    return float(value)


@keras.saving.register_keras_serializable(package="haet")
class PlannedPiecewiseLinear(_PlannedSteps):
    """Learning rate linear between knots placed at fractions of the planned steps, or
    at epochs.

    With knots `(0, 5/24, 1)` and values `(0, 0.4, 0)` this is David Page's one-cycle
    schedule for ResNet-9 (davidcpage/cifar10-fast, dawn.py; super-convergence, Smith
    & Topin 2019). With `knot_unit="epochs"`, knots `(0, 2, 8)` and values
    `(0, 1, 0.1)` it is his bag of tricks' 10-epoch schedule (0.1 holds after epoch
    8). Past the last knot the last value holds.

    Fractions: the number of planned steps is a variable the compiled step reads, so a
    planner (`haet.budget.StepPlanner`) can set it after timing the first steps on
    the actual machine without recompiling. Call `attach(optimizer, planned_steps,
    steps_per_epoch)` once before training: it creates that variable among the
    optimizer's variables (part of the training state on every backend). Epochs:
    step `s` is at epoch `s / steps_per_epoch`, whatever the plan (no planner needed:
    the budget or --epochs ends the run).

    Args:
        knots: fractions of the planned steps, strictly increasing from 0 to 1; or
            epochs (floats), strictly increasing from 0.
        values: learning rates at the knots (>= 0).
        knot_unit: "fraction" or "epochs".
        steps_per_epoch: with epochs, the optimizer steps of an epoch (else set by `attach`).

    Raises:
        ValueError: malformed knots or values, an unknown unit, or a
            `steps_per_epoch` that is not a positive finite number.
    """

    def __init__(self, knots, values, knot_unit="fraction", steps_per_epoch=None):
        if knot_unit not in KNOT_UNITS:
            raise ValueError(f"Unknown knot unit {knot_unit!r}. Allowed: {', '.join(KNOT_UNITS)}.")
        self.knots, self.values = _check_knots(knots, values, "learning rate", knot_unit)
        self.knot_unit = knot_unit
        self.steps_per_epoch = None if steps_per_epoch is None else _steps_per_epoch(steps_per_epoch)
        self.planned_steps = None

    @property
    def needs_plan(self):
        """Whether the schedule depends on the planned number of steps."""
        return self.knot_unit == "fraction"

    def attach(self, optimizer, planned_steps, steps_per_epoch=None, plan_offset=0.0):
        if steps_per_epoch is not None:
            self.steps_per_epoch = _steps_per_epoch(steps_per_epoch)
        return super().attach(optimizer, planned_steps, plan_offset=plan_offset)

    def __call__(self, step):
        if self.knot_unit == "fraction":
            position = self.fraction(step)
        else:
            if not self.steps_per_epoch:
                raise ValueError("PlannedPiecewiseLinear with epoch knots needs steps_per_epoch (attach(...)).")
            position = ops.cast(step, "float32") / self.steps_per_epoch
        # v0 + sum of each segment's slope times the part of it already covered; at
        # least 0 (the values are): float32 sums ended a 0 -> 0.4 -> 0 plan at -3e-8.
        lr = ops.convert_to_tensor(self.values[0], "float32")
        for k0, k1, v0, v1 in zip(self.knots, self.knots[1:], self.values, self.values[1:]):
            lr = lr + (v1 - v0) / (k1 - k0) * ops.clip(position - k0, 0.0, k1 - k0)
        return ops.maximum(lr, 0.0)

    def get_config(self):
        return self._with_plan({"knots": list(self.knots), "values": list(self.values), "knot_unit": self.knot_unit,
                                "steps_per_epoch": self.steps_per_epoch})

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        plan = {k: config.pop(k) for k in ("planned_steps", "plan_offset") if k in config}
        return cls._loaded(cls(**config), plan)


# Learning-rate schedules as shapes over the whole run.
#
# Each shape is a `keras.optimizers.schedules` schedule written over a nominal axis of
# NOMINAL_STEPS steps that stands for the whole run (0 = start, NOMINAL_STEPS = end).
# Two wrappers put it on a real axis: `PlannedSchedule` maps the optimizer's step
# onto it through the planned number of steps (per step, inside the compiled step);
# `BudgetSchedule` maps the elapsed fraction of the wall-clock budget onto it (on the
# host, between steps). So one definition serves both units.
NOMINAL_STEPS = 10_000
# Where the wrappers read the end of the run: just before NOMINAL_STEPS, so that a
# cyclic shape ends its last cycle instead of restarting.
_END = NOMINAL_STEPS - 0.01

LR_SHAPES = ("constant", "step", "cosine", "cosine_restarts", "linear", "inverse_sqrt")


@keras.saving.register_keras_serializable(package="haet")
class Constant(keras.optimizers.schedules.LearningRateSchedule):
    """A constant learning rate (Keras has no constant schedule class).

    Raises:
        ValueError: a learning rate that is not a finite number >= 0.
    """

    def __init__(self, learning_rate):
        if isinstance(learning_rate, bool) or not 0 <= float(learning_rate) < math.inf:  # (nan too)
            raise ValueError(f"learning_rate must be a finite number >= 0. Received: {learning_rate!r}")
        self.learning_rate = float(learning_rate)

    def __call__(self, step):
        return ops.convert_to_tensor(self.learning_rate, "float32")

    def get_config(self):
        return {"learning_rate": self.learning_rate}


@keras.saving.register_keras_serializable(package="haet")
class InverseSqrtDecay(keras.optimizers.schedules.LearningRateSchedule):
    """`learning_rate / sqrt(1 + step / timescale)`.

    Keras' `InverseTimeDecay` decays as 1/t, not 1/sqrt(t), hence this class. After a
    linear warmup of `w` steps with `timescale = w` it is the Transformer's
    `peak * sqrt(w / t)` (Vaswani et al. 2017, "Attention is all you need", eq. 3).

    Raises:
        ValueError: a non-positive timescale.
    """

    def __init__(self, learning_rate, timescale):
        if not timescale > 0:
            raise ValueError(f"inverse_sqrt timescale must be positive. Received: {timescale!r}")
        self.learning_rate = float(learning_rate)
        self.timescale = float(timescale)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        return self.learning_rate / ops.sqrt(1.0 + ops.maximum(step, 0.0) / self.timescale)

    def get_config(self):
        return {"learning_rate": self.learning_rate, "timescale": self.timescale}


@keras.saving.register_keras_serializable(package="haet")
class LinearWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from 0 to `schedule(0)` over `warmup_steps`, then
    `schedule(step - warmup_steps)` (Goyal et al. 2017, "Accurate, large minibatch
    SGD", gradual warmup). Only Keras' `CosineDecay` has a warmup of its own; this
    wrapper gives every shape the same one.

    Raises:
        ValueError: negative `warmup_steps`.
    """

    def __init__(self, schedule, warmup_steps):
        if not warmup_steps >= 0:
            raise ValueError(f"warmup_steps must be >= 0. Received: {warmup_steps!r}")
        self.schedule = schedule
        self.warmup_steps = float(warmup_steps)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        after = ops.cast(self.schedule(ops.maximum(step - self.warmup_steps, 0.0)), "float32")
        if not self.warmup_steps:
            return after
        # From 0 at step 0 (a step before it, too: -5 of 10 gave half the rate, negated).
        ramp = ops.cast(self.schedule(0.0), "float32") * ops.maximum(step, 0.0) / self.warmup_steps
        return ops.where(step < self.warmup_steps, ramp, after)

    def get_config(self):
        return {"schedule": keras.optimizers.schedules.serialize(self.schedule),
                "warmup_steps": self.warmup_steps}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["schedule"] = keras.optimizers.schedules.deserialize(config["schedule"])
        return cls(**config)


def lr_shape(shape, learning_rate, warmup=0.0, final_learning_rate=0.0,
             boundaries=(0.8, 0.9), decay_factor=0.1, cycles=1, timescale=0.1):
    """A learning-rate shape over the nominal run axis (`NOMINAL_STEPS` = whole run).

    Fractions below are of the whole run (planned steps or budget seconds).
    - constant: `learning_rate` throughout;
    - step: `learning_rate * decay_factor**i` after the i-th of `boundaries`
      (`keras.optimizers.schedules.PiecewiseConstantDecay`);
    - cosine: half cosine from `learning_rate` to `final_learning_rate` (`CosineDecay`;
      Loshchilov & Hutter 2017);
    - cosine_restarts: `cycles` equal cosine cycles, each from `learning_rate` to
      `final_learning_rate` (`CosineDecayRestarts`, SGDR; the snapshot-ensemble
      schedule of Huang et al. 2017);
    - linear: straight line to `final_learning_rate` (`PolynomialDecay`, power 1);
    - inverse_sqrt: `learning_rate / sqrt(1 + t / timescale)` (`InverseSqrtDecay`).
    With `warmup` > 0 the first `warmup` of the run ramps linearly from 0 to
    `learning_rate` and the shape fills the rest (boundaries stay fractions of the
    whole run).

    Returns:
        a `keras.optimizers.schedules.LearningRateSchedule` over `[0, NOMINAL_STEPS]`.

    Raises:
        ValueError: an unknown shape or a value out of range (named in the message).
    """
    if shape not in LR_SHAPES:
        raise ValueError(f"Unknown learning-rate shape {shape!r}. Allowed: {', '.join(LR_SHAPES)}.")
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"learning_rate must be positive and finite. Received: {learning_rate!r}")
    if not 0.0 <= final_learning_rate <= learning_rate:
        raise ValueError(
            f"final_learning_rate must be in [0, learning_rate={learning_rate}]. Received: {final_learning_rate!r}")
    if not 0.0 <= warmup < 1.0:
        raise ValueError(f"warmup must be a fraction of the run in [0, 1). Received: {warmup!r}")
    if not (isinstance(cycles, int) and cycles >= 1):
        raise ValueError(f"cycles must be a positive integer. Received: {cycles!r}")
    if not 0.0 < decay_factor <= 1.0:
        raise ValueError(f"decay_factor must be in (0, 1]. Received: {decay_factor!r}")
    schedules = keras.optimizers.schedules
    warmup_steps = warmup * NOMINAL_STEPS
    length = NOMINAL_STEPS - warmup_steps
    alpha = final_learning_rate / learning_rate
    if shape == "constant":
        schedule = Constant(learning_rate)
    elif shape == "step":
        boundaries = [float(b) for b in boundaries]
        if any(not warmup < b < 1.0 for b in boundaries) or any(
                a >= b for a, b in zip(boundaries, boundaries[1:])) or not boundaries:
            raise ValueError(
                "step schedule boundaries must be strictly increasing fractions of the run in "
                f"(warmup={warmup}, 1). Received: {boundaries}")
        schedule = schedules.PiecewiseConstantDecay(
            [b * NOMINAL_STEPS - warmup_steps for b in boundaries],
            [learning_rate * decay_factor**i for i in range(len(boundaries) + 1)])
    elif shape == "cosine":
        schedule = schedules.CosineDecay(learning_rate, length, alpha=alpha)
    elif shape == "cosine_restarts":
        schedule = schedules.CosineDecayRestarts(learning_rate, length / cycles, t_mul=1.0,
                                                 m_mul=1.0, alpha=alpha)
    elif shape == "linear":
        schedule = schedules.PolynomialDecay(learning_rate, length, final_learning_rate, power=1.0)
    else:
        if not 0.0 < timescale:
            raise ValueError(f"inverse_sqrt timescale must be a positive fraction. Received: {timescale!r}")
        schedule = InverseSqrtDecay(learning_rate, timescale * NOMINAL_STEPS)
    return LinearWarmup(schedule, warmup_steps) if warmup_steps else schedule


@keras.saving.register_keras_serializable(package="haet")
class PlannedSchedule(_PlannedSteps):
    """A shape of `lr_shape` evaluated per optimizer step: step `s` of `P` planned
    steps reads the shape at `min(s / P, 1) * NOMINAL_STEPS` (with a plan offset `o`
    after a re-plan, `(s + o) / (P + o)` instead of `s / P`: see `_PlannedSteps`).

    Like `PlannedPiecewiseLinear`, `P` is an optimizer variable (`attach`), so a
    `haet.budget.StepPlanner` can set it after timing the first steps.
    """

    def __init__(self, shape):
        self.shape = shape
        self.planned_steps = None

    def __call__(self, step):
        fraction = self.fraction(step)
        return ops.cast(self.shape(ops.minimum(fraction * NOMINAL_STEPS, _END)), "float32")

    def get_config(self):
        return self._with_plan({"shape": keras.optimizers.schedules.serialize(self.shape)})

    @classmethod
    def from_config(cls, config):
        return cls._loaded(cls(keras.optimizers.schedules.deserialize(config["shape"])), dict(config))


class BudgetSchedule:
    """A shape of `lr_shape` evaluated on the host at the elapsed fraction of the
    wall-clock budget (for `haet.budget.WallClockBudget`).

    The fraction is rounded down to a multiple of `1 / resolution`, so a smooth shape
    changes the optimizer's learning rate at most `resolution` times a run (each write
    is a host-to-device transfer, and on JAX a state sync).

    Raises:
        ValueError: `resolution` < 1; (when called) a value that is not a finite
            number >= 0.
    """

    def __init__(self, shape, resolution=1000, name="learning rate"):
        if not (isinstance(resolution, int) and resolution >= 1):
            raise ValueError(f"resolution must be a positive integer. Received: {resolution!r}")
        self.shape = shape
        self.resolution = resolution
        self.name = name
        self._cache = {}

    unit = "budget"

    def next_change(self, fraction):
        """None: a smooth shape changes all along; it is evaluated at each execution's start."""
        return None

    def __call__(self, fraction):
        """The value at `fraction` (elapsed seconds / budget seconds, >= 0)."""
        tick = min(int(math.floor(max(fraction, 0.0) * self.resolution)), self.resolution)
        if tick not in self._cache:
            value = float(ops.convert_to_numpy(self.shape(min(tick / self.resolution * NOMINAL_STEPS, _END))))
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"The {self.name} at {tick / self.resolution:g} of the budget is {value!r}: it must "
                                 f"be a finite number >= 0.")
            self._cache[tick] = value
        return self._cache[tick]

    @classmethod
    def of_fraction(cls, function, resolution=1000, name="learning rate"):
        """A plain function of the elapsed fraction of the budget (in [0, 1)) as a
        `BudgetSchedule` (`haet.fit`'s `learning_rate=`)."""
        return cls(lambda step: function(step / NOMINAL_STEPS), resolution, name)

    def __repr__(self):
        return f"BudgetSchedule({self.shape.__class__.__name__}, resolution={self.resolution})"


def learning_rate_scale(config):
    """`batch_size / lr_scaling_reference_batch` (the linear scaling rule of Goyal et al.
    2017, "Accurate, large minibatch SGD"), or 1 when off."""
    if not config.lr_scaling_reference_batch:
        return 1.0
    return config.batch_size / config.lr_scaling_reference_batch


def _wall_clock(learning_rate_boundaries, learning_rates, scale):
    schedule = PiecewiseConstant(learning_rate_boundaries, [v * scale for v in learning_rates],
                                 name="learning rate")
    return check_range(schedule, 0.0, math.inf)


def _one_cycle(one_cycle_knots, one_cycle_learning_rates, one_cycle_knot_unit, scale):
    return PlannedPiecewiseLinear(one_cycle_knots, [v * scale for v in one_cycle_learning_rates],
                                  knot_unit=one_cycle_knot_unit)


def _shape_builder(shape):
    def build(lr_schedule_unit, learning_rate, warmup, final_learning_rate, learning_rate_boundaries,
              lr_decay_factor, lr_cycles, inverse_sqrt_timescale, scale):
        schedule = lr_shape(shape, learning_rate * scale, warmup=warmup, final_learning_rate=final_learning_rate * scale,
                            boundaries=learning_rate_boundaries, decay_factor=lr_decay_factor, cycles=lr_cycles,
                            timescale=inverse_sqrt_timescale)
        return PlannedSchedule(schedule) if lr_schedule_unit == "steps" else BudgetSchedule(schedule)

    return build


def _no_warmup(config):
    if config.warmup:
        raise ValueError(
            f"--warmup applies to the shapes {', '.join(LR_SHAPES)}, not to lr_schedule={config.lr_schedule!r} "
            "(one_cycle warms up through its knots; for a stepped schedule with warmup use --lr_schedule=step).")


_SHAPE_ARGS = ("lr_schedule_unit", "learning_rate", "warmup", "final_learning_rate", "learning_rate_boundaries",
               "lr_decay_factor", "lr_cycles", "inverse_sqrt_timescale")
# What each shape reads of `_SHAPE_ARGS` (a setting no chosen kind reads is reported:
# `haet.config.TrainConfig.ignored_settings`).
_SHAPE_USES = {
    "constant": (),
    "step": ("learning_rate_boundaries", "lr_decay_factor"),
    "cosine": ("final_learning_rate",),
    "cosine_restarts": ("final_learning_rate", "lr_cycles"),
    "linear": ("final_learning_rate",),
    "inverse_sqrt": ("inverse_sqrt_timescale",),
}
_SHAPE_HELP = {
    "constant": "--learning_rate throughout",
    "step": "x --lr_decay_factor at each of --learning_rate_boundaries",
    "cosine": "half cosine to --final_learning_rate",
    "cosine_restarts": "--lr_cycles cosine cycles",
    "linear": "straight line to --final_learning_rate",
    "inverse_sqrt": "lr / sqrt(1 + t / --inverse_sqrt_timescale)",
}

# The schedules the `--lr_schedule` flag names: builder (extra argument `scale`, the
# linear-scaling factor), the config fields it takes, its check. The builder returns
# a schedule of unit "budget" or "steps" (see the module docstring).
LR_SCHEDULES = {
    "wall_clock": Kind(_wall_clock, ("learning_rate_boundaries", "learning_rates"), _no_warmup,
                       "--learning_rates piecewise constant over the budget fraction (UMBC)"),
    "one_cycle": Kind(_one_cycle, ("one_cycle_knots", "one_cycle_learning_rates", "one_cycle_knot_unit"),
                      _no_warmup, "piecewise linear through --one_cycle_learning_rates at --one_cycle_knots (of the "
                      "planned steps, or epochs) (Page)"),
    **{shape: Kind(_shape_builder(shape), _SHAPE_ARGS, None, _SHAPE_HELP[shape],
                   uses=("lr_schedule_unit", "learning_rate", "warmup", *_SHAPE_USES[shape])) for shape in LR_SHAPES},
}
LR_SCHEDULE_UNITS = ("budget", "steps")

FIELDS = (
    Field("lr_schedule", "wall_clock", "Learning-rate schedule. " + fields.table_help(LR_SCHEDULES) + ".",
          fields.one_of(LR_SCHEDULES, "lr_schedule")),
    Field("lr_schedule_unit", "budget", "Shapes only: budget (the elapsed fraction of the wall-clock budget, "
          "written by the host before each execution) or steps (the fraction of the planned steps, inside the "
          "compiled step).", fields.one_of(LR_SCHEDULE_UNITS, "lr_schedule_unit")),
    Field("learning_rate", 1e-3, "Shapes: the peak learning rate.", fields.positive()),
    Field("warmup", 0.0, "Shapes: fraction of the run with a linear warmup from 0 to --learning_rate, in [0, 1).",
          fields.in_range(0, 1, high_open=True)),
    Field("final_learning_rate", 0.0, "cosine, cosine_restarts, linear: learning rate at the end (of each cycle).",
          fields.at_least(0)),
    Field("lr_decay_factor", 0.1, "step: learning rate x this at each of --learning_rate_boundaries, in (0, 1].",
          fields.in_range(0, 1)),
    Field("lr_cycles", 1, "cosine_restarts: number of equal cycles.", fields.positive(integer=True)),
    Field("inverse_sqrt_timescale", 0.1, "inverse_sqrt: timescale, a fraction of the run.", fields.positive()),
    Field("lr_scaling_reference_batch", 0, "> 0: every learning rate x batch_size / this (linear scaling rule); "
          "0: off.", fields.at_least(0, integer=True)),
    Field("learning_rate_boundaries", (0.8, 0.9), "wall_clock, step: fractions of the run where the learning "
          "rate steps."),
    Field("learning_rates", (1e-3, 1e-4, 1e-5), "wall_clock: learning rate in each interval (one more than the "
          "boundaries)."),
    Field("one_cycle_knots", (0.0, 0.2, 1.0), "one_cycle: knots as fractions of the planned steps, from 0 to 1, "
          "or epochs from 0 (see --one_cycle_knot_unit)."),
    Field("one_cycle_knot_unit", "fraction", "one_cycle: fraction (knots are fractions of the planned steps: "
          "the run is planned to fit the budget) or epochs (knots are epochs; the last value holds after the last "
          "knot, until --epochs or the budget ends the run).", fields.one_of(KNOT_UNITS, "one_cycle_knot_unit")),
    Field("one_cycle_learning_rates", (0.0, 0.4, 0.0), "one_cycle: learning rate at each knot."),
)


def learning_rate_schedule(config):
    """The learning rate over the run that `config` names (`LR_SCHEDULES`), every value
    times `learning_rate_scale(config)`; its `unit` says how it is driven."""
    return fields.build(LR_SCHEDULES, "lr_schedule", config.lr_schedule, config,
                        scale=learning_rate_scale(config))


def cycle_ends(config):
    """Fractions of the run where a cosine_restarts cycle ends (the last is 1); `(1.0,)`
    for every other schedule."""
    if config.lr_schedule != "cosine_restarts":
        return (1.0,)
    ends = [config.warmup + (1.0 - config.warmup) * (i + 1) / config.lr_cycles for i in range(config.lr_cycles - 1)]
    return (*ends, 1.0)  # exactly 1: no rounding past the end of the run


def check_config(config):
    """Checks the learning-rate settings of a run config by building its schedule.

    Raises:
        ValueError: naming the bad value.
    """
    kind = fields.choose(LR_SCHEDULES, "lr_schedule", config.lr_schedule)
    if kind.check:
        kind.check(config)
    learning_rate_schedule(config)
