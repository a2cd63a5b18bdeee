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
