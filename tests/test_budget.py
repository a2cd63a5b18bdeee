"""The budget, the planner and the host loop on a fake clock: exact arithmetic, no real time."""

import keras
import numpy as np
import pytest

from conftest import FakeClock, FakeEngine
from haet.augment import RandomAffine
from haet.budget import PhaseTimer, Progress, StepPlanner, WallClockBudget
from haet.hooks import SnapshotKeeper
from haet.loop import Hook, KerasCallbacks, StepLimit, Training
from haet.schedules import PiecewiseConstant


def _fit(engine, budget, *hooks, epochs=0):
    return Training(engine, budget, [budget, *hooks], epochs=epochs).fit()


def test_schedules_follow_the_clock_and_training_stops_at_the_budget():
    clock = FakeClock()
    engine = FakeEngine(clock, size=16, batch_size=4, step_seconds=1.0)
    layer = RandomAffine(seed=0)
    budget = WallClockBudget(10.0, PiecewiseConstant([0.8, 0.9], [1e-3, 1e-4, 1e-5]), augmentation=layer,
                             augmentation_strength=PiecewiseConstant([0.5], [1.0, 0.0]),
                             fill_modes=("wrap", "reflect"), clock=clock)
    run = _fit(engine, budget)
    # Step k starts at k - 1 seconds and ends at k: the first step ending at or after
    # 10 s is step 10, 4 steps per epoch, so epochs of 4, 4 and 2 steps.
    assert budget.steps == 10 and budget.train_seconds() == 10.0 and run.stopped_by == "budget"
    assert [s["learning_rate"] for s in engine.steps] == [1e-3] * 8 + [1e-4] + [1e-5]
    assert [s["strength"] for s in engine.steps] == [1.0] * 5 + [0.0] * 5
    assert {s["fill_mode_index"] for s in engine.steps} <= {2, 3}  # wrap, reflect
    # The first execution (no step time known) is one step; later ones end where a
    # schedule changes, the epoch ends or the budget ends.
    assert engine.executions == [1, 3, 1, 3, 1, 1]
    assert [row["steps"] for row in budget.history] == [4, 4, 2]
    assert [row["complete"] for row in budget.history] == [True, True, False]
    assert [row["elapsed_seconds"] for row in budget.history] == [4.0, 8.0, 10.0]
    assert [row["remaining_seconds"] for row in budget.history] == [6.0, 2.0, 0.0]
    assert budget.history[-1]["learning_rate"] == 1e-5 and budget.history[-1]["augmentation_strength"] == 0.0


def test_time_between_executions_is_the_host_work_between_them():
    """Host work at each epoch end (0.5 s on the fake clock) is counted between
    executions; a checkpoint-like pause is not; what follows the last execution is
    not training time."""
    clock = FakeClock()
    engine = FakeEngine(clock, size=16, batch_size=4, step_seconds=1.0)
    budget = WallClockBudget(12.0, clock=clock)
    ends = []

    class HostWork(Hook):
        def on_epoch_end(self, run, epoch, logs):
            ends.append(clock.t)
            clock.t += 0.5
            with budget.pause():
                clock.t += 7.0

    _fit(engine, budget, HostWork())
    # Epochs of 4, 4 and 3 steps of 1 s: two epoch ends (1 s of host work) fall between
    # executions inside the 12 s, the third after the last execution.
    assert engine.executions == [1, 3, 4, 3] and len(ends) == 3 and budget.paused_seconds == 21.0
    assert budget.train_seconds() == 12.0
    assert budget.between_executions_seconds() == 1.0 == budget.train_seconds() - budget.steps


def test_executions_never_exceed_k_and_the_overshoot_is_at_most_one_execution():
    # Steps slow down from 1 s to 3 s after step 6: the predicted execution lengths
    # are wrong, yet no execution starts after the budget's end and the run ends
    # within one execution of it.
    clock = FakeClock()
    engine = FakeEngine(clock, size=400, batch_size=4, steps_per_execution=5,
                        step_seconds=lambda step: 1.0 if step < 6 else 3.0)
    budget = WallClockBudget(20.0, clock=clock)
    _fit(engine, budget)
    assert max(engine.executions) <= 5
    starts = np.cumsum([0.0] + [e.seconds for e in budget.executions])[:-1]
    assert all(start < 20.0 for start in starts)
    assert 0 <= budget.train_seconds() - 20.0 < budget.executions[-1].seconds


def test_step_time_estimate_and_compile_seconds():
    clock = FakeClock()
    engine = FakeEngine(clock, size=400, batch_size=4, compile_seconds=5.0, step_seconds=0.5)
    budget = WallClockBudget(30.0, clock=clock)
    _fit(engine, budget)
    assert budget.executions[0].steps == 1 and budget.executions[0].seconds == 5.5
    assert budget.step_seconds() == 0.5 and budget.compile_seconds() == 5.0
    assert budget.steps_within(2.0) == 4 and budget.steps_within(2.1) == 5 and budget.steps_within(0.0) == 1


