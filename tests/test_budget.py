import keras
import numpy as np
import pytest

from haet.augment import RandomAffine
from haet.budget import PhaseTimer, WallClockBudget
from haet.data import ShuffledBatches
from haet.schedules import PiecewiseConstant


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class Tick(keras.callbacks.Callback):
    """Advances the fake clock by `seconds` at the end of every step."""

    def __init__(self, clock, seconds):
        super().__init__()
        self.clock, self.seconds = clock, seconds

    def on_train_batch_end(self, batch, logs=None):
        self.clock.t += self.seconds


class Record(keras.callbacks.Callback):
    """Reads the learning rate and augmentation strength each step used."""

    def __init__(self, layer):
        super().__init__()
        self.layer, self.rows = layer, []

    def on_train_batch_end(self, batch, logs=None):
        model = self.model  # syncs the JAX state
        self.rows.append((float(np.asarray(model.optimizer.learning_rate)),
                          float(np.asarray(self.layer.strength))))


def _tiny_model():
    inputs = keras.Input((8, 8, 3))
    layer = RandomAffine(seed=0, name="augmentation")
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(layer(inputs)))
    model = keras.Model(inputs, keras.layers.Dense(2)(x))
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"], jit_compile=True)
    return model, layer


def _batches(n=16, batch_size=4):
    rng = np.random.default_rng(0)
    return ShuffledBatches(rng.uniform(size=(n, 8, 8, 3)).astype("float32"),
                           rng.integers(0, 2, n).astype("int32"), batch_size, seed=0)


def test_schedules_follow_the_clock_and_training_stops_at_the_budget():
    model, layer = _tiny_model()
    clock = FakeClock()
    budget = WallClockBudget(
        10.0,
        PiecewiseConstant([0.8, 0.9], [1e-3, 1e-4, 1e-5]),
        augmentation=layer,
        augmentation_strength=PiecewiseConstant([0.5], [1.0, 0.0]),
        fill_modes=("wrap", "reflect"),
        clock=clock,
    )
    record = Record(layer)
    model.fit(_batches(), epochs=1000, verbose=0, callbacks=[Tick(clock, 1.0), budget, record])
    # Step k starts at k - 1 seconds and ends at k: the first step ending at or after
    # 10 s is step 10, 4 steps per epoch, so epochs of 4, 4 and 2 steps.
    assert budget.steps == 10 and budget.train_seconds() == 10.0
    lrs, strengths = zip(*record.rows)
    np.testing.assert_allclose(lrs, [1e-3] * 8 + [1e-4] + [1e-5], rtol=1e-6)
    assert strengths == (1.0,) * 5 + (0.0,) * 5
    assert [row["steps"] for row in budget.history] == [4, 4, 2]
    assert [row["complete"] for row in budget.history] == [True, True, False]
    assert [row["elapsed_seconds"] for row in budget.history] == [4.0, 8.0, 10.0]
    assert [row["remaining_seconds"] for row in budget.history] == [6.0, 2.0, 0.0]
    assert all(row["fill_mode"] in ("wrap", "reflect") for row in budget.history)
    assert all(np.isfinite(row["loss"]) and 0 <= row["accuracy"] <= 1 for row in budget.history)
    assert budget.history[-1]["learning_rate"] == 1e-5


def test_real_clock_stops_at_the_first_step_boundary_after_the_budget():
    model, _ = _tiny_model()
    budget = WallClockBudget(1.0, PiecewiseConstant([], [1e-3]))
    model.fit(_batches(), epochs=10**6, verbose=0, callbacks=[budget])
    assert sum(budget.step_seconds[:-1]) < 1.0 <= sum(budget.step_seconds)
    assert budget.train_seconds() == pytest.approx(sum(budget.step_seconds))
    assert 0.0 <= budget.compile_seconds() <= budget.step_seconds[0]


def test_bad_budget_arguments():
    lr = PiecewiseConstant([], [1e-3])
    with pytest.raises(ValueError, match="budget_seconds must be positive .* Received: 0"):
        WallClockBudget(0, lr)
    with pytest.raises(ValueError, match="fill_modes must be a non-empty subset"):
        WallClockBudget(1, lr, fill_modes=("mirror",))


def test_phase_timer_accumulates():
    clock = FakeClock()
    timer = PhaseTimer(clock)
    for _ in range(2):
        with timer.phase("eval"):
            clock.t += 1.5
    assert timer.seconds == {"eval": 3.0}


def _planned_run():
    """A tiny model on a one-cycle schedule, a 40 s budget on a fake clock and a planner
    (4 steps an epoch, planning after 1 + 3 steps)."""
    from haet.budget import StepPlanner
    from haet.schedules import PlannedPiecewiseLinear

    model, _ = _tiny_model()
    schedule = PlannedPiecewiseLinear([0.0, 0.5, 1.0], [0.0, 0.1, 0.0])
    optimizer = keras.optimizers.SGD(schedule)
    schedule.attach(optimizer, 10**6)
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=True)
    clock = FakeClock()
    budget = WallClockBudget(40.0, None, clock=clock)
    planner = StepPlanner(budget, schedule.planned_steps, steps_per_epoch=4, probe_steps=3)
    return model, schedule, clock, budget, planner


def test_planner_sets_the_schedule_length_from_measured_steps():
    model, schedule, clock, budget, planner = _planned_run()

    class Rates(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.rates = []

        def on_train_batch_end(self, batch, logs=None):
            self.rates.append(float(np.asarray(self.model.optimizer.learning_rate)))

    rates = Rates()

    # 1 s per step: after 4 steps, 36 s remain -> 40 steps in all = 10 epochs of 4.
    model.fit(_batches(), epochs=1000, verbose=0, callbacks=[Tick(clock, 1.0), budget, planner, rates])
    assert planner.planned_epochs == 10 and planner.planned_steps_value == 40
    assert planner.step_seconds == 1.0
    assert budget.steps == 40 and float(np.asarray(schedule.planned_steps)) == 40.0
    # The learning rate read after step k is the schedule at iteration k: peak at 20 of 40.
    assert max(rates.rates) == pytest.approx(0.1, rel=1e-5)
    assert int(np.argmax(rates.rates)) == 19 and rates.rates[-1] == pytest.approx(0.0, abs=1e-7)


def test_planner_charges_the_measured_epoch_overhead_and_replans_once():
    model, schedule, clock, budget, planner = _planned_run()

    class Validation(keras.callbacks.Callback):
        """4 s between epochs, as a validation pass would take."""

        def on_epoch_end(self, epoch, logs=None):
            clock.t += 4.0

    # Planned at step 4 without overhead: 10 epochs. At the first epoch end 32 s remain
    # and each further epoch costs 4 s of steps + 4 s of overhead (not after the last):
    # 4 more epochs, whose steps end at 36 s.
    model.fit(_batches(), epochs=1000, verbose=0,
              callbacks=[Tick(clock, 1.0), budget, Validation(), planner])
    assert planner.replanned_from == 10 and planner.planned_epochs == 5
    assert planner.epoch_overheads == [4.0] * 5
    assert budget.steps == 20 and float(np.asarray(schedule.planned_steps)) == 20.0
    assert budget.end == 36.0
