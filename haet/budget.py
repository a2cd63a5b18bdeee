"""The one clock that decides what counts toward the budget, and the hooks that spend it.

Phases of a run, each measured apart on one injected clock (seconds,
`time.perf_counter` unless a test passes a fake):
- setup: loading data, building and compiling (`model.compile`, no tracing) the model;
- train: from the start of training to the end of the last training execution.
  The budget counts all of it: precomputed augmentation, the planner's probe, the
  tracing and XLA compilation in the first execution, validation between epochs;
  `compile` below is the first execution's excess over its steps at the typical
  step time;
- eval: the final evaluation (its own compilation included).

Training runs in compiled executions of several steps (`haet.engine`); the host
reads the clock only between them. `WallClockBudget` sizes each execution so that
it ends about where the budget or a wall-clock schedule's value ends (from the
measured step time), and stops training at the first execution boundary after the
budget: the overshoot is at most one execution (`steps_per_execution` steps), and
about one step once the step time is known.
"""

import bisect
import contextlib
import dataclasses
import math
import statistics
import time

import numpy as np
from absl import logging

from haet import optimizers, schedules
from haet.augment import FILL_MODES
from haet.loop import Hook, StepLimit


class PhaseTimer:
    """Accumulates wall-clock seconds per named phase, on one clock.

    Usage: `with timer.phase("setup"): ...`; `timer.seconds` maps phase -> seconds.
    Phases may nest: each second counts toward the innermost open phase only (a
    "precompute" phase inside "setup" is not counted in "setup" too).
    """

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.seconds = {}
        self._open = []  # names of the open phases, innermost last
        self._since = None  # when the innermost phase last started counting

    def _charge(self, now):
        if self._open:
            name = self._open[-1]
            self.seconds[name] = self.seconds.get(name, 0.0) + now - self._since
        self._since = now

    @contextlib.contextmanager
    def phase(self, name):
        self._charge(self.clock())
        self._open.append(name)
        self.seconds.setdefault(name, 0.0)
        try:
            yield
        finally:
            self._charge(self.clock())
            self._open.pop()


@dataclasses.dataclass(frozen=True)
class Execution:
    """One compiled execution: its steps, its seconds (dispatch to results on the
    host), whether it was a discarded probe, and whether it was the first of its
    process (which traces and compiles: a resumed run compiles again)."""

    steps: int
    seconds: float
    probe: bool = False
    first: bool = False