def test_bad_budget_arguments():
    with pytest.raises(ValueError, match="budget_seconds must be positive .* Received: 0"):
        WallClockBudget(0)
    with pytest.raises(ValueError, match="fill_modes must be a non-empty subset"):
        WallClockBudget(1, fill_modes=("mirror",))


def test_phase_timer_charges_each_second_to_the_innermost_phase():
    clock = FakeClock()
    timer = PhaseTimer(clock)
    for _ in range(2):
        with timer.phase("eval"):
            clock.t += 1.5
    with timer.phase("setup"):
        clock.t += 1.0
        with timer.phase("precompute"):
            clock.t += 4.0
        clock.t += 0.5
    assert timer.seconds == {"eval": 3.0, "setup": 1.5, "precompute": 4.0}


class _PlannedSteps:
    name = "planned_steps"


def _planned(budget_seconds, epoch_overhead=0.0, steps_per_execution=16):
    clock = FakeClock()
    engine = FakeEngine(clock, size=16, batch_size=4, step_seconds=1.0, steps_per_execution=steps_per_execution)
    budget = WallClockBudget(budget_seconds, clock=clock)
    planner = StepPlanner(budget, _PlannedSteps(), steps_per_epoch=4, probe_steps=3)

    class Validation(Hook):
        def on_epoch_end(self, run, epoch, logs):
            clock.t += epoch_overhead

    run = Training(engine, budget, [Validation(), budget, planner]).fit()
    return engine, budget, planner, run


def test_planner_probes_on_a_copy_then_plans_before_any_kept_step():
    engine, budget, planner, run = _planned(40.5)
    # Probe: 1 step (compiling) + 3 timed steps = 4 s, discarded; 36.5 s left at 1 s a
    # step = 9 whole epochs of 4 steps, which end at 40 s.
    assert engine.restores == 1 and budget.probe_steps() == 4
    assert planner.step_seconds == 1.0 and planner.planned_epochs == 9 and planner.planned_steps_value == 36
    kept = [s for s in engine.steps if s["restored"] == 1]
    assert len(kept) == budget.steps == 36 and run.stopped_by == "planned"
    # No kept step ran on a schedule of unknown length.
    assert all(s["planned_steps"] == 36.0 for s in kept)
    assert all("planned_steps" not in s for s in engine.steps[:4])
    assert budget.train_seconds() == 40.0 and planner.replanned_from is None


def test_a_plan_done_in_the_execution_that_ends_the_budget_stopped_as_planned():
    # Probe 4 s, 36 s left: 9 epochs whose last step ends at 40 s, the budget's end too.
    engine, budget, planner, run = _planned(40.0)
    assert planner.planned_steps_value == 36 and budget.steps == 36 and budget.train_seconds() == 40.0
    assert run.stopped_by == "planned"  # the budget ran out after that execution too: said by over_budget


def test_planner_charges_the_measured_epoch_overhead_and_replans_once():
    # 4 s between epochs (a validation pass). Planned after the 4 s probe: 9 epochs.
    # At the first epoch end (12 s) 28.5 s remain and each further epoch costs 4 s of
    # steps + 4 s of overhead (not after the last): 4 more epochs, 5 in all, whose
    # steps end at 40 s.
    engine, budget, planner, run = _planned(40.5, epoch_overhead=4.0)
    assert planner.replanned_from == 9 and planner.planned_epochs == 5
    assert [(r["epoch"], r["from_epochs"], r["to_epochs"], r["reason"]) for r in planner.replans] == [
        (1, 9, 5, "overhead")]
    assert planner.epoch_overheads == [4.0] * 5
    assert budget.steps == 20 and budget.end == 40.0 and run.stopped_by == "planned"
    assert [s["planned_steps"] for s in engine.steps[4:]] == [36.0] * 4 + [20.0] * 16


class _PlanOffset:
    name = "plan_offset"


def _paced(step_seconds, pace_window=0.25, budget_seconds=100.5, plan_offset=None):
    """Epochs of 4 steps, one execution an epoch; the probe (1 + 3 steps) runs at 1 s a
    step (a 100.5 s budget: 24 epochs planned, 96 steps ending at 100 s)."""
    clock = FakeClock()
    engine = FakeEngine(clock, size=16, batch_size=4, step_seconds=step_seconds, steps_per_execution=4)
    budget = WallClockBudget(budget_seconds, clock=clock)
    planner = StepPlanner(budget, _PlannedSteps(), steps_per_epoch=4, probe_steps=3, pace_window=pace_window,
                          plan_offset=plan_offset)
    run = Training(engine, budget, [budget, planner]).fit()
    return engine, budget, planner, run


