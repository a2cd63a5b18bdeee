"""The one clock that decides what counts toward the budget.

Phases of a run, each measured apart (seconds, `time.perf_counter`):
- setup: loading data, building and compiling (`model.compile`, no tracing) the model;
- train: from the start of the first training step to the end of the last one.
  The budget counts this, tracing and XLA compilation in the first step included;
  `compile` below is the first step's excess over a typical step;
- eval: the final evaluation on the test set (its own compilation included).
"""

import contextlib
import statistics
import time

import keras
import numpy as np
from absl import logging

from haet.augment import FILL_MODES


class PhaseTimer:
    """Accumulates wall-clock seconds per named phase.

    Usage: `with timer.phase("setup"): ...`; `timer.seconds` maps phase -> seconds.
    """

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.seconds = {}

    @contextlib.contextmanager
    def phase(self, name):
        start = self.clock()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + self.clock() - start


class WallClockBudget(keras.callbacks.Callback):
    """Stops training at the first step boundary after `budget_seconds` and drives
    the learning rate, the augmentation strength and the fill mode from the clock.

    The clock starts when the first training step begins, so tracing and XLA
    compilation count toward the budget. Before each step the elapsed fraction of
    the budget is computed on the host; the learning rate and the strength are
    written into the model only when their scheduled value changes (a handful of
    times a run), and the fill mode once per epoch, drawn from `fill_modes` by a
    `np.random.default_rng(seed)`. The values are variables the compiled step
    reads, so nothing recompiles when they change.

    After each epoch (the last one possibly cut short) a row is appended to
    `history` and logged: epoch, steps, elapsed and remaining seconds, learning
    rate, strength, fill mode, loss, accuracy.

    Args:
        budget_seconds: positive float, seconds of training.
        learning_rate: callable fraction -> learning rate (e.g. `PiecewiseConstant`),
            or None when the optimizer has a step-based schedule.
        augmentation: a `haet.augment.RandomAffine` inside the model, or None.
        augmentation_strength: callable fraction -> strength in [0, 1], or None.
        fill_modes: fill modes to draw from each epoch (subset of `FILL_MODES`).
        seed: int seed for the fill-mode draws.
        clock: function returning seconds; `time.perf_counter` unless testing.

    Raises:
        ValueError: a non-positive budget or an unknown fill mode.
    """

    def __init__(
        self,
        budget_seconds,
        learning_rate,
        augmentation=None,
        augmentation_strength=None,
        fill_modes=FILL_MODES,
        seed=0,
        clock=time.perf_counter,
    ):
        super().__init__()
        if not budget_seconds > 0:
            raise ValueError(
                f"budget_seconds must be positive (seconds of training). Received: {budget_seconds!r}"
            )
        unknown = [m for m in fill_modes if m not in FILL_MODES]
        if unknown or not fill_modes:
            raise ValueError(
                f"fill_modes must be a non-empty subset of {FILL_MODES}. Received: {list(fill_modes)}"
            )
        self.budget_seconds = float(budget_seconds)
        self.learning_rate_schedule = learning_rate
        self.augmentation = augmentation
        self.strength_schedule = augmentation_strength
        self.fill_modes = tuple(fill_modes)
        self.rng = np.random.default_rng(seed)
        self.clock = clock
        # Set before training when work before the first step counts toward the
        # budget (precomputed augmentation); else the first step's start.
        self.start = None
        self.end = None
        self.steps = 0
        self.step_seconds = []
        self.history = []
        self._last_step_end = None
        self._epoch_steps = 0
        self._current = {}

    # Reading `self.model` on the JAX backend copies the training state back into
    # the variables (a device sync); `self._model` does not. Use `self.model` only
    # right before writing a variable.
    def _set(self, key, value, write):
        if self._current.get(key) != value:
            self.model  # noqa: B018 -- syncs JAX state so the write below is seen.
            write(value)
            self._current[key] = value

    def _set_learning_rate(self, value):
        self.model.optimizer.learning_rate = value

    def elapsed(self):
        """Seconds since the budget began (0 before)."""
        return 0.0 if self.start is None else self.clock() - self.start

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_steps = 0
        if self.augmentation is not None:
            mode = self.fill_modes[self.rng.integers(len(self.fill_modes))]
            self._set("fill_mode", mode, self.augmentation.set_fill_mode)

    def on_train_batch_begin(self, batch, logs=None):
        now = self.clock()
        if self._last_step_end is None:
            self._last_step_end = now
        if self.start is None:
            self.start = now
        fraction = (now - self.start) / self.budget_seconds
        if self.learning_rate_schedule is not None:
            self._set("learning_rate", self.learning_rate_schedule(fraction), self._set_learning_rate)
        if self.augmentation is not None and self.strength_schedule is not None:
            self._set("strength", self.strength_schedule(fraction), self.augmentation.set_strength)

    def on_train_batch_end(self, batch, logs=None):
        # Keras hands this callback host values (logs pythonified), which waits for
        # the step to finish, so the clock here sees real device time.
        now = self.clock()
        self.step_seconds.append(now - self._last_step_end)
        self._last_step_end = now
        self.end = now
        self.steps += 1
        self._epoch_steps += 1
        if now - self.start >= self.budget_seconds:
            self._model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        elapsed = self.elapsed()
        row = {
            "epoch": epoch + 1,
            "steps": self._epoch_steps,
            "complete": self._epoch_steps == self.params.get("steps"),
            "elapsed_seconds": round(elapsed, 3),
            "remaining_seconds": round(max(0.0, self.budget_seconds - elapsed), 3),
            "learning_rate": (self._current["learning_rate"] if "learning_rate" in self._current
                              else self._optimizer_learning_rate()),
            "augmentation_strength": self._current.get("strength"),
            "fill_mode": self._current.get("fill_mode"),
            "loss": float(logs["loss"]) if logs and "loss" in logs else None,
            "accuracy": float(logs["accuracy"]) if logs and "accuracy" in logs else None,
        }
        # Keras' validation metrics and haet.callbacks.TrainingHealth's summaries.
        row.update({k: float(v) for k, v in sorted((logs or {}).items())
                    if k.startswith(("val_", "health_"))})
        self.history.append(row)
        # Later callbacks (TensorBoard) see the schedules' values among the epoch's logs.
        if logs is not None:
            logs["learning_rate"] = row["learning_rate"]
            if row["augmentation_strength"] is not None:
                logs["augmentation_strength"] = row["augmentation_strength"]
        parts = [f"epoch {row['epoch']}{'' if row['complete'] else ' (cut by budget)'}: "
                 f"{elapsed:.1f} s elapsed, {row['remaining_seconds']:.1f} s left",
                 f"lr {row['learning_rate']:.2e}"]
        if row["augmentation_strength"] is not None:
            parts.append(f"strength {row['augmentation_strength']:g}")
        if row["fill_mode"] is not None:
            parts.append(f"fill {row['fill_mode']}")
        parts += [f"{key} {row[key]:.4f}" for key in ("loss", "accuracy", "val_loss", "val_accuracy")
                  if row.get(key) is not None]
        logging.info(" | ".join(parts))

    def _optimizer_learning_rate(self):
        """The step-based schedule's current value (epoch ends only: reads the state)."""
        return float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

    def train_seconds(self):
        """Seconds from the budget's start to the last step's end."""
        return 0.0 if self.start is None else self.end - self.start

    def compile_seconds(self):
        """The first step's excess over the median later step (tracing + compilation)."""
        if not self.step_seconds:
            return 0.0
        later = self.step_seconds[1:]
        typical = statistics.median(later) if later else 0.0
        return max(0.0, self.step_seconds[0] - typical)


