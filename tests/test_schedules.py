import pytest

from haet import augment, schedules
from haet.config import TrainConfig
from haet.schedules import PiecewiseConstant, check_range


@pytest.mark.parametrize(
    "fraction, expected",
    [(0.0, 1e-3), (0.5, 1e-3), (0.7999, 1e-3), (0.8, 1e-4), (0.85, 1e-4),
     (0.9, 1e-5), (0.99, 1e-5), (1.3, 1e-5)],
)
def test_umbc_learning_rate_at_fractions(fraction, expected):
    assert schedules.learning_rate_schedule(TrainConfig())(fraction) == expected


@pytest.mark.parametrize(
    "fraction, expected",
    [(0.0, 1.0), (0.29, 1.0), (0.3, 0.87), (0.7, 0.73), (0.75, 0.6), (0.82, 0.47),
     (0.87, 0.33), (0.9, 0.0), (1.0, 0.0)],
)
def test_umbc_augmentation_strength_at_fractions(fraction, expected):
    assert augment.strength_schedule(TrainConfig())(fraction) == expected


def test_no_boundaries_is_constant():
    schedule = PiecewiseConstant([], [0.1])
    assert schedule(0.0) == schedule(5.0) == 0.1 and schedule.next_change(0.0) is None


def test_next_change_is_the_next_boundary():
    schedule = PiecewiseConstant([0.8, 0.9], [1e-3, 1e-4, 1e-5])
    assert [schedule.next_change(f) for f in (0.0, 0.8, 0.85, 0.9, 1.2)] == [0.8, 0.9, 0.9, None, None]
    assert schedule.unit == "budget"


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
    # The end of the plan and past it: 0 exactly, never below (float32 sums gave -3e-8 at 12 steps).
    for planned in (12.0, 100.0, 200.0):
        schedule.planned_steps.assign(planned)
        assert [float(np.asarray(schedule(planned * k))) for k in (1, 1.5)] == [0.0, 0.0]


def test_plans_and_rates_that_are_not_positive_finite_numbers_are_refused():
    import keras
    import numpy as np

    from haet.schedules import Constant, LinearWarmup, PlannedPiecewiseLinear

    for value in (0, -5, float("nan"), True):
        with pytest.raises(ValueError, match="steps_per_epoch must be a positive finite number"):
            PlannedPiecewiseLinear([0, 2, 8], [0, 1, 0.1], knot_unit="epochs", steps_per_epoch=value)
    schedule = PlannedPiecewiseLinear([0, 0.5, 1], [0, 1, 0])
    for value in (float("nan"), 0, -5, "100", float("inf")):
        with pytest.raises(ValueError, match="planned_steps must be a positive finite number of steps"):
            schedule.attach(keras.optimizers.SGD(0.1), value)
    with pytest.raises(ValueError, match="plan_offset must be a finite number"):
        schedule.attach(keras.optimizers.SGD(0.1), 10, plan_offset=float("nan"))
    assert schedule.planned_steps is None  # nothing attached by a refused call
    for value in (float("nan"), -1, float("inf")):
        with pytest.raises(ValueError, match="learning_rate must be a finite number >= 0"):
            Constant(value)
    # Before its first step a warm-up is at 0, not below (-5 of 10 steps gave -0.05 of 0.1).
    assert float(np.asarray(LinearWarmup(Constant(0.1), 10)(-5))) == 0.0