def test_planner_plans_fewer_epochs_when_the_steps_slow_down_after_the_probe():
    # Steps take 1.5 s from the 21st kept one (engine step 24; the probe's 4 come first).
    slower = lambda step: 1.0 if step < 24 else 1.5  # noqa: E731
    engine, budget, planner, run = _paced(slower)
    # The pace is the median of the last 5 executions (epochs) until they are a quarter of
    # the steps. Epoch 7 ends at 36 s: 2 of the 5 slow, median 1 s, 4 s lost: 28 + 64.5 =
    # 92.5 steps fit, 3.5 s short (not more than an epoch, 4 s): no change. Epoch 8 ends
    # at 42 s: 3 of 5 slow, median 1.5 s, 58.5 s left, 32 + 58.5 / 1.5 = 71 steps fit, 25
    # fewer than planned (37.5 s: more than an epoch and 5% of the seconds left): 17
    # epochs, whose steps end at 96 s.
    assert planner.replanned_from == 24 and planner.planned_epochs == 17
    assert planner.replans == [{"epoch": 8, "from_epochs": 24, "to_epochs": 17, "reason": "pace",
                                "step_seconds": 1.5, "overhead_seconds": 0.0, "remaining_seconds": 58.5}]
    assert run.stopped_by == "planned" and budget.steps == 68 and budget.train_seconds() == 96.0
    kept = engine.steps[4:]
    assert [s["planned_steps"] for s in kept] == [96.0] * 32 + [68.0] * 36
    # The plan kept: the budget stops the run after 71 of its 96 steps, the schedule undecayed.
    engine, budget, planner, run = _paced(slower, pace_window=0.0)
    assert planner.replans == [] and planner.planned_epochs == 24
    assert run.stopped_by == "budget" and budget.steps == 71 and planner.planned_steps_value == 96


def test_a_replan_with_the_plan_offset_keeps_the_fraction_done_continuous():
    # The slow-down above: after 32 of 96 steps (1/3 of the plan) the plan becomes 68 steps.
    # With the schedule's plan offset the fraction stays 1/3 there and reaches 1 at 68:
    # o = (68 / 3 - 32) / (2 / 3) = -14, (32 - 14) / (68 - 14) = 1/3.
    engine, budget, planner, run = _paced(lambda step: 1.0 if step < 24 else 1.5, plan_offset=_PlanOffset())
    assert planner.planned_epochs == 17 and planner.plan_offset_value == pytest.approx(-14.0)
    assert planner.replans[0]["plan_offset"] == pytest.approx(-14.0)
    assert run.stopped_by == "planned" and budget.steps == 68
    kept = engine.steps[4:]
    assert [s["plan_offset"] for s in kept] == [0.0] * 32 + [pytest.approx(-14.0)] * 36
    done = [(k + s["plan_offset"]) / (s["planned_steps"] + s["plan_offset"]) for k, s in enumerate(kept)]
    steps = [b - a for a, b in zip(done, done[1:])]
    # Step 32 is at 1/3 of the new plan as of the old one: no jump, then steps of 1/54.
    assert steps[:32] == pytest.approx([1 / 96] * 32) and steps[32:] == pytest.approx([1 / 54] * 35)
    assert done[-1] + 1 / 54 == pytest.approx(1.0)  # after the last kept step
    # The host's view of the run (snapshots) reads the same fraction.
    progress = Progress(budget, lambda: planner.planned_steps_value, lambda: planner.plan_offset_value)
    assert progress.fraction() == 1.0
    budget.steps = 32
    assert progress.fraction() == pytest.approx(1 / 3) and progress.steps_until(0.5) == 9  # (41 - 14) / 54
    # The schedule's step read from the optimizer (mixed_float16 skips overflowing steps:
    # 3 behind the budget's 32): the fraction is kept at that step, 29 / 96.
    clock = FakeClock()
    lagging = FakeEngine(clock, size=16, batch_size=4, step_seconds=lambda step: 1.0 if step < 24 else 1.5,
                         steps_per_execution=4)
    lagging.read = lambda variable: lagging_budget.steps - 3
    lagging_budget = WallClockBudget(100.5, clock=clock)
    lagging_planner = StepPlanner(lagging_budget, _PlannedSteps(), steps_per_epoch=4, probe_steps=3,
                                  plan_offset=_PlanOffset(), step=object())
    Training(lagging, lagging_budget, [lagging_budget, lagging_planner]).fit()
    offset = lagging_planner.plan_offset_value
    assert (29 + offset) / (68 + offset) == pytest.approx(29 / 96) and offset != pytest.approx(-14.0)
    # Kept in checkpoints; one from before offsets existed had none: 0.
    resumed = StepPlanner(WallClockBudget(100.5), _PlannedSteps(), 4, probe_steps=3, plan_offset=_PlanOffset())
    resumed.load_state_dict(planner.state_dict())
    assert resumed.plan_offset_value == pytest.approx(-14.0)
    resumed.load_state_dict({k: v for k, v in planner.state_dict().items() if k != "plan_offset_value"})
    assert resumed.plan_offset_value == 0.0


