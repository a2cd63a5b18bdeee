"""The host side of training: epochs of compiled executions, and the hooks between them.

`Training.fit()` runs epochs of `haet.engine` executions. Between executions (never
inside one) the hooks decide: each may write values into the state the step reads
(`before_execution`), cap the next execution's length (`limit`), look at its
per-step losses and stop the run (`after_execution`), and act at epoch ends. The
budget (`haet.budget.WallClockBudget`) is one such hook and times every execution.

Keras callbacks work at epoch granularity through `KerasCallbacks`
(`EarlyStopping`, `TensorBoard`...); nothing runs per step on the host.

Where the engine may (`spans_epochs`) and every hook lets it
(`Hook.crosses_epochs`), an execution runs on past epoch ends: the epochs that ended
in it get their `on_epoch_end` (with their own logs) and the next one its
`on_epoch_begin` after the execution, one after the other. A hook that must act at
an epoch's very end or start (validation, Keras callbacks, a per-epoch draw) says
`crosses_epochs = False`, or caps the executions where it needs to (`limit`).
"""

import dataclasses

import keras

from haet.engine import EpochEnd


class Hook:
    """Something a run does between compiled executions. Every method is optional.

    `run` is the `Training`: `run.engine`, `run.budget`, `run.stop(reason)`, and
    during `on_epoch_end` `run.ending` (a `haet.engine.EpochEnd`: the epoch's steps,
    and where in the last execution it ended). Order within a step of the loop is
    the order of the hooks list.

    `crosses_epochs`: whether executions may run past epoch ends with this hook on
    (its `on_epoch_end` and the next `on_epoch_begin` then come after the execution,
    and the state it sees is the execution's end). False unless a hook says so: a
    hook written for executions that end with their epoch keeps working.
    """

    crosses_epochs = False

    def on_train_begin(self, run):
        """Before the first execution (the state is in the model's variables)."""

    def on_epoch_begin(self, run, epoch):
        """After the engine started epoch `epoch` (0-based)."""

    def before_execution(self, run):
        """Before each execution: write values the step reads (`run.engine.assign`)."""

    def limit(self, run):
        """The most steps the next execution may run (>= 1), or None for no limit."""
        return None

    def after_execution(self, run, steps, losses):
        """After each execution of `steps` steps; `losses` is the running mean of the
        training loss since its epoch's start after each of them (float32
        `(steps,)`; `run.engine.step_epochs` / `step_positions` say each step's epoch
        and 1-based position in it)."""

    def on_epoch_end(self, run, epoch, logs):
        """At the end of an epoch (complete or cut short), the state synced into the
        model's variables; `logs` (loss, accuracy, val_*...) may be extended."""

    def before_train_end(self, run):
        """Training stopped and its epochs ended (the state synced into the model's
        variables), before any hook's `on_train_end` (which may change the model:
        averaged weights, best weights). Not called when a run stops at once, nor in a
        run resumed from a checkpoint written here (its training had ended:
        `Training.ended`)."""

    def on_train_end(self, run):
        """After the last epoch, the state synced into the model's variables (not
        called when a run stops at once: interrupted or diverged)."""

    def state_dict(self):
        """What a checkpoint must keep of this hook to resume the run (JSON data and
        NumPy arrays), or None."""
        return None

    def load_state_dict(self, state):
        """Puts back a `state_dict()` before a resumed run's `on_train_begin`."""


class StepLimit(Hook):
    """Stops the run (`reason`) once the budget counts `max_steps` kept steps, and caps
    each execution so that none runs past them. `max_steps` may change while the run
    goes (a planner sets it); None: no limit yet. When the budget ran out after the
    same execution, the run still stopped for `reason`: all its steps were done."""

    reason = "max_steps"
    crosses_epochs = True

    def __init__(self, max_steps=None):
        self.max_steps = max_steps

    def on_train_begin(self, run):
        # Resumed with every step done (interrupted in the execution that did the last):
        # the run is complete. It asked the engine for an execution of 0 steps.
        if self.max_steps is not None and run.budget.steps >= self.max_steps:
            run.stop(self.reason, completed=True)

    def limit(self, run):
        return None if self.max_steps is None else self.max_steps - run.budget.steps

    def after_execution(self, run, steps, losses):
        if self.max_steps is not None and run.budget.steps >= self.max_steps:
            run.stop(self.reason, completed=True)


