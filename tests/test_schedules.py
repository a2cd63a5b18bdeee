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