def test_planner_counts_lost_time_and_keeps_a_plan_that_ends_within_an_epoch_of_the_budget():
    # A 200.5 s budget: 49 epochs planned (196 steps) ending at 200 s. One slow epoch (2 s
    # a step, kept steps 121-124): 4 s lost, the plan would end 3.5 s (less than an epoch)
    # past the budget: kept, and the budget cuts its last epoch.
    engine, budget, planner, run = _paced(lambda step: 2.0 if 124 <= step < 128 else 1.0, budget_seconds=200.5)
    assert planner.replans == [] and run.stopped_by == "budget" and budget.steps == 193
    # Two slow epochs: 8 s lost. After the second (epoch 32, 140 s) the median of the 8
    # executions of the last quarter of the steps is 1 s, but the lost time is counted:
    # 128 + 60.5 = 188.5 steps fit, 7.5 fewer than planned (more than an epoch, 4 s, and
    # 5% of the 60.5 s left): 47 epochs, ending at 200 s.
    engine, budget, planner, run = _paced(lambda step: 2.0 if 124 <= step < 132 else 1.0, budget_seconds=200.5)
    assert [(r["epoch"], r["to_epochs"], r["step_seconds"]) for r in planner.replans] == [(32, 47, 1.0)]
    assert run.stopped_by == "planned" and budget.steps == 188 and budget.train_seconds() == 200.0


def test_planner_does_not_take_the_dispatch_cost_of_one_step_executions_for_the_pace():
    """A training-health sample every 50 steps is its own 1-step execution; each execution
    costs 10 ms more than its steps (dispatch): the pace is the step-weighted median, so
    the plan (28 epochs of 98 steps at 0.01 s) is kept, as with pace_window=0."""
    class HealthSamples(Hook):
        crosses_epochs = True

        def limit(self, run):
            offset = run.budget.steps % 50
            return 1 if offset == 0 else 50 - offset

    for window in (0.25, 0.0):
        clock = FakeClock()
        engine = FakeEngine(clock, size=392, batch_size=4, step_seconds=0.01, steps_per_execution=64,
                            spans_epochs=True)
        run_steps = engine.run

        def run(steps, run_steps=run_steps):
            clock.t += 0.01
            return run_steps(steps)

        engine.run = run
        budget = WallClockBudget(30.0, clock=clock)
        planner = StepPlanner(budget, _PlannedSteps(), steps_per_epoch=98, probe_steps=20, pace_window=window)
        run = Training(engine, budget, [budget, HealthSamples(), planner]).fit()
        assert planner.replans == [] and planner.planned_epochs == 28
        assert run.stopped_by == "planned" and budget.steps == 28 * 98


def test_planner_plans_nothing_after_the_budget_stopped_the_run():
    # Steps 10x slower from kept step 169, in executions of 2 over epochs of 8: the budget
    # stops the run inside epoch 22 before the pace is seen; its last epoch end re-plans
    # nothing (the record keeps the plan the run followed).
    clock = FakeClock()
    engine = FakeEngine(clock, size=32, batch_size=4, step_seconds=lambda step: 1.0 if step < 172 else 10.0,
                        steps_per_execution=2)
    budget = WallClockBudget(200.5, clock=clock)
    planner = StepPlanner(budget, _PlannedSteps(), steps_per_epoch=8, probe_steps=3)
    run = Training(engine, budget, [budget, planner]).fit()
    assert run.stopped_by == "budget" and budget.steps == 172 and budget.train_seconds() == 212.0
    assert planner.replans == [] and planner.planned_epochs == 24


def test_planner_state_keeps_its_replans_and_reads_an_older_checkpoint():
    engine, budget, planner, run = _paced(lambda step: 1.0 if step < 24 else 1.5)
    state = planner.state_dict()
    resumed = StepPlanner(WallClockBudget(100.5), _PlannedSteps(), steps_per_epoch=4, probe_steps=3)
    resumed.load_state_dict(state)
    assert resumed.replans == planner.replans and resumed.planned_epochs == 17
    # A checkpoint from before: the first plan is kept, as the overhead re-plan it was.
    older = {k: v for k, v in state.items() if k != "replans"} | {"replanned_from": 24}
    resumed.load_state_dict(older)
    assert resumed.replanned_from == 24 and resumed.replans == [
        {"epoch": 1, "from_epochs": 24, "to_epochs": 17, "reason": "overhead"}]
    resumed.load_state_dict(older | {"replanned_from": None})
    assert resumed.replans == [] and resumed.replanned_from is None
    with pytest.raises(ValueError, match="pace_window must be in"):
        StepPlanner(budget, _PlannedSteps(), steps_per_epoch=4, pace_window=1.5)


