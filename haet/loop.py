"""The host side of training: epochs of compiled executions, and the hooks between them.

`Training.fit()` runs epochs of `haet.engine` executions. Between executions (never
inside one) the hooks decide: each may write values into the state the step reads
(`before_execution`), cap the next execution's length (`limit`), look at its
per-step losses and stop the run (`after_execution`), and act at epoch ends. The
budget (`haet.budget.WallClockBudget`) is one such hook and times every execution.

Keras callbacks work at epoch granularity through `KerasCallbacks`
(`EarlyStopping`, `TensorBoard`...); nothing runs per step on the host.
"""

import keras


class Hook:
    """Something a run does between compiled executions. Every method is optional.

    `run` is the `Training`: `run.engine`, `run.budget`, `run.stop(reason)`.
    Order within a step of the loop is the order of the hooks list.
    """

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
        """After each execution of `steps` steps; `losses` is the epoch's running mean
        of the training loss after each of them (float32 `(steps,)`)."""

    def on_epoch_end(self, run, epoch, logs):
        """At the end of an epoch (complete or cut short), the state synced into the
        model's variables; `logs` (loss, accuracy, val_*...) may be extended."""

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
    goes (a planner sets it); None: no limit yet."""

    reason = "max_steps"

    def __init__(self, max_steps=None):
        self.max_steps = max_steps

    def limit(self, run):
        return None if self.max_steps is None else self.max_steps - run.budget.steps

    def after_execution(self, run, steps, losses):
        if self.max_steps is not None and run.budget.steps >= self.max_steps:
            run.stop(self.reason)


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

    Each epoch: `engine.start_epoch`, then executions of
    `min(K, steps left in the epoch, every hook's limit)` steps until the epoch ends
    or a hook stops the run; then the epoch's metrics, the hooks' epoch ends (the
    state synced into the model), and the next epoch unless stopped or `epochs`
    are done. A run stopped inside an epoch still ends that epoch (its row says it
    was cut short).

    Args:
        engine: a `haet.engine.Engine`.
        budget: the run's `haet.budget.WallClockBudget`; it must be among `hooks`.
        hooks: `Hook`s in the order they act.
        epochs: > 0: stop after this many epochs; 0: no limit.

    A hook may stop the run at once (`stop(reason, immediate=True)`: a signal,
    divergence): the loop ends after the current execution without the epoch's end
    or the hooks' `on_train_end`, the state synced into the model's variables.

    Attributes:
        stopped_by: why training stopped: "budget", "planned", "epochs",
            "early_stopping", "interrupted", "diverged", or a hook's own reason.
        stopped_at_once: whether the run stopped without ending its epoch.
        epochs_run: epochs started.
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

    def stop(self, reason, immediate=False):
        """Ends training after the current execution (the first reason given is kept);
        `immediate`: without ending the epoch (see the class docstring)."""
        if self.stopped_by is None:
            self.stopped_by = reason
            self.stopped_at_once = bool(immediate)

    def _hook_keys(self):
        return [f"{i}:{type(hook).__name__}" for i, hook in enumerate(self.hooks)]

    def state_dict(self):
        """The loop's state for a checkpoint, at an execution boundary: the engine's
        position in its epoch and its last logs, and each hook's `state_dict()`.
        The training state itself is `engine.snapshot()`."""
        engine = self.engine
        return {"epoch": engine.epoch, "step_in_epoch": engine.step_in_epoch, "epochs_run": self.epochs_run,
                "engine_logs": engine.epoch_metrics(), "learning_rate": engine.learning_rate,
                "hooks": {key: hook.state_dict() for key, hook in zip(self._hook_keys(), self.hooks)}}

    def fit(self, resume=None):
        """Trains until a hook, the budget or `epochs` stops it; returns `self`.

        Args:
            resume: None, or `(snapshot, state)` from a checkpoint of the same run
                (`engine.snapshot()`, `state_dict()`): training goes on from there,
                inside the epoch it was in.

        Raises:
            ValueError: `resume` was saved by a run with other hooks.
        """
        engine, hooks = self.engine, self.hooks
        epoch, inside_epoch = 0, False
        if resume is not None:
            epoch = self._resume(*resume)
            inside_epoch = True
        self.budget.begin()
        for hook in hooks:
            hook.on_train_begin(self)
        while self.stopped_by is None:
            if not inside_epoch:
                if self.epochs and epoch >= self.epochs:
                    self.stop("epochs")
                    break
                engine.start_epoch(epoch)
                self.epochs_run = epoch + 1
                for hook in hooks:
                    hook.on_epoch_begin(self, epoch)
            inside_epoch = False
            while engine.steps_left_in_epoch and self.stopped_by is None:
                for hook in hooks:
                    hook.before_execution(self)
                limits = [limit for limit in (hook.limit(self) for hook in hooks) if limit is not None]
                steps = min(engine.steps_per_execution, engine.steps_left_in_epoch, *limits)
                if steps < 1:
                    raise RuntimeError(f"A hook limited the next execution to {steps} steps: {limits}.")
                losses = self.budget.execute(engine, steps)
                for hook in hooks:
                    hook.after_execution(self, steps, losses)
            if self.stopped_at_once:
                break
            logs = engine.epoch_metrics()
            engine.sync()
            for hook in hooks:
                hook.on_epoch_end(self, epoch, logs)
            engine.reload()  # a hook may have changed the model's variables
            epoch += 1
        engine.sync()
        if not self.stopped_at_once:
            for hook in hooks:
                hook.on_train_end(self)
        return self

    def _resume(self, snapshot, state):
        keys = self._hook_keys()
        if list(state["hooks"]) != keys:
            raise ValueError(f"The checkpoint was saved by a run with other hooks ({list(state['hooks'])}); "
                             f"this one has {keys}: resume with the run's own settings.")
        for key, hook in zip(keys, self.hooks):
            if state["hooks"][key] is not None:
                hook.load_state_dict(state["hooks"][key])
        self.engine.restore(snapshot)
        self.engine.continue_epoch(state["epoch"], state["step_in_epoch"], state["engine_logs"],
                                   state["learning_rate"])
        self.epochs_run = state["epochs_run"]
        return state["epoch"]