class WallClockBudget(Hook):
    """Stops training at the first execution boundary after `budget_seconds` and drives
    the wall-clock schedules: learning rate, augmentation strength, fill mode.

    The clock starts when training starts (`begin`, or earlier for work that counts,
    such as precomputed augmentation), so compilation counts toward the budget.
    Before each execution the elapsed fraction of the budget is computed on the host;
    the learning rate and the strength are written into the variables the compiled
    step reads when their scheduled value changes, and the fill mode once per epoch,
    drawn from `fill_modes` by `np.random.default_rng(seed)`. Nothing recompiles.

    Each execution is limited (`limit`) to the steps that start before the budget's
    end or the next change of a schedule, from the measured step time (one step while
    none is measured), so values change on time and the run ends about one step
    after its budget.

    After each epoch (the last possibly cut short) a row is appended to `history`
    and logged: epoch, steps, elapsed and remaining seconds, learning rate, strength,
    fill mode, loss, accuracy, and any `val_*` / `health_*` logs. An epoch that ended
    inside an execution (`haet.loop`: executions across epoch ends) has its elapsed
    seconds interpolated by steps within that execution (the host sees the device
    only at an execution's end). With more than one fill mode the executions end
    with their epoch (a mode is drawn at each epoch start).

    Args:
        budget_seconds: positive float, seconds of training (`math.inf`: no budget).
        learning_rate: schedule of unit "budget" (fraction -> learning rate, with
            `next_change`), or None when the optimizer has a step-based schedule.
        augmentation: a `haet.augment.RandomAffine` inside the model, or None.
        augmentation_strength: schedule fraction -> strength in [0, 1], or None.
        fill_modes: fill modes to draw from each epoch (subset of `FILL_MODES`).
        seed: int seed for the fill-mode draws.
        clock: function returning seconds; `time.perf_counter` unless testing.

    Raises:
        ValueError: a non-positive budget or an unknown fill mode.
    """

    def __init__(self, budget_seconds, learning_rate=None, augmentation=None, augmentation_strength=None,
                 fill_modes=FILL_MODES, seed=0, clock=time.perf_counter):
        if not budget_seconds > 0:
            raise ValueError(
                f"budget_seconds must be positive (seconds of training). Received: {budget_seconds!r}")
        unknown = [m for m in fill_modes if m not in FILL_MODES]
        if unknown or not fill_modes:
            raise ValueError(f"fill_modes must be a non-empty subset of {FILL_MODES}. Received: {list(fill_modes)}")
        self.budget_seconds = float(budget_seconds)
        self.learning_rate_schedule = learning_rate
        self.augmentation = augmentation
        self.strength_schedule = augmentation_strength if augmentation is not None else None
        self.fill_modes = tuple(fill_modes)
        self.rng = np.random.default_rng(seed)
        self.clock = clock
        self.start = None
        self.end = None
        self.steps = 0
        self.executions = []
        self.history = []
        self.paused_seconds = 0.0
        self._current = {}
        self._targets = []
        self._now = None
        self._compiled = False
        self._resumed = False
        self._step_times = []  # seconds per step of each execution that did not compile, sorted
        # A progress line every this many seconds of training (None: off); epoch
        # lines come on top. Budgets of minutes get one every 5% of the budget.
        self.progress_every = None if math.isinf(self.budget_seconds) else max(10.0, self.budget_seconds / 20)
        self._next_progress = self.progress_every or 0.0

    def begin(self):
        """Starts the budget's clock (no effect once started)."""
        if self.start is None:
            self.start = self.clock()

    def elapsed(self):
        """Seconds since the budget began (0 before)."""
        return 0.0 if self.start is None else self.clock() - self.start

    def execute(self, engine, steps, probe=False):
        """Runs `steps` steps on `engine` as one execution, timed; probe steps are not
        counted in `steps`. Returns the engine's per-step losses."""
        self.begin()
        start = self.clock()
        losses = engine.run(steps)
        self.end = self.clock()
        self.executions.append(Execution(steps, self.end - start, probe, first=not self._compiled))
        if self._compiled:
            bisect.insort(self._step_times, (self.end - start) / steps)
        self._compiled = True
        if not probe:
            self.steps += steps
        return losses

    @contextlib.contextmanager
    def pause(self):
        """Work inside the block (writing a checkpoint) does not count toward the
        budget: its seconds are added to `paused_seconds` and the clock's start
        moves forward by them."""
        started = self.clock()
        try:
            yield
        finally:
            seconds = self.clock() - started
            self.paused_seconds += seconds
            if self.start is not None:
                self.start += seconds
            if self.end is not None:
                self.end += seconds

    def steady_step_seconds(self):
        """The median seconds per step over executions that did not compile, or None.

        Read before every execution: the per-step times are kept sorted as they come
        (`_step_times`), so this costs no pass over thousands of executions."""
        times = self._step_times
        if not times:
            return None
        middle = len(times) // 2
        return times[middle] if len(times) % 2 else (times[middle - 1] + times[middle]) / 2

    def typical_execution_seconds(self):
        """The median seconds of a kept execution after each process's first, or None."""
        later = [e.seconds for e in self.executions if not (e.first or e.probe)]
        return statistics.median(later) if later else None

    def state_dict(self):
        """What a checkpoint keeps of the budget (JSON data): the elapsed budget, the
        steps, executions and history so far, the schedules' current values and the
        fill-mode generator."""
        return {"elapsed": self.elapsed(), "end": None if self.end is None else self.end - self.start,
                "steps": self.steps, "executions": [dataclasses.asdict(e) for e in self.executions],
                "history": self.history, "paused_seconds": self.paused_seconds,
                "current": self._current, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state):
        """Continues from `state_dict()`: the budget's clock goes on from the elapsed
        seconds it saved (the remaining budget only)."""
        # Work this process already charged to the budget (precomputed augmentation) counts on top.
        already = self.elapsed()
        self.start = self.clock() - state["elapsed"] - already
        self.end = None if state["end"] is None else self.start + state["end"]
        self.steps = state["steps"]
        self.executions = [Execution(**e) for e in state["executions"]]
        self._step_times = sorted(e.seconds / e.steps for e in self.executions if not e.first)
        self.history = [dict(row) for row in state["history"]]
        self.paused_seconds = state["paused_seconds"]
        self._current = dict(state["current"])
        self.rng.bit_generator.state = state["rng"]
        self._resumed = True

    def step_seconds(self):
        """The typical seconds per step: the median over executions that did not
        compile (each process's first does); the first's per-step time while there is
        no other; None before any."""
        if not self.executions:
            return None
        steady = self.steady_step_seconds()
        if steady is not None:
            return steady
        return self.executions[-1].seconds / self.executions[-1].steps

    def steps_within(self, seconds):
        """How many steps start within `seconds` from now (>= 1), at `step_seconds()`;
        one while no step is timed, None for an unbounded time."""
        if math.isinf(seconds):
            return None
        per_step = self.step_seconds()
        if per_step is None or per_step <= 0:
            return 1
        return max(1, math.ceil(seconds / per_step - 1e-9))

    # Hook methods, called by `haet.loop.Training`.
    def on_train_begin(self, run):
        self.begin()
        if self._resumed and self.elapsed() >= self.budget_seconds:
            # Interrupted once the budget was spent (by the execution that spent it): nothing
            # is left to train. A resume ran one more execution, compiled, past the budget.
            run.stop("budget")
        if self.learning_rate_schedule is not None:
            self._targets.append(("learning_rate", self.learning_rate_schedule,
                                  optimizers.learning_rate_variable(run.engine.model.optimizer)))
        if self.strength_schedule is not None:
            self._targets.append(("strength", self.strength_schedule, self.augmentation.strength))

    @property
    def crosses_epochs(self):
        # A fill mode drawn per epoch must be written before the epoch's first step.
        return self.augmentation is None or len(self.fill_modes) == 1

    def on_epoch_begin(self, run, epoch):
        if self.augmentation is not None:
            mode = self.fill_modes[self.rng.integers(len(self.fill_modes))]
            self._write(run, "fill_mode", mode, self.augmentation.fill_mode_index, FILL_MODES.index(mode))

    def _write(self, run, key, value, variable, stored=None):
        if self._current.get(key) != value:
            run.engine.assign(variable, value if stored is None else stored)
            self._current[key] = value

    def before_execution(self, run):
        self._now = self.clock() - self.start
        fraction = self._now / self.budget_seconds
        for key, schedule, variable in self._targets:
            self._write(run, key, schedule(fraction), variable)

    def limit(self, run):
        # Steps that start before the budget's end or the next change of a schedule.
        fraction = self._now / self.budget_seconds
        seconds = self.budget_seconds - self._now
        for _, schedule, _ in self._targets:
            change = schedule.next_change(fraction)
            if change is not None:
                seconds = min(seconds, change * self.budget_seconds - self._now)
        return self.steps_within(seconds)

    def after_execution(self, run, steps, losses):
        elapsed = self.end - self.start
        if elapsed >= self.budget_seconds:
            run.stop("budget")
        last = self.executions[-1]
        if last.first and last.seconds > self.budget_seconds / 4:
            logging.warning(
                "the first execution (tracing and XLA compilation) took %.1f s, more than a quarter of the %g s "
                "budget%s", last.seconds, self.budget_seconds,
                ": the run is over its budget and the report will keep it apart" if elapsed > self.budget_seconds
                else "; a longer budget buys more training per compiled second")
        if self.progress_every and elapsed >= self._next_progress:
            self._next_progress = elapsed + self.progress_every
            engine = run.engine
            rate = self.steps / max(elapsed, 1e-9)
            logging.info("%3.0f%% of the %g s budget: %.0f s elapsed, %.0f s left | epoch %d, step %d/%d | "
                         "%.1f steps/s | lr %.2e | loss %.4f", 100 * min(1.0, elapsed / self.budget_seconds),
                         self.budget_seconds, elapsed, max(0.0, self.budget_seconds - elapsed),
                         (engine.epoch or 0) + 1, engine.step_in_epoch, engine.steps_per_epoch, rate,
                         self._current.get("learning_rate", engine.learning_rate or 0.0), float(losses[-1]))

    def _epoch_end_seconds(self, end):
        """Seconds of the budget at the end of epoch `end` (a `haet.engine.EpochEnd`):
        now, or for an epoch that ended inside the last execution, that execution's
        end less the share of its seconds of the steps after the epoch's."""
        last = self.executions[-1] if self.executions else None
        if end is None or end.after_steps is None or last is None or end.after_steps >= last.steps:
            return self.elapsed()
        return self.end - self.start - last.seconds * (last.steps - end.after_steps) / last.steps

    def on_epoch_end(self, run, epoch, logs):
        end = run.ending
        elapsed = self._epoch_end_seconds(end)
        steps = end.steps if end is not None else run.engine.step_in_epoch
        row = {
            "epoch": epoch + 1,
            "steps": steps,
            "complete": steps == run.engine.steps_per_epoch,
            "elapsed_seconds": round(elapsed, 3),
            "remaining_seconds": round(max(0.0, self.budget_seconds - elapsed), 3),
            "learning_rate": (self._current["learning_rate"] if "learning_rate" in self._current
                              else end.learning_rate if end is not None else run.engine.learning_rate),
            "augmentation_strength": self._current.get("strength"),
            "fill_mode": self._current.get("fill_mode"),
            "loss": logs.get("loss"),
            "accuracy": logs.get("accuracy"),
        }
        row.update({k: float(v) for k, v in sorted(logs.items()) if k.startswith(("val_", "health_"))})
        self.history.append(row)
        # Later hooks (TensorBoard) see the schedules' values among the epoch's logs.
        logs["learning_rate"] = row["learning_rate"]
        if row["augmentation_strength"] is not None:
            logs["augmentation_strength"] = row["augmentation_strength"]
        parts = [f"epoch {row['epoch']}{'' if row['complete'] else ' (cut short)'}: "
                 f"{elapsed:.1f} s elapsed, {row['remaining_seconds']:.1f} s left",
                 f"lr {row['learning_rate']:.2e}"]
        if row["augmentation_strength"] is not None:
            parts.append(f"strength {row['augmentation_strength']:g}")
        if row["fill_mode"] is not None:
            parts.append(f"fill {row['fill_mode']}")
        parts += [f"{key} {row[key]:.4f}" for key in ("loss", "accuracy", "val_loss", "val_accuracy")
                  if row.get(key) is not None]
        logging.info(" | ".join(parts))

    def train_seconds(self):
        """Seconds from the budget's start to the last execution's end."""
        return 0.0 if self.start is None or self.end is None else self.end - self.start

    def between_executions_seconds(self):
        """Seconds of training time with no execution running: from the budget's start
        to the last execution's end, less every execution's seconds (host work between
        executions: precomputed augmentation, epoch ends, hooks, validation; checkpoint
        writing is paused out). On an accelerator the device has nothing to run then."""
        return max(0.0, self.train_seconds() - sum(e.seconds for e in self.executions))

    def compile_seconds(self):
        """The excess of each process's first execution over its steps at the typical
        step time (tracing and compilation; a resumed run compiles again)."""
        typical = self.steady_step_seconds() or 0.0
        return sum(max(0.0, e.seconds - e.steps * typical) for e in self.executions if e.first)

    def probe_steps(self):
        return sum(e.steps for e in self.executions if e.probe)