class StepPlanner(keras.callbacks.Callback):
    """Sets the length of a step-based schedule so that it ends with the budget.

    A one-cycle schedule needs its total number of steps in advance; how many fit
    in a wall-clock budget depends on the machine. After the first step (tracing
    and compilation) and `probe_steps` more, the planner takes the median step time
    measured by `budget` (a `WallClockBudget` placed before it in the callback
    list), plans `floor((steps so far + remaining seconds / step time) / steps per
    epoch)` whole epochs (at least 1), writes the planned steps into
    `planned_steps` (the variable the compiled schedule reads), and stops training
    when they are done. The budget still stops training if it runs out first.

    Time spent between epochs (Keras' validation pass, epoch-end callbacks) is
    measured at each epoch end (`epoch_overheads`) and charged to every planned epoch
    but the last. If the plan was made before any epoch ended, it is made once more
    at the first epoch end (`replanned_from` keeps the first plan) when the overhead
    exceeds a step.

    Attributes set when planned: `planned_epochs`, `planned_steps_value`,
    `step_seconds` (the median used), `replanned_from` (None if not re-planned).

    Args:
        budget: the run's `WallClockBudget`.
        planned_steps: the schedule's planned-steps variable
            (`PlannedPiecewiseLinear.attach`).
        steps_per_epoch: training steps per epoch.
        probe_steps: steps timed after the first one before planning (>= 1).

    Raises:
        ValueError: `probe_steps < 1` or `steps_per_epoch < 1`.
    """

    def __init__(self, budget, planned_steps, steps_per_epoch, probe_steps=20):
        super().__init__()
        if probe_steps < 1 or steps_per_epoch < 1:
            raise ValueError(
                f"probe_steps and steps_per_epoch must be >= 1. Received: {probe_steps}, {steps_per_epoch}"
            )
        self.budget = budget
        self.planned_steps = planned_steps
        self.steps_per_epoch = steps_per_epoch
        self.probe_steps = probe_steps
        self.planned_epochs = None
        self.planned_steps_value = None
        self.step_seconds = None
        self.epoch_overheads = []
        self.replanned_from = None
        self._planned_with_overhead = False

    def _plan(self, done):
        """Epochs that fit: each step costs the median step time plus its share of the
        measured per-epoch overhead (validation, epoch-end callbacks); the last epoch's
        overhead falls after the budget's end and is not counted."""
        overhead = statistics.fmean(self.epoch_overheads) if self.epoch_overheads else 0.0
        remaining = self.budget.budget_seconds - self.budget.elapsed()
        per_step = self.step_seconds + overhead / self.steps_per_epoch
        total = done + (remaining + overhead) / per_step
        return max(1, int(total // self.steps_per_epoch)), overhead, remaining

    def _write(self, epochs):
        self.planned_epochs = epochs
        self.planned_steps_value = epochs * self.steps_per_epoch
        self.model  # noqa: B018 -- syncs JAX state so the write below is seen.
        self.planned_steps.assign(float(self.planned_steps_value))

    def on_train_batch_end(self, batch, logs=None):
        done = self.budget.steps
        if self.planned_epochs is None and done >= 1 + self.probe_steps:
            self.step_seconds = statistics.median(self.budget.step_seconds[1:])
            epochs, overhead, remaining = self._plan(done)
            self._write(epochs)
            self._planned_with_overhead = bool(self.epoch_overheads)
            logging.info(
                "planned %d epochs (%d steps) from a median step of %.4f s, %.2f s overhead an "
                "epoch and %.1f s left", self.planned_epochs, self.planned_steps_value,
                self.step_seconds, overhead, remaining,
            )
        if self.planned_steps_value is not None and done >= self.planned_steps_value:
            self._model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        # Keras validates before this call, so the time since the last step is the
        # epoch's overhead outside the training steps.
        if self.budget.end is None:
            return
        self.epoch_overheads.append(max(0.0, self.budget.clock() - self.budget.end))
        if self.planned_epochs is None or self._planned_with_overhead:
            return
        # Planned before any epoch ended: plan once more now that the overhead is known.
        self._planned_with_overhead = True
        epochs, overhead, _ = self._plan(self.budget.steps)
        epochs = max(epochs, epoch + 1)
        if epochs != self.planned_epochs and overhead > self.step_seconds:
            logging.info("re-planned %d -> %d epochs: %.2f s overhead an epoch",
                         self.planned_epochs, epochs, overhead)
            self.replanned_from = self.planned_epochs
            self._write(epochs)
            if self.budget.steps >= self.planned_steps_value:
                self._model.stop_training = True