def test_planner_when_the_probe_exhausts_the_budget(caplog):
    import logging

    with caplog.at_level(logging.WARNING):
        engine, budget, planner, run = _planned(3.0)
    # The budget ran out during the probe: one step is planned (not an epoch the budget cuts), and run.
    assert planner.planned_steps_value == 1 and budget.steps == 1 and run.stopped_by == "planned"
    # The probe's undone steps took most of the budget: a warning says so (none for the 40.5 s budget's 3 s).
    (warning,) = [r.getMessage() for r in caplog.records if "planner's probe" in r.getMessage()]
    assert "timed 3 steps in 3.0 s, more than a quarter of the 3 s budget" in warning
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _planned(40.5)
    assert not [r for r in caplog.records if "planner's probe" in r.getMessage()]


def test_a_stop_signal_during_the_planners_probe_stops_it_before_any_kept_step():
    """The probe ran to its end (200 steps in a haet.fit case), then one kept execution,
    before the signal was acted on."""
    import signal

    from haet.checkpoint import StopSignals

    clock = FakeClock()
    engine = FakeEngine(clock, size=16, batch_size=4, step_seconds=1.0, steps_per_execution=2)
    budget = WallClockBudget(100.0, clock=clock)
    planner = StepPlanner(budget, _PlannedSteps(), steps_per_epoch=4, probe_steps=10)
    signals = StopSignals()
    execute = budget.execute

    def signalled(engine, steps, probe=False):
        losses = execute(engine, steps, probe)
        if len(budget.executions) == 2:  # the signal comes during the probe's second execution
            signals._handle(signal.SIGTERM, None)
        return losses

    budget.execute = signalled
    run = Training(engine, budget, [signals, budget, planner]).fit()
    assert run.stopped_by == "interrupted" and budget.steps == 0 and len(budget.executions) == 2
    assert planner.planned_epochs is None and engine.restores == 1  # the probe's steps undone, nothing planned


def test_planner_plans_part_of_an_epoch_when_not_one_fits(caplog):
    """It planned at least one whole epoch, which the budget then cut before the
    schedule had decayed (a 5 s haet.fit run ended at 0.133, near its one-cycle peak),
    with no word of it. Now the schedule runs over the steps that fit, and a warning
    says so."""
    import logging

    with caplog.at_level(logging.WARNING):
        engine, budget, planner, run = _planned(6.5)
    # Probe 4 s, 2.5 s left at 1 s a step: 2 of the epoch's 4 steps.
    assert planner.planned_steps_value == 2 and planner.planned_epochs == 1 and planner.replans == []
    kept = [s for s in engine.steps if s["restored"] == 1]
    assert len(kept) == budget.steps == 2 and run.stopped_by == "planned" and budget.train_seconds() == 6.0
    assert all(s["planned_steps"] == 2.0 for s in kept)
    (warning,) = [r.getMessage() for r in caplog.records if "does not fit" in r.getMessage()]
    assert warning.startswith("one epoch (4 steps) does not fit the 2.5 s left at 1.0000 s a step: planned 2 steps "
                              "(50% of an epoch")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _planned(8.5)  # 4.5 s left: one epoch fits
    assert not [r for r in caplog.records if "does not fit" in r.getMessage()]


def test_planner_with_a_real_schedule_and_engine_hits_the_peak_mid_run():
    from haet.engine import make_engine
    from haet.schedules import PlannedPiecewiseLinear

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    schedule = PlannedPiecewiseLinear([0.0, 0.5, 1.0], [0.0, 0.1, 0.0])
    optimizer = keras.optimizers.SGD(schedule)
    schedule.attach(optimizer, 1)
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=True)
    x = np.random.default_rng(0).normal(size=(16, 3)).astype("float32")
    engine = make_engine(model, x, np.arange(16) % 2, 4, steps_per_execution=1)
    clock = FakeClock()
    run_once = engine.run

    def run(steps):  # each step takes 1 s on the fake clock
        clock.t += steps
        return run_once(steps)

    engine.run = run
    rates = []

    class Rates(Hook):
        def after_execution(self, run, steps, losses):
            rates.append(run.engine.learning_rate)  # the rate of the next step

    budget = WallClockBudget(40.5, clock=clock)
    planner = StepPlanner(budget, schedule.planned_steps, steps_per_epoch=4, probe_steps=3)
    Training(engine, budget, [budget, Rates(), planner]).fit()
    assert planner.planned_steps_value == 36 and budget.steps == 36
    assert float(np.asarray(schedule.planned_steps)) == 36.0
    # The rate after kept step k is the schedule at iteration k: peak at 18 of 36.
    assert max(rates) == pytest.approx(0.1, rel=1e-5) and int(np.argmax(rates)) == 17
    assert rates[-1] == pytest.approx(0.0, abs=1e-7)
    assert int(np.asarray(optimizer.iterations)) == 36  # the probe's steps were undone