class StepPlanner(StepLimit):
    """Sets the length of a step-based schedule so that it ends with the budget.

    A one-cycle schedule needs its total number of steps in advance; how many fit in
    a wall-clock budget depends on the machine. Before training, the planner copies
    the training state, runs one step (tracing and compilation) and `probe_steps`
    more on the real data, timed, then puts the state back: no step that is kept ran
    on a schedule of unknown length. From the mean step time it plans
    `floor(remaining seconds / step time / steps per epoch)` whole epochs, writes the
    planned steps into `planned_steps` (the variable the compiled schedule reads) and
    stops training when they are done. When not one epoch fits, it plans the steps
    that do (at least one; `planned_epochs` 1) and warns: the schedule runs its
    course within the first epoch (a whole epoch, cut by the budget, ended with the
    learning rate near its peak). The budget counts the probe and still stops
    training if it runs out first.

    Time spent between epochs (validation, epoch-end hooks) is measured at each epoch
    end (`epoch_overheads`; when an execution ran past epoch ends, the host time
    after it is shared by the epochs that ended in it) and charged to every planned
    epoch but the last; at the first epoch end the plan is made once more with it
    when the overhead exceeds a step.

    Steps may slow down after the probe (a shared or throttled machine: on a 2-core
    CPU 0.32 s an epoch at the start of a 30 s run and 0.40 s at its end); a plan from
    the probe's pace is then cut by the budget before its schedule has decayed. At
    each later epoch end (the last of those an execution ended) the planner projects
    the plan's end from the recent pace: the median seconds per step of the latest
    kept executions that did not compile (weighted by their steps), covering the
    last `pace_window` of the kept steps (at least 5 executions, at most 256),
    plus the measured time between epochs. When the plan would end past the budget
    by more than an epoch and more than 5% of the seconds left, it plans the epochs
    that fit at that pace (at least those already ended). The check starts at the
    second epoch end, once 5 executions are timed, and runs at the last epoch end
    of each execution until the run stops. A slowdown over more than half the
    window's steps is taken as the new pace; a shorter one is not, but the time it
    lost is counted (the seconds left). The plan only shrinks: a schedule already
    decaying is not stretched again, and a probe slower than the later steps is not
    corrected. Each re-plan is kept in `replans` (reason "pace": the steps and the
    time between epochs measured since the plan).

    With `plan_offset` (the schedule's plan-offset variable, `haet.schedules`), a
    re-plan also sets the offset so that the schedule's fraction of the plan done
    stays where it was and reaches 1 at the new plan's end (the learning rate goes
    on from where it is, over the steps left); without it the fraction jumps to the
    new plan's position (`step / new planned steps`). The step the schedule is at is
    read from `step` (the optimizer's iteration count) when given: under
    mixed_float16 the loss-scale optimizer skips the steps whose gradients
    overflowed, so it can lag the steps the budget counts.

    Attributes set when planned: `planned_epochs`, `planned_steps_value`,
    `plan_offset_value` (0 until a re-plan with `plan_offset`),
    `step_seconds` (the probe's mean), `replanned_from` (the first plan, None if
    never re-planned), `replans` (one dict per re-plan: `epoch` (1-based, the epoch
    after which it was made), `from_epochs`, `to_epochs`, `reason` ("overhead" or
    "pace"), `step_seconds` and `overhead_seconds` it planned with, `remaining_seconds`,
    and with `plan_offset` the offset it set).

    Args:
        budget: the run's `WallClockBudget`.
        planned_steps: the schedule's planned-steps variable (`attach`).
        steps_per_epoch: training steps per epoch.
        probe_steps: steps timed after the first one before planning (>= 1).
        pace_window: fraction in [0, 1] of the kept steps whose executions give
            the recent pace; 0: no re-plan for pace.
        plan_offset: the schedule's plan-offset variable, or None.
        step: the variable the schedule counts steps with (the optimizer's
            `iterations`), or None (the budget's kept steps).

    Raises:
        ValueError: `probe_steps < 1`, `steps_per_epoch < 1` or `pace_window`
            outside [0, 1].
    """

    def __init__(self, budget, planned_steps, steps_per_epoch, probe_steps=20, pace_window=0.25, plan_offset=None,
                 step=None):
        if probe_steps < 1 or steps_per_epoch < 1:
            raise ValueError(
                f"probe_steps and steps_per_epoch must be >= 1. Received: {probe_steps}, {steps_per_epoch}")
        if not 0 <= pace_window <= 1:
            raise ValueError(f"pace_window must be in [0, 1] (a fraction of the steps done; 0: off). "
                             f"Received: {pace_window!r}")
        self.budget = budget
        self.planned_steps = planned_steps
        self.steps_per_epoch = steps_per_epoch
        self.probe_steps = probe_steps
        self.pace_window = pace_window
        self.plan_offset = plan_offset
        self.plan_offset_value = 0.0
        self.step = step
        super().__init__(None)
        self.planned_epochs = None
        self.step_seconds = None
        self.epoch_overheads = []
        self.replans = []
        self._planned_with_overhead = False
        self._ending = 0  # epochs ended since the last execution, before the last of them

    _STATE = ("planned_epochs", "planned_steps_value", "step_seconds", "epoch_overheads", "replans",
              "_planned_with_overhead", "plan_offset_value")

    def state_dict(self):
        return {name: getattr(self, name) for name in self._STATE}

    def load_state_dict(self, state):
        """A resumed run keeps its plan (the planned-steps variable is restored with
        the optimizer): no probe runs again."""
        if "replans" not in state:  # a checkpoint from before re-plans were listed: at most the overhead one
            first = state["replanned_from"]
            state = dict(state, replans=[] if first is None else [
                {"epoch": 1, "from_epochs": first, "to_epochs": state["planned_epochs"], "reason": "overhead"}])
        state = {"plan_offset_value": 0.0, **state}  # a checkpoint from before plans had an offset
        for name in self._STATE:
            setattr(self, name, state[name])

    @property
    def replanned_from(self):
        """The first plan's epochs, None if never re-planned."""
        return self.replans[0]["from_epochs"] if self.replans else None

    def on_train_begin(self, run):
        engine, budget = run.engine, self.budget
        budget.begin()
        super().on_train_begin(run)  # resumed with every planned step done: complete
        if self.planned_epochs is not None or run.stopped_by is not None:  # resumed, or stopped before training
            return
        snapshot = engine.snapshot()
        try:
            engine.start_epoch(0)
            budget.execute(engine, 1, probe=True)
            timed_steps, timed_seconds = 0, 0.0
            while (timed_steps < self.probe_steps and budget.elapsed() < budget.budget_seconds
                   and run.stopped_by is None):
                if not engine.steps_left_in_epoch:
                    engine.start_epoch(engine.epoch + 1)
                steps = min(engine.steps_per_execution, engine.steps_left_in_epoch, self.probe_steps - timed_steps)
                budget.execute(engine, steps, probe=True)
                timed_steps += steps
                timed_seconds += budget.executions[-1].seconds
        finally:  # (a second stop signal too: the model is left without the probe's steps)
            engine.restore(snapshot)
        if run.stopped_by is not None:  # a stop signal during the probe: nothing to plan
            return
        if timed_seconds > 0.25 * budget.budget_seconds:
            # Its steps are undone: time the budget does not train in (a slow machine, or a large probe).
            logging.warning("the planner's probe timed %d steps in %.1f s, more than a quarter of the %g s budget, "
                            "and undid them: fewer probe steps leave more of the budget to training (haet.fit's "
                            "probe_steps, --planner_probe_steps)", timed_steps, timed_seconds, budget.budget_seconds)
        # Past the budget already (a compilation longer than it): one step.
        self.step_seconds = timed_seconds / timed_steps if timed_steps else budget.executions[0].seconds
        epochs, overhead, remaining, fitting = self._plan(0)
        if fitting < self.steps_per_epoch:
            # Not one epoch fits: the schedule runs its course over the steps that do (at
            # least one), rather than over an epoch that the budget cuts before its
            # schedule decays (the first epoch's end is then the run's: no re-plan).
            steps = max(1, int(fitting))
            self._write(run, 1, steps)
            left = (f"the {remaining:.1f} s left at {self.step_seconds:.4f} s a step" if remaining > 0 else
                    f"the budget, which the probe used up ({-remaining:.1f} s over)")
            logging.warning("one epoch (%d steps) does not fit %s: planned %d steps (%.0f%% of an epoch, each image "
                            "seen at most once), over which the schedule runs its course; a longer budget, or fewer "
                            "training images, trains on every image", self.steps_per_epoch, left, steps,
                            100 * steps / self.steps_per_epoch)
            return
        self._write(run, epochs)
        logging.info("planned %d epochs (%d steps) from a mean step of %.4f s over %d probe steps and %.1f s "
                     "left", self.planned_epochs, self.planned_steps_value, self.step_seconds, timed_steps, remaining)

    def _fitting_steps(self, done, step_seconds):
        """Steps that fit in the budget (a float) after `done` steps, at `step_seconds`
        a step plus its share of the measured per-epoch overhead (validation,
        epoch-end hooks; the last epoch's falls after the budget's end and is not
        counted). Returns (steps, seconds a step with its share of the overhead,
        overhead seconds an epoch, remaining seconds)."""
        overhead = statistics.fmean(self.epoch_overheads) if self.epoch_overheads else 0.0
        remaining = self.budget.budget_seconds - self.budget.elapsed()
        per_step = step_seconds + overhead / self.steps_per_epoch
        return done + (remaining + overhead) / per_step, per_step, overhead, remaining

    def _plan(self, done):
        """Whole epochs that fit at the probe's step time (at least 1); returns (epochs,
        overhead seconds an epoch, remaining seconds, steps that fit: a float)."""
        total, _, overhead, remaining = self._fitting_steps(done, self.step_seconds)
        return max(1, int(total // self.steps_per_epoch)), overhead, remaining, total

    _PACE_EXECUTIONS = (5, 256)  # fewest and most executions the recent pace is taken from
    _PACE_TOLERANCE = 0.05  # of the seconds left: how far past the budget a plan may end before it shrinks

    def _recent_step_seconds(self):
        """The median seconds per step of the latest kept executions that did not
        compile, each weighted by its steps (a 1-step execution, e.g. a training-health
        sample, weighs 1/50 of a 50-step one: its fixed dispatch cost is not taken for
        the pace), covering the last `pace_window` of the kept steps (at least 5
        executions, at most 256), or None with fewer than 5."""
        fewest, most = self._PACE_EXECUTIONS
        window = self.pace_window * self.budget.steps
        timed, steps = [], 0
        for execution in reversed(self.budget.executions):
            if execution.probe or len(timed) == most or (steps >= window and len(timed) >= fewest):
                break
            steps += execution.steps
            if not execution.first:
                timed.append((execution.seconds / execution.steps, execution.steps))
        if len(timed) < fewest:
            return None
        timed.sort()
        half, weight = sum(n for _, n in timed) / 2, 0
        for seconds, n in timed:
            weight += n
            if weight >= half:
                return seconds

    def _replan(self, run, epoch, epochs, reason, step_seconds, overhead, remaining):
        logging.info("re-planned %d -> %d epochs after epoch %d (%s: %.4f s a step, %.2f s between epochs, "
                     "%.1f s left)", self.planned_epochs, epochs, epoch + 1, reason, step_seconds, overhead,
                     remaining)
        self.replans.append({"epoch": epoch + 1, "from_epochs": self.planned_epochs, "to_epochs": epochs,
                             "reason": reason, "step_seconds": step_seconds, "overhead_seconds": overhead,
                             "remaining_seconds": remaining})
        self._write(run, epochs)
        if self.plan_offset is not None:
            self.replans[-1]["plan_offset"] = self.plan_offset_value
        if self.budget.steps >= self.planned_steps_value:
            run.stop("planned")

    def _follow_pace(self, run, epoch):
        """Plans fewer epochs when, at the recent pace, the plan would end past the
        budget by more than an epoch and more than 5% of the seconds left (the
        median of a few noisy executions is a few percent off: a plan that fits is
        not shrunk for that, and a lasting slowdown passes the bound as the window
        fills or the seconds left shrink)."""
        recent = self._recent_step_seconds() if self.pace_window else None
        if recent is None:
            return
        fitting, per_step, overhead, remaining = self._fitting_steps(self.budget.steps, recent)
        tolerance = max(self.steps_per_epoch * per_step, self._PACE_TOLERANCE * remaining)
        if (self.planned_steps_value - fitting) * per_step <= tolerance:
            return
        epochs = max(int(fitting // self.steps_per_epoch), epoch + 1)
        if epochs < self.planned_epochs:
            self._replan(run, epoch, epochs, "pace", recent, overhead, remaining)

    def _write(self, run, epochs, steps=None):
        """Plans `epochs` epochs: their steps, or `steps` (fewer than an epoch's)."""
        steps = epochs * self.steps_per_epoch if steps is None else steps
        if self.plan_offset is not None:
            # The first plan starts at 0; a re-plan keeps the fraction done where it is.
            if self.planned_steps_value is None:
                self.plan_offset_value = 0.0
            else:
                now = self.budget.steps if self.step is None else float(run.engine.read(self.step))
                self.plan_offset_value = schedules.replanned_offset(now, self.planned_steps_value,
                                                                    self.plan_offset_value, steps)
            run.engine.assign(self.plan_offset, self.plan_offset_value)
        self.planned_epochs = epochs
        self.planned_steps_value = steps
        run.engine.assign(self.planned_steps, float(steps))

    reason = "planned"

    @property
    def planned_steps_value(self):
        """The planned number of steps (the `StepLimit`), None before planning."""
        return self.max_steps

    @planned_steps_value.setter
    def planned_steps_value(self, value):
        self.max_steps = value

    def on_epoch_end(self, run, epoch, logs):
        # Runs after the other epoch-end hooks: the time since the last execution is the
        # overhead outside the training steps of the epochs that ended after it (several
        # when it ran past epoch ends: measured at the last of them, shared equally).
        if self.budget.end is None:
            return
        self._ending += 1
        if not run.ending_last:
            return
        epochs, self._ending = self._ending, 0
        self.epoch_overheads += [max(0.0, self.budget.clock() - self.budget.end) / epochs] * epochs
        if run.stopped_by is not None:  # the run's last epoch end: nothing is left to plan
            return
        if self._planned_with_overhead:
            self._follow_pace(run, epoch)
            return
        self._planned_with_overhead = True
        epochs, overhead, remaining, _ = self._plan(self.budget.steps)
        epochs = max(epochs, epoch + 1)
        if epochs != self.planned_epochs and overhead > self.step_seconds:
            self._replan(run, epoch, epochs, "overhead", self.step_seconds, overhead, remaining)


class Progress:
    """How far a run is, as a fraction of the planned steps (step-based schedules) or
    of the budget, and how many steps remain before a given fraction.

    Args:
        budget: the run's `WallClockBudget`.
        planned_steps: None (budget fraction), or a function returning the planned
            number of steps (None until planned).
        plan_offset: None, or a function returning the plan's offset (the fraction
            is `(steps + offset) / (planned + offset)`, as the schedule's:
            `haet.schedules.plan_fraction_value`).
    """

    def __init__(self, budget, planned_steps=None, plan_offset=None):
        self.budget = budget
        self.planned_steps = planned_steps
        self.plan_offset = plan_offset

    def _offset(self):
        return self.plan_offset() if self.plan_offset is not None else 0.0

    def fraction(self):
        if self.planned_steps is None:
            return min(1.0, self.budget.elapsed() / self.budget.budget_seconds)
        planned = self.planned_steps()
        if not planned:
            return 0.0
        return min(1.0, schedules.plan_fraction_value(self.budget.steps, planned, self._offset()))

    def steps_until(self, fraction):
        """Steps to run before the run reaches `fraction` (>= 1), or None if unknown."""
        if self.planned_steps is None:
            return self.budget.steps_within(fraction * self.budget.budget_seconds - self.budget.elapsed())
        planned = self.planned_steps()
        if not planned:
            return None
        offset = self._offset()
        return max(1, math.ceil(fraction * max(planned + offset, 1.0) - offset - 1e-9) - self.budget.steps)
