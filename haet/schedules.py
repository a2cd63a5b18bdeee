"""Schedules keyed to the elapsed fraction of a wall-clock budget, written as data.

`keras.optimizers.schedules` are functions of the optimizer's step count, evaluated
inside the compiled step. A wall-clock recipe (UMBC HAET-2021: learning rate 1e-3
for the first 80% of the time, 1e-4 for the next 10%, 1e-5 for the last 10%) needs
the elapsed *time*, which only the host knows, whatever the machine's speed. So the
host evaluates these between steps and writes the value into the model's state
only when it changes (see `haet.budget.WallClockBudget`).
"""

import bisect
import math

import keras
from keras import ops


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

    def __call__(self, fraction):
        """The value at `fraction` (elapsed seconds / budget seconds, >= 0)."""
        return self.values[bisect.bisect_right(self.boundaries, fraction)]

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


def _check_knots(knots, values, name):
    knots = [float(k) for k in knots]
    values = [float(v) for v in values]
    if len(knots) != len(values) or len(knots) < 2:
        raise ValueError(
            f"{name} schedule needs as many values as knots, at least 2. Received knots {knots}, values {values}."
        )
    if knots[0] != 0.0 or knots[-1] != 1.0 or any(a >= b for a, b in zip(knots, knots[1:])):
        raise ValueError(
            f"{name} schedule knots must increase strictly from 0 to 1 (fractions of the "
            f"planned steps). Received: {knots}"
        )
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(f"{name} schedule values must be finite and >= 0. Received: {values}")
    return knots, values


@keras.saving.register_keras_serializable(package="haet")
class PlannedPiecewiseLinear(keras.optimizers.schedules.LearningRateSchedule):
    """Learning rate linear between knots placed at fractions of the planned steps.

    With knots `(0, 5/24, 1)` and values `(0, 0.4, 0)` this is David Page's one-cycle
    schedule for ResNet-9 (davidcpage/cifar10-fast; super-convergence, Smith & Topin
    2019). Past the last knot the last value holds.

    The number of planned steps is a variable the compiled step reads, so a planner
    (`haet.budget.StepPlanner`) can set it after timing the first steps on the
    actual machine without recompiling. Call `attach(optimizer, planned_steps)` once
    before training: it creates that variable among the optimizer's variables (part
    of the training state on every backend).

    Args:
        knots: fractions of the planned steps, strictly increasing from 0 to 1.
        values: learning rates at the knots (>= 0).

    Raises:
        ValueError: malformed knots or values.
    """

    def __init__(self, knots, values):
        self.knots, self.values = _check_knots(knots, values, "learning rate")
        self.planned_steps = None

    def attach(self, optimizer, planned_steps):
        """Creates the planned-steps variable in `optimizer`, set to `planned_steps`."""
        self.planned_steps = optimizer.add_variable(
            shape=(), initializer=keras.initializers.Constant(float(planned_steps)),
            dtype="float32", name="planned_steps",
        )
        return self.planned_steps

    def __call__(self, step):
        if self.planned_steps is None:
            raise ValueError("PlannedPiecewiseLinear.attach(optimizer, planned_steps) was not called.")
        fraction = ops.cast(step, "float32") / ops.maximum(ops.cast(self.planned_steps, "float32"), 1.0)
        # v0 + sum of each segment's slope times the part of it already covered.
        lr = ops.convert_to_tensor(self.values[0], "float32")
        for k0, k1, v0, v1 in zip(self.knots, self.knots[1:], self.values, self.values[1:]):
            lr = lr + (v1 - v0) / (k1 - k0) * ops.clip(fraction - k0, 0.0, k1 - k0)
        return lr

    def get_config(self):
        return {"knots": list(self.knots), "values": list(self.values)}