def test_snapshots_are_taken_exactly_at_cycle_ends_of_the_planned_steps():
    clock = FakeClock()
    engine = FakeEngine(clock, size=16, batch_size=4)
    budget = WallClockBudget(1000.0, clock=clock)
    keeper = SnapshotKeeper([0.3, 0.6, 1.0], Progress(budget, lambda: 10))
    keeper._take = lambda run, fraction: keeper.snapshots.append((fraction, budget.steps))

    _fit(engine, budget, StepLimit(10), keeper)
    # 10 planned steps: snapshots after steps 3 and 6 (executions cut there) and at the end.
    assert keeper.snapshots == [(0.3, 3), (0.6, 6), (1.0, 10)]
    with pytest.raises(ValueError, match="end at 1"):
        SnapshotKeeper([0.5, 0.9], Progress(budget))


def test_cycle_ends_on_one_step_keep_one_snapshot():
    """A plan of 3 steps for 5 cycles (a plan of less than an epoch): cycle ends 0.4
    and 0.6 both fall on step 2, and 0.8 on step 3, the run's end. Each was kept, the
    same weights twice over (5 members, 3 of them distinct)."""
    clock = FakeClock()
    engine = FakeEngine(clock, size=16, batch_size=4)
    budget = WallClockBudget(1000.0, clock=clock)
    keeper = SnapshotKeeper([0.2, 0.4, 0.6, 0.8, 1.0], Progress(budget, lambda: 3))

    _fit(engine, budget, StepLimit(3), keeper)
    assert [fraction for fraction, _ in keeper.snapshots] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert keeper.passed == 4 and keeper.taken_at_step == 3
    resumed = SnapshotKeeper(keeper.fractions, keeper.progress)
    resumed.load_state_dict(keeper.state_dict())
    assert (resumed.passed, resumed.taken_at_step, len(resumed.snapshots)) == (4, 3, 3)
    # A checkpoint from before: one snapshot a cycle end passed.
    resumed.load_state_dict({"snapshots": keeper.state_dict()["snapshots"][:2]})
    assert (resumed.passed, resumed.taken_at_step) == (2, None)


def test_a_cycle_end_a_shrinking_plan_skipped_is_kept_before_the_next_step():
    clock = FakeClock()
    engine = FakeEngine(clock, size=16, batch_size=4)
    budget = WallClockBudget(1000.0, clock=clock)
    plan = {"steps": 10}
    keeper = SnapshotKeeper([0.5, 1.0], Progress(budget, lambda: plan["steps"]))
    keeper._take = lambda run, fraction: keeper.snapshots.append((fraction, budget.steps))

    class ShrinkingPlan(Hook):
        # As the planner does at an epoch end: after step 4 (0.4 of 10), 7 steps are planned
        # (4 of 7 = 0.57): the cycle end at 0.5 is already behind.
        def limit(self, run):
            return (4 if budget.steps < 4 else plan["steps"]) - budget.steps

        def after_execution(self, run, steps, losses):
            if budget.steps == 4:
                plan["steps"] = 7
            if budget.steps >= plan["steps"]:
                run.stop("planned")

    _fit(engine, budget, keeper, ShrinkingPlan())
    # Kept after step 4, as the plan shrank, not after step 5, one step into the next cycle.
    assert keeper.snapshots == [(pytest.approx(4 / 7), 4), (1.0, 7)]


def test_budget_progress_predicts_steps_to_a_fraction():
    clock = FakeClock()
    engine = FakeEngine(clock, size=400, batch_size=4, step_seconds=2.0)
    budget = WallClockBudget(100.0, clock=clock)
    progress = Progress(budget)
    _fit(engine, budget, epochs=1)  # no epoch limit reached: the budget stops at 100 s
    assert progress.fraction() == 1.0
    clock.t = budget.start + 50.0
    assert progress.steps_until(0.6) == 5  # 10 s at 2 s a step


def test_loop_stops_after_epochs_and_by_early_stopping():
    clock = FakeClock()
    engine = FakeEngine(clock)
    budget = WallClockBudget(1000.0, clock=clock)
    run = _fit(engine, budget, epochs=3)
    assert run.stopped_by == "epochs" and budget.steps == 12 and len(budget.history) == 3

    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    stopper = keras.callbacks.EarlyStopping(monitor="loss", patience=1)  # the fake loss never improves
    engine, budget = FakeEngine(clock), WallClockBudget(1000.0, clock=clock)
    run = Training(engine, budget, [budget, KerasCallbacks([stopper], model)]).fit()
    assert run.stopped_by == "early_stopping" and len(budget.history) == 2