class KerasCallbacks(Hook):
    """Keras callbacks at epoch granularity: `on_train_begin`, `on_epoch_begin`,
    `on_epoch_end` (with the epoch's logs) and `on_train_end`; no batch hooks are
    called. A callback that sets `model.stop_training` (`EarlyStopping`) stops the
    run ("early_stopping")."""

    # What a checkpoint keeps of `keras.callbacks.EarlyStopping` (reset by its
    # on_train_begin, so put back after it).
    _EARLY_STOPPING = ("wait", "stopped_epoch", "best", "best_weights", "best_epoch")

    def __init__(self, callbacks, model, epochs=None):
        self.model = model
        self.callbacks = keras.callbacks.CallbackList(list(callbacks), model=model, add_history=False,
                                                      add_progbar=False, epochs=epochs)
        self._resumed = None

    def state_dict(self):
        return [{name: getattr(c, name) for name in self._EARLY_STOPPING}
                if isinstance(c, keras.callbacks.EarlyStopping) else None for c in self.callbacks.callbacks]

    def load_state_dict(self, state):
        self._resumed = state

    @property
    def crosses_epochs(self):
        # Callbacks see the model at each epoch's end.
        return not self.callbacks.callbacks

    def on_train_begin(self, run):
        self.model.stop_training = False
        self.callbacks.on_train_begin()
        if self._resumed is not None:
            for callback, values in zip(self.callbacks.callbacks, self._resumed):
                for name, value in (values or {}).items():
                    setattr(callback, name, list(value) if name == "best_weights" and value is not None else value)

    def on_epoch_begin(self, run, epoch):
        self.callbacks.on_epoch_begin(epoch)

    def on_epoch_end(self, run, epoch, logs):
        self.callbacks.on_epoch_end(epoch, logs)
        if self.model.stop_training:
            run.stop("early_stopping")

    def on_train_end(self, run):
        self.callbacks.on_train_end()


