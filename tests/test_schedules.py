import pytest

from haet.schedules import PiecewiseConstant, check_range
from haet.training import TrainConfig


@pytest.mark.parametrize(
    "fraction, expected",
    [(0.0, 1e-3), (0.5, 1e-3), (0.7999, 1e-3), (0.8, 1e-4), (0.85, 1e-4),
     (0.9, 1e-5), (0.99, 1e-5), (1.3, 1e-5)],
)
def test_umbc_learning_rate_at_fractions(fraction, expected):
    assert TrainConfig().learning_rate_schedule()(fraction) == expected


@pytest.mark.parametrize(
    "fraction, expected",
    [(0.0, 1.0), (0.29, 1.0), (0.3, 0.87), (0.7, 0.73), (0.75, 0.6), (0.82, 0.47),
     (0.87, 0.33), (0.9, 0.0), (1.0, 0.0)],
)
def test_umbc_augmentation_strength_at_fractions(fraction, expected):
    assert TrainConfig().strength_schedule()(fraction) == expected


def test_no_boundaries_is_constant():
    schedule = PiecewiseConstant([], [0.1])
    assert schedule(0.0) == schedule(5.0) == 0.1


@pytest.mark.parametrize(
    "boundaries, values, message",
    [
        ([0.5], [1.0], "one more value"),
        ([0.5, 0.5], [1, 2, 3], "strictly increasing"),
        ([0.9, 0.5], [1, 2, 3], "strictly increasing"),
        ([1.5], [1, 2], r"\(0, 1\)"),
        ([0.0], [1, 2], r"\(0, 1\)"),
        ([0.5], [1, float("nan")], "finite"),
    ],
)
def test_bad_schedules_are_rejected(boundaries, values, message):
    with pytest.raises(ValueError, match=message):
        PiecewiseConstant(boundaries, values, name="learning rate")


def test_check_range_names_the_bad_values():
    with pytest.raises(ValueError, match=r"strength schedule values must be in \[0.0, 1.0\]. Received: \[1.5\]"):
        check_range(PiecewiseConstant([0.5], [1.0, 1.5], name="strength"), 0.0, 1.0)


def test_planned_piecewise_linear_values_on_host_and_device():
    import keras
    import numpy as np

    from haet.schedules import PlannedPiecewiseLinear

    schedule = PlannedPiecewiseLinear([0.0, 0.25, 1.0], [0.0, 0.4, 0.0])
    optimizer = keras.optimizers.SGD(learning_rate=schedule)
    schedule.attach(optimizer, planned_steps=100)
    assert any(v is schedule.planned_steps for v in optimizer.variables)
    for step, expected in [(0, 0.0), (10, 0.16), (25, 0.4), (50, 0.4 * 50 / 75), (100, 0.0), (150, 0.0)]:
        assert float(np.asarray(schedule(step))) == pytest.approx(expected, abs=1e-7)
    schedule.planned_steps.assign(200.0)
    assert float(np.asarray(schedule(50))) == pytest.approx(0.4, abs=1e-7)


@pytest.mark.parametrize("knots, values, message", [
    ([0.0, 1.0], [0.1], "as many values as knots"),
    ([0.1, 1.0], [0.0, 0.1], "from 0 to 1"),
    ([0.0, 0.5, 0.5, 1.0], [0, 1, 1, 0], "from 0 to 1"),
    ([0.0, 1.0], [0.1, -0.1], ">= 0"),
])
def test_bad_planned_schedules(knots, values, message):
    from haet.schedules import PlannedPiecewiseLinear

    with pytest.raises(ValueError, match=message):
        PlannedPiecewiseLinear(knots, values)