def test_the_last_epoch_ended_by_the_execution_that_used_up_the_budget_stops_by_epochs():
    # 3 epochs of 4 steps, 1 s a step: the 12th step starts before the budget's end and ends after it.
    for spans_epochs, budget_seconds in ((False, 11.5), (False, 12.0), (True, 11.5)):
        clock = FakeClock()
        engine = FakeEngine(clock, size=16, batch_size=4, steps_per_execution=6, spans_epochs=spans_epochs)
        budget = WallClockBudget(budget_seconds, clock=clock)
        run = _fit(engine, budget, epochs=3)
        assert budget.steps == 12 and budget.train_seconds() == 12.0, spans_epochs
        assert run.stopped_by == "epochs" and all(row["complete"] for row in budget.history), spans_epochs
    # One step short of the last epoch: cut by the budget.
    clock = FakeClock()
    engine = FakeEngine(clock, size=16, batch_size=4)
    budget = WallClockBudget(10.5, clock=clock)
    run = _fit(engine, budget, epochs=3)
    assert budget.steps == 11 and run.stopped_by == "budget" and not budget.history[-1]["complete"]


def test_a_hook_limit_below_one_is_an_error():
    class Broken(Hook):
        def limit(self, run):
            return 0

    clock = FakeClock()
    engine, budget = FakeEngine(clock), WallClockBudget(10.0, clock=clock)
    with pytest.raises(RuntimeError, match="limited the next execution to 0 steps"):
        _fit(engine, budget, Broken())
    with pytest.raises(ValueError, match="budget must be one of the hooks"):
        Training(engine, budget, [])


def test_step_time_median_is_kept_as_executions_come_and_after_a_resume():
    import statistics

    clock = FakeClock()
    seconds = [5.0, 0.3, 0.1, 0.2, 0.4, 0.25, 0.15]  # the first compiles
    engine = FakeEngine(clock, size=400, batch_size=4, step_seconds=lambda step: seconds[len(engine.executions)],
                        steps_per_execution=1)
    budget = WallClockBudget(100.0, clock=clock)
    engine.start_epoch(0)
    for k in range(len(seconds)):
        budget.execute(engine, 1)
        later = seconds[1:k + 1]
        assert budget.steady_step_seconds() == (pytest.approx(statistics.median(later)) if later else None)
    assert budget.step_seconds() == pytest.approx(0.225) and budget.compile_seconds() == pytest.approx(4.775)
    resumed = WallClockBudget(100.0, clock=clock)
    resumed.load_state_dict(budget.state_dict())
    assert resumed.steady_step_seconds() == pytest.approx(0.225)


class _Events(Hook):
    """Records the loop's epoch events with the engine's position at each."""

    crosses_epochs = True

    def __init__(self):
        self.events = []

    def on_epoch_begin(self, run, epoch):
        self.events.append(("begin", epoch))

    def on_epoch_end(self, run, epoch, logs):
        self.events.append(("end", epoch, run.ending.steps, run.ending.after_steps))


def test_executions_run_past_epoch_ends_when_every_hook_lets_them():
    """Epochs of 4 steps of 1 s, K = 6, a 13 s budget: executions of 1 (compiling),
    then 6 steps across epoch ends; each epoch still ends on the host, in order,
    with its own steps, and its elapsed seconds are where its last step ended."""
    clock = FakeClock()
    engine = FakeEngine(clock, size=16, batch_size=4, steps_per_execution=6, spans_epochs=True)
    budget, events = WallClockBudget(13.0, clock=clock), _Events()
    run = _fit(engine, budget, events)
    assert engine.executions == [1, 6, 6] and run.stopped_by == "budget" and run.epochs_run == 4
    assert events.events == [("begin", 0), ("end", 0, 4, 3), ("begin", 1), ("end", 1, 4, 1), ("begin", 2),
                             ("end", 2, 4, 5), ("begin", 3), ("end", 3, 1, None)]
    assert [row["steps"] for row in budget.history] == [4, 4, 4, 1]
    assert [row["complete"] for row in budget.history] == [True, True, True, False]
    assert [row["elapsed_seconds"] for row in budget.history] == [4.0, 8.0, 12.0, 13.0]


def test_a_hook_that_does_not_cross_epochs_ends_executions_with_their_epoch():
    """A hook without `crosses_epochs` (the default), validation's case, more than one
    fill mode or a Keras callback: executions end at each epoch's end, as before."""
    clock = FakeClock()
    for hooks, budget_kwargs in (([Hook()], {}), ([], {"augmentation": RandomAffine(seed=0),
                                                       "fill_modes": ("wrap", "reflect")}),
                                 ([KerasCallbacks([keras.callbacks.History()], keras.Model())], {})):
        engine = FakeEngine(clock, size=16, batch_size=4, steps_per_execution=6, spans_epochs=True)
        budget = WallClockBudget(13.0, clock=clock, **budget_kwargs)
        _fit(engine, budget, *hooks)
        assert engine.executions == [1, 3, 4, 4, 1], hooks
    engine = FakeEngine(clock, size=16, batch_size=4, steps_per_execution=6, spans_epochs=True)
    _fit(engine, WallClockBudget(13.0, clock=clock, augmentation=RandomAffine(seed=0), fill_modes=("wrap",)))
    assert engine.executions == [1, 6, 6]