class Training:
    """Epochs of compiled executions on `engine`, timed and stopped by `budget`.

    Each execution runs `min(K, what the engine allows, every hook's limit)` steps:
    up to the epoch's end, or past it when the engine `spans_epochs` and every hook
    `crosses_epochs`. After it, each epoch that ended in it ends on the host (the
    state synced into the model, the hooks' `on_epoch_end` with the epoch's own
    metrics) and the next begins (`on_epoch_begin`), until a hook stops the run or
    `epochs` are done. A run stopped inside an epoch still ends that epoch (its row
    says it was cut short).

    Args:
        engine: a `haet.engine.Engine`.
        budget: the run's `haet.budget.WallClockBudget`; it must be among `hooks`.
        hooks: `Hook`s in the order they act.
        epochs: > 0: stop after this many epochs; 0: no limit.

    A hook may stop the run at once (`stop(reason, immediate=True)`: a signal,
    divergence): the loop ends after the current execution without the epochs'
    ends or the hooks' `on_train_end`, the state synced into the model's variables.

    Attributes:
        stopped_by: why training stopped: "budget", "planned", "epochs",
            "early_stopping", "interrupted", "diverged", or a hook's own reason.
        stopped_at_once: whether the run stopped without ending its epoch.
        epochs_run: epochs started.
        ending: during the hooks' `on_epoch_end`, the `haet.engine.EpochEnd` of the
            epoch; None otherwise.
        ending_last: during the hooks' `on_epoch_end`, whether this is the last of the
            epochs ended after one execution (several when it ran past epoch ends).
        ended: training stopped and its epochs ended (from the hooks'
            `before_train_end` on). A run resumed from a checkpoint written then goes
            straight to the hooks' `on_train_end`: no step, no epoch end again.
    """

    def __init__(self, engine, budget, hooks, epochs=0):
        if budget not in hooks:
            raise ValueError("The budget must be one of the hooks (it writes the wall-clock schedules).")
        self.engine = engine
        self.budget = budget
        self.hooks = list(hooks)
        self.epochs = epochs
        self.stopped_by = None
        self.stopped_at_once = False
        self.epochs_run = 0
        self.ending = None
        self.ending_last = True
        self.ended = False

    def stop(self, reason, immediate=False, completed=False):
        """Ends training after the current execution (the first reason given is kept);
        `immediate`: without ending the epoch (see the class docstring). `completed`:
        the run has done all the steps it planned (a `StepLimit`, the last of `epochs`); this reason replaces
        "budget" given after the same execution, so that `stopped_by` says the schedule
        ended rather than was cut (the record's `over_budget_seconds` keeps the
        overshoot). "diverged" replaces any reason given after the same execution (a stop
        signal that came during it): the weights are not finite, nothing is kept."""
        if self.stopped_by is None or (completed and self.stopped_by == "budget" and not self.stopped_at_once) or (
                reason == "diverged" and self.stopped_by != "diverged"):
            self.stopped_by = reason
            self.stopped_at_once = bool(immediate)

    def hook_keys(self):
        """The hooks as a checkpoint's state names them: `"{position}:{class name}"`."""
        return [f"{i}:{type(hook).__name__}" for i, hook in enumerate(self.hooks)]

    def state_dict(self):
        """The loop's state for a checkpoint, at an execution boundary: the engine's
        position in its epoch, its last logs and the epoch ends the loop has not
        acted on yet, and each hook's `state_dict()`. The training state itself is
        `engine.snapshot()`. Once training `ended`, `training_ended_by` is why it
        stopped (None before)."""
        engine = self.engine
        return {"training_ended_by": self.stopped_by if self.ended else None,
                "epoch": engine.epoch, "step_in_epoch": engine.step_in_epoch, "epochs_run": self.epochs_run,
                "engine_logs": engine.epoch_metrics(), "learning_rate": engine.learning_rate,
                "ended_epochs": [dataclasses.asdict(end) for end in engine.ended_epochs],
                "hooks": {key: hook.state_dict() for key, hook in zip(self.hook_keys(), self.hooks)}}

    def steps_allowed(self):
        """The most steps the next execution may run before the hooks' limits: the
        engine's (`steps_allowed`), to the epoch's end unless every hook
        `crosses_epochs`, and not past the last of `epochs`."""
        engine = self.engine
        if not engine.spans_epochs or not all(hook.crosses_epochs for hook in self.hooks):
            return min(engine.steps_per_execution, engine.steps_left_in_epoch)
        steps = engine.steps_allowed()
        if self.epochs:
            steps = min(steps, self._steps_left_in_epochs())
        return steps

    def _steps_left_in_epochs(self):
        """Steps the engine has left before the end of the last of `epochs` (0 once it ended; `epochs` set)."""
        engine = self.engine
        return (self.epochs - engine.epoch) * engine.steps_per_epoch - engine.step_in_epoch

    def fit(self, resume=None):
        """Trains until a hook, the budget or `epochs` stops it; returns `self`.

        Args:
            resume: None, or `(snapshot, state)` from a checkpoint of the same run
                (`engine.snapshot()`, `state_dict()`): training goes on from there,
                inside the epoch it was in; from one written once training had
                ended, only the hooks' `on_train_begin` and `on_train_end` run.

        Raises:
            ValueError: `resume` was saved by a run with other hooks.
        """
        engine, hooks = self.engine, self.hooks
        if resume is not None:
            self._resume(*resume)
        self.budget.begin()
        for hook in hooks:
            hook.on_train_begin(self)
        self._complete_if_epochs_done()  # (resumed with its budget spent: `WallClockBudget.on_train_begin`)
        if resume is None and self.stopped_by is None:
            self._begin_epoch(0)
        while self.stopped_by is None:
            self._end_epochs()  # of the last execution (or the checkpoint's), and the next one's start
            if self.stopped_by is not None:
                break
            for hook in hooks:
                hook.before_execution(self)
            limits = [limit for limit in (hook.limit(self) for hook in hooks) if limit is not None]
            steps = min([self.steps_allowed(), *limits])
            if steps < 1:
                raise RuntimeError(f"A hook limited the next execution to {steps} steps: {limits}.")
            losses = self.budget.execute(engine, steps)
            for hook in hooks:
                hook.after_execution(self, steps, losses)
            self._complete_if_epochs_done()
        if not self.stopped_at_once and not self.ended:
            cut_short = None
            if engine.epoch is not None and 0 < engine.step_in_epoch < engine.steps_per_epoch:
                # Stopped inside an epoch: it ends here, cut short.
                cut_short = EpochEnd(engine.epoch, engine.step_in_epoch, engine.epoch_metrics(),
                                     engine.learning_rate)
            self._end_epochs(cut_short)
        engine.sync()
        if not self.stopped_at_once:
            if not self.ended:
                self.ended = True
                for hook in hooks:
                    hook.before_train_end(self)
            for hook in hooks:
                hook.on_train_end(self)
        return self

    def _complete_if_epochs_done(self):
        """The last of `epochs` ended with the execution that used up the budget (or
        before a resume with none left): the run is complete, not cut (the record's
        over_budget_seconds says by how much)."""
        if self.stopped_by == "budget" and self.epochs and self._steps_left_in_epochs() <= 0:
            self.stop("epochs", completed=True)

    def _begin_epoch(self, epoch):
        if self.epochs and epoch >= self.epochs:
            self.stop("epochs")
            return
        self.engine.start_epoch(epoch)
        self.epochs_run = epoch + 1
        for hook in self.hooks:
            hook.on_epoch_begin(self, epoch)

    def _end_epochs(self, cut_short=None):
        """The epoch ends the engine saw since the last call (and `cut_short`, an
        epoch the loop ends itself): each epoch's end, then the next epoch's start
        when it is already running on the device (the execution went past the end).
        The state is synced into the model once before and read back once after
        (hooks write variables with `engine.assign`, which keeps both the same). When
        the last execution stopped at an epoch's end and the run goes on, the next
        epoch starts."""
        engine = self.engine
        ended = engine.take_ended_epochs() + ([cut_short] if cut_short is not None else [])
        if ended:
            engine.sync()
        for end in ended:
            logs = dict(end.logs)
            self.ending, self.ending_last = end, end is ended[-1]
            try:
                for hook in self.hooks:
                    hook.on_epoch_end(self, end.epoch, logs)
            finally:
                self.ending = None
            if end.epoch < engine.epoch:
                self.epochs_run = max(self.epochs_run, end.epoch + 2)
                for hook in self.hooks:
                    hook.on_epoch_begin(self, end.epoch + 1)
        if ended:
            engine.reload()  # a hook may have changed the model's variables
        if self.stopped_by is None and engine.epoch is not None and engine.steps_left_in_epoch == 0:
            self._begin_epoch(engine.epoch + 1)

    def other_hooks(self, state):
        """None when a checkpoint's loop `state` (`state_dict()`) was written by a run
        with this run's hooks; else what differs, naming both lists (`hook_keys`)."""
        keys = self.hook_keys()
        if list(state["hooks"]) != keys:
            return f"written by a run with other hooks ({list(state['hooks'])}); this one has {keys}"
        return None

    def _resume(self, snapshot, state):
        differ = self.other_hooks(state)
        if differ:
            raise ValueError(f"The checkpoint was {differ}: resume with the run's own settings.")
        for key, hook in zip(self.hook_keys(), self.hooks):
            if state["hooks"][key] is not None:
                hook.load_state_dict(state["hooks"][key])
        self.engine.restore(snapshot)
        ended = [EpochEnd(**end) for end in state.get("ended_epochs", ())]
        if "ended_epochs" not in state and state["step_in_epoch"] == self.engine.steps_per_epoch:
            # A checkpoint from before `ended_epochs` was kept: its epoch had ended.
            ended = [EpochEnd(state["epoch"], state["step_in_epoch"], dict(state["engine_logs"]),
                              state["learning_rate"])]
        self.engine.continue_epoch(state["epoch"], state["step_in_epoch"], state["engine_logs"],
                                   state["learning_rate"], ended)
        self.epochs_run = state["epochs_run"]
        if state.get("training_ended_by") is not None:
            # Written once training had ended (`before_train_end`): what is left is its end.
            self.stopped_by, self.stopped_at_once, self.ended = state["training_ended_by"], False, True
        return state["epoch"]