def test_a_planned_schedule_never_attached_fails_at_the_first_step_with_haet_optimizers_too():
    """haet's SGD attached a plan of 1 step to any unattached planned schedule when it
    built (meant for loaded models only): Keras' fit trained 12 steps at the
    schedule's end value (weights moved 5e-8) without a word."""
    import keras
    import numpy as np

    from haet import models, optimizers
    from haet.schedules import PlannedPiecewiseLinear

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (16, 8, 8, 3)).astype("uint8"), rng.integers(0, 10, 16)
    for optimizer_class in (optimizers.SGD, optimizers.Adam, keras.optimizers.SGD):
        model = models.tiny_cnn(width_multiplier=0.25, input_shape=(8, 8, 3))
        schedule = PlannedPiecewiseLinear([0.0, 0.25, 1.0], [0.0, 0.4, 0.0])
        model.compile(optimizer_class(schedule), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        with pytest.raises(ValueError, match=r"attach\(optimizer, planned_steps\) was not called: .* call "
                                             r"schedule.attach\(model.optimizer, epochs \* steps_per_epoch"):
            model.fit(x, y, batch_size=4, epochs=3, verbose=0)
        assert schedule.planned_steps is None
    # As the message says: attached after compile, Keras' fit follows the plan.
    model = models.tiny_cnn(width_multiplier=0.25, input_shape=(8, 8, 3))
    model.compile(optimizers.SGD(schedule), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    schedule.attach(model.optimizer, 3 * 4, 4)
    model.fit(x, y, batch_size=4, epochs=3, verbose=0)
    assert int(model.optimizer.iterations) == 12 and float(np.asarray(schedule(3))) == pytest.approx(0.4)


def test_a_replan_keeps_the_schedule_where_it_is_and_ends_it_at_the_new_plan():
    import keras
    import numpy as np

    from haet.schedules import PlannedPiecewiseLinear, plan_fraction, replanned_offset

    def lr(step):
        return float(np.asarray(schedule(step)))

    schedule = PlannedPiecewiseLinear([0.0, 0.25, 1.0], [0.0, 0.4, 0.0])
    schedule.attach(keras.optimizers.SGD(learning_rate=schedule), planned_steps=100)
    # In the decay: step 50 of 100 (0.5 of the plan), re-planned to 80 steps.
    before = lr(50)
    offset = replanned_offset(50, 100, 0.0, 80)
    assert offset == pytest.approx(-20.0)
    schedule.planned_steps.assign(80.0)
    schedule.plan_offset.assign(offset)
    assert lr(50) == pytest.approx(before, abs=1e-7)  # 0.5 of the plan still: no step down
    assert lr(65) == pytest.approx(0.4 * 0.25 / 0.75, abs=1e-6) and lr(80) == pytest.approx(0.0, abs=1e-7)
    # In the warm-up: step 10 of 100 (0.16), re-planned to 50; without the offset 0.32.
    schedule.planned_steps.assign(100.0)
    schedule.plan_offset.assign(0.0)
    schedule.plan_offset.assign(replanned_offset(10, 100, 0.0, 50))
    schedule.planned_steps.assign(50.0)
    assert lr(10) == pytest.approx(0.16, abs=1e-6) and lr(50) == pytest.approx(0.0, abs=1e-7)
    # A second re-plan goes on from the first one's fraction: (30 - 5/0.9) / (50 - 5/0.9) = 0.55.
    offset = float(np.asarray(schedule.plan_offset))
    assert offset == pytest.approx(-5 / 0.9, rel=1e-6)
    assert float(np.asarray(plan_fraction(30, 50.0, offset))) == pytest.approx(0.55, abs=1e-6)
    later = replanned_offset(30, 50, offset, 40)
    assert float(np.asarray(plan_fraction(30, 40.0, later))) == pytest.approx(0.55, abs=1e-6)
    assert float(np.asarray(plan_fraction(40, 40.0, later))) == pytest.approx(1.0, abs=1e-6)
    # A plan that ends where the run is, or a plan already done, keeps the offset (the run stops).
    assert replanned_offset(30, 50, offset, 30) == offset and replanned_offset(50, 50, 0.0, 40) == 0.0


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


def _host(schedule, fraction):
    import numpy as np

    return float(np.asarray(schedule(fraction)))


@pytest.mark.parametrize("shape, warmup, expected", [
    # (fraction, learning rate) pairs, peak 0.1, final 0.01, boundaries 0.5/0.75, 2 cycles.
    ("constant", 0.0, [(0.0, 0.1), (0.5, 0.1), (1.0, 0.1)]),
    ("constant", 0.2, [(0.0, 0.0), (0.1, 0.05), (0.2, 0.1), (0.9, 0.1)]),
    ("step", 0.0, [(0.0, 0.1), (0.49, 0.1), (0.51, 0.01), (0.76, 0.001), (1.0, 0.001)]),
    ("step", 0.2, [(0.1, 0.05), (0.3, 0.1), (0.6, 0.01), (0.8, 0.001)]),
    ("cosine", 0.0, [(0.0, 0.1), (0.5, 0.055), (1.0, 0.01)]),
    ("cosine", 0.2, [(0.1, 0.05), (0.2, 0.1), (0.6, 0.055), (1.0, 0.01)]),
    ("cosine_restarts", 0.0, [(0.0, 0.1), (0.25, 0.055), (0.4999, 0.01), (0.5, 0.1), (0.75, 0.055),
                              (1.0, 0.01)]),
    ("linear", 0.0, [(0.0, 0.1), (0.5, 0.055), (1.0, 0.01)]),
    ("linear", 0.5, [(0.25, 0.05), (0.5, 0.1), (0.75, 0.055), (1.0, 0.01)]),
    # lr / sqrt(1 + t / 0.25): the Transformer's peak * sqrt(w / t) after a warmup w = 0.25.
    ("inverse_sqrt", 0.0, [(0.0, 0.1), (0.75, 0.05), (1.0, 0.1 / 5 ** 0.5)]),
    ("inverse_sqrt", 0.25, [(0.125, 0.05), (0.25, 0.1), (1.0, 0.05)]),
])
def test_learning_rate_shapes_per_step_and_per_budget_fraction(shape, warmup, expected):
    import keras

    from haet.schedules import BudgetSchedule, PlannedSchedule, lr_shape

    def make():
        return lr_shape(shape, 0.1, warmup=warmup, final_learning_rate=0.01, boundaries=(0.5, 0.75),
                        cycles=2, timescale=0.25)

    planned = PlannedSchedule(make())
    planned.attach(keras.optimizers.SGD(learning_rate=planned), planned_steps=10_000)
    budget = BudgetSchedule(make(), resolution=10_000)
    for fraction, value in expected:
        assert _host(planned, round(fraction * 10_000)) == pytest.approx(value, rel=1e-3, abs=1e-6), fraction
        assert budget(fraction) == pytest.approx(value, rel=1e-3, abs=1e-6), fraction
    # Past the end of the run the last value holds.
    assert budget(1.5) == pytest.approx(expected[-1][1], rel=1e-3)


def test_budget_schedule_changes_at_most_resolution_times():
    from haet.schedules import BudgetSchedule, lr_shape

    schedule = BudgetSchedule(lr_shape("cosine", 1.0), resolution=50)
    values = [schedule(i / 1000) for i in range(1001)]
    assert len(set(values)) == 51 and values == sorted(values, reverse=True)
    assert len(schedule._cache) == 51  # each tick evaluated once


def test_planned_schedule_follows_the_planned_steps_variable():
    import keras

    from haet.schedules import PlannedSchedule, lr_shape

    schedule = PlannedSchedule(lr_shape("linear", 1.0))
    schedule.attach(keras.optimizers.SGD(learning_rate=schedule), planned_steps=100)
    assert _host(schedule, 50) == pytest.approx(0.5)
    schedule.planned_steps.assign(200.0)
    assert _host(schedule, 50) == pytest.approx(0.75) and _host(schedule, 400) == pytest.approx(0.0, abs=1e-6)


def test_planned_schedule_survives_saving(tmp_path):
    import keras
    import numpy as np

    from haet.schedules import PlannedSchedule, lr_shape

    import warnings

    from haet.optimizers import SGD

    schedule = PlannedSchedule(lr_shape("cosine", 0.1, warmup=0.1))
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    optimizer = SGD(learning_rate=schedule, momentum=0.9)
    schedule.attach(optimizer, 100)
    schedule.plan_offset.assign(-20.0)  # as after a re-plan
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(np.zeros((4, 2)), np.ones((4, 1)), verbose=0)
    model.save(tmp_path / "m.keras")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "Skipping variable loading for optimizer"
        loaded = keras.saving.load_model(tmp_path / "m.keras")
    restored = loaded.optimizer._learning_rate
    assert isinstance(restored, PlannedSchedule)
    assert restored.get_config() == schedule.get_config() and schedule.get_config()["planned_steps"] == 100.0
    assert schedule.get_config()["plan_offset"] == -20.0
    # The whole optimizer state came back: the plan, the step count, the momentum.
    for a, b in zip(optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(np.asarray(loaded.optimizer.iterations)) == 1.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(shape="exponential"), "Unknown learning-rate shape 'exponential'"),
    (dict(learning_rate=-1.0), "learning_rate must be positive"),
    (dict(final_learning_rate=0.5), r"final_learning_rate must be in \[0, learning_rate=0.1\]"),
    (dict(warmup=1.0), r"warmup must be a fraction of the run in \[0, 1\)"),
    (dict(cycles=0), "cycles must be a positive integer"),
    (dict(shape="step", boundaries=(0.9, 0.5)), "strictly increasing"),
    (dict(shape="step", warmup=0.6, boundaries=(0.5,)), r"\(warmup=0.6, 1\)"),
    (dict(shape="inverse_sqrt", timescale=0.0), "timescale must be a positive"),
])
def test_bad_learning_rate_shapes(kwargs, message):
    from haet.schedules import lr_shape

    args = dict(shape="cosine", learning_rate=0.1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        lr_shape(**args)


def test_config_schedules_and_linear_scaling_rule():
    from haet.schedules import BudgetSchedule, PlannedPiecewiseLinear, PlannedSchedule, learning_rate_schedule

    umbc = learning_rate_schedule(TrainConfig())
    assert isinstance(umbc, PiecewiseConstant) and umbc.unit == "budget"
    step = learning_rate_schedule(TrainConfig(lr_schedule="step", learning_rate=1e-3))
    # The step shape with the default boundaries and factor is the UMBC schedule.
    assert isinstance(step, BudgetSchedule) and step.unit == "budget" and step.next_change(0.5) is None
    assert [step(f) for f in (0.0, 0.85, 0.95)] == pytest.approx([1e-3, 1e-4, 1e-5])
    cosine = learning_rate_schedule(TrainConfig(lr_schedule="cosine", lr_schedule_unit="steps"))
    assert isinstance(cosine, PlannedSchedule) and cosine.unit == "steps"
    scaled = learning_rate_schedule(TrainConfig(lr_schedule="one_cycle", batch_size=512, lr_scaling_reference_batch=128))
    assert isinstance(scaled, PlannedPiecewiseLinear) and scaled.values == pytest.approx([0.0, 1.6, 0.0])
    wall = learning_rate_schedule(TrainConfig(batch_size=64, lr_scaling_reference_batch=32))
    assert wall.values == pytest.approx([2e-3, 2e-4, 2e-5])


def test_a_model_saved_before_plans_had_an_offset_loads_its_whole_optimizer_state(tmp_path, monkeypatch):
    import warnings

    import keras
    import numpy as np

    from haet import schedules
    from haet.optimizers import SGD
    from haet.schedules import PlannedSchedule, lr_shape

    def attach_without_offset(self, optimizer, planned_steps, plan_offset=0.0):  # as the code was
        self.planned_steps = optimizer.add_variable(
            shape=(), initializer=keras.initializers.Constant(float(planned_steps)), dtype="float32",
            name="planned_steps")
        return self.planned_steps

    with monkeypatch.context() as patch:
        patch.setattr(schedules._PlannedSteps, "attach", attach_without_offset)
        patch.setattr(PlannedSchedule, "get_config",
                      lambda self: {"shape": keras.optimizers.schedules.serialize(self.shape),
                                    "planned_steps": float(np.asarray(self.planned_steps))})
        schedule = PlannedSchedule(lr_shape("cosine", 0.1))
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        optimizer = SGD(learning_rate=schedule, momentum=0.9)
        schedule.attach(optimizer, 100)
        model.compile(optimizer=optimizer, loss="mse")
        model.fit(np.zeros((4, 2)), np.ones((4, 1)), verbose=0)
        model.save(tmp_path / "old.keras")
        saved = [np.asarray(v) for v in optimizer.variables]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "Skipping variable loading for optimizer"
        loaded = keras.saving.load_model(tmp_path / "old.keras")
    restored = loaded.optimizer._learning_rate
    assert float(np.asarray(restored.plan_offset)) == 0.0 and float(np.asarray(restored.planned_steps)) == 100.0
    others = [v for v in loaded.optimizer.variables if v is not restored.plan_offset]
    assert len(others) == len(saved)
    for a, b in zip(others, saved):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert float(np.asarray(loaded.optimizer.iterations)) == 1.0