def test_executions_across_epochs_stop_after_epochs_and_at_a_planned_step():
    clock = FakeClock()
    engine = FakeEngine(clock, size=16, batch_size=4, steps_per_execution=6, spans_epochs=True)
    budget = WallClockBudget(1000.0, clock=clock)
    run = _fit(engine, budget, epochs=3)
    assert run.stopped_by == "epochs" and engine.executions == [1, 6, 5] and len(budget.history) == 3
    assert all(row["complete"] for row in budget.history) and run.epochs_run == 3
    engine = FakeEngine(clock, size=16, batch_size=4, steps_per_execution=6, spans_epochs=True)
    budget = WallClockBudget(1000.0, clock=clock)
    run = _fit(engine, budget, StepLimit(10))
    assert run.stopped_by == "max_steps" and engine.executions == [1, 6, 3]
    assert [row["steps"] for row in budget.history] == [4, 4, 2]


def test_a_checkpoint_between_an_execution_and_its_epoch_ends_resumes_them_once():
    """The loop's state after an execution that ended two epochs keeps them; a run
    resumed from it ends each of them once, then goes on."""
    clock = FakeClock()
    engine = FakeEngine(clock, size=16, batch_size=4, steps_per_execution=6, spans_epochs=True)
    budget = WallClockBudget(1000.0, clock=clock)
    saved = {}

    class SaveAfterSecondExecution(Hook):
        crosses_epochs = True

        def after_execution(self, run, steps, losses):
            if len(engine.executions) == 3:
                saved.update(state=run.state_dict(), snapshot=engine.snapshot())
                run.stop("interrupted", immediate=True)

    run = _fit(engine, budget, SaveAfterSecondExecution())
    assert run.stopped_at_once and [row["epoch"] for row in budget.history] == [1]
    assert [end["epoch"] for end in saved["state"]["ended_epochs"]] == [1, 2]  # 13 steps: epochs 2 and 3 ended
    engine = FakeEngine(clock, size=16, batch_size=4, steps_per_execution=6, spans_epochs=True)
    budget, events = WallClockBudget(1000.0, clock=clock), _Events()
    budget.load_state_dict(saved["state"]["hooks"]["0:WallClockBudget"])
    hooks = [budget, SaveAfterSecondExecution(), events]
    saved["state"]["hooks"]["2:_Events"] = None
    run = Training(engine, budget, hooks, epochs=5).fit(resume=(saved["snapshot"], saved["state"]))
    assert [row["epoch"] for row in budget.history] == [1, 2, 3, 4, 5]
    assert events.events[:4] == [("end", 1, 4, 1), ("begin", 2), ("end", 2, 4, 5), ("begin", 3)]
    assert engine.executions[0] == 6 and run.stopped_by == "epochs"


def test_the_whitening_bias_freezes_at_its_epoch_start_in_executions_across_epochs():
    """airbench's bias freeze from epoch ceil(1.5) = 2: executions end once at that
    epoch's start, so its first step (the 9th) already runs with the gate closed."""
    from haet.training import FreezeWhiteningBias

    clock = FakeClock()
    engine = FakeEngine(clock, size=16, batch_size=4, steps_per_execution=6, spans_epochs=True)
    layer = type("Whitening", (), {"bias_gate": keras.Variable(1.0, name="bias_gate")})()
    _fit(engine, WallClockBudget(1000.0, clock=clock), FreezeWhiteningBias([layer], 1.5), epochs=4)
    assert engine.executions == [1, 6, 1, 6, 2]
    assert [step.get("bias_gate") for step in engine.steps] == [None] * 8 + [0.0] * 8


def test_the_planner_shares_the_host_time_after_an_execution_among_its_epoch_ends():
    """Executions of up to 64 steps over epochs of 9 (0.01 s a step), 0.05 s of host work
    at each epoch end, a 10 s budget: the host time after each execution is shared by
    the epochs that ended in it, the plan is re-made after the first execution, and the
    planned steps end before the budget (the one-cycle schedule completes)."""
    class HostWork(Hook):
        crosses_epochs = True

        def on_epoch_end(self, run, epoch, logs):
            clock.t += 0.05

    clock = FakeClock()
    engine = FakeEngine(clock, size=36, batch_size=4, step_seconds=0.01, steps_per_execution=64, spans_epochs=True)
    budget = WallClockBudget(10.0, clock=clock)
    planner = StepPlanner(budget, keras.Variable(0.0, name="planned_steps"), engine.steps_per_epoch, probe_steps=20)
    run = Training(engine, budget, [budget, HostWork(), planner]).fit()
    assert max(engine.executions) == 64
    assert planner.epoch_overheads == pytest.approx([0.05] * len(budget.history))
    assert planner.replanned_from == 108 and planner.planned_epochs == 70
    assert run.stopped_by == "planned" and budget.steps == 630 and budget.train_seconds() <= 10.0
