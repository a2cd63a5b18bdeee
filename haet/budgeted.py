"""`haet.fit`: train your own compiled Keras model under a wall-clock budget.

`python -m haet.train` trains haet's recipes; `haet.fit` gives any compiled Keras
model the same training loop (`haet.engine` and `haet.loop`): the training arrays
are copied to the accelerator once, each step gathers its batch there and calls the
model's own `train_step`, and the host waits for the device only between executions
of up to `steps_per_execution` steps, where it reads the clock. Training stops at the
first execution boundary after `budget_seconds` (compilation included), after
`epochs`, at an early stop by a Keras callback, or at the first non-finite loss.
Ctrl-C (SIGINT) stops training at the next execution boundary (executions are cut to
about 2 s once steps are timed) and raises `KeyboardInterrupt` with the model holding
the weights of the steps done; a second Ctrl-C raises at once.

The learning rate can follow the optimizer's own value or Keras schedule, a
wall-clock schedule (a function of the elapsed fraction of the budget, written by
the host between executions), or a haet planned schedule whose length the planner
fits to the budget after timing the first steps on the machine (the one-cycle of
the HAET recipes: `haet.schedules.PlannedPiecewiseLinear`).

Example::

    import haet, keras
    model = keras.Sequential([keras.Input((32, 32, 3), dtype="uint8"), keras.layers.Rescaling(1 / 255),
                              keras.layers.Conv2D(32, 3, activation="relu"), keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(10)])
    model.compile(keras.optimizers.SGD(haet.schedules.PlannedPiecewiseLinear([0, 0.2, 1], [0, 0.4, 0]),
                                       momentum=0.9, nesterov=True),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    result = haet.fit(model, x_train, y_train, budget_seconds=60, batch_size=512, validation_data=(x_val, y_val))
    result.history["val_accuracy"][-1], result.stopped_by, result.steps
"""

import dataclasses
import math
import numbers
import signal
import time

import keras
import numpy as np

from haet import budget as budget_lib
from haet import optimizers, schedules
from haet.checkpoint import StopSignals
from haet.engine import DEFAULT_STEPS_PER_EXECUTION, check_steps_per_execution, make_engine
from haet.hooks import DivergenceGuard
from haet.loop import Hook, KerasCallbacks, Training


@dataclasses.dataclass
class FitResult:
    """What `fit` did.

    Attributes:
        history: metric name -> one float per epoch (the last epoch possibly cut
            short), as `keras.callbacks.History.history`: the compiled loss and
            metrics on the training batches (running means over the epoch),
            `learning_rate` (of the step after the epoch's last), and with
            validation data `val_` + each of `model.evaluate`'s results.
        epochs: one dict per epoch: `epoch` (1-based), `steps`, `complete`,
            `elapsed_seconds` and `remaining_seconds` of the budget at its end,
            `learning_rate`, `loss`, `accuracy` (None without that metric) and the
            `val_*` values.
        stopped_by: "budget", "epochs", "planned" (a planned schedule's steps are
            done), "early_stopping" (a callback set `model.stop_training`) or
            "diverged" (a non-finite training loss; the model holds the weights
            after that step).
        steps: optimizer steps run (the planner's probe steps excluded: they are
            undone).
        train_seconds: seconds from the budget's start to the last execution's end
            (compilation, the planner's probe and validation included).
        compile_seconds: the first execution's excess over its steps at the typical
            step time (tracing and XLA compilation).
        step_seconds: the median seconds of a step, or None when fewer than two
            executions ran.
        planned_steps: the steps a planned schedule was fitted to (its last plan),
            or None.
        diverged_at_step: the 1-based step whose loss was not finite, or None.
    """

    history: dict
    epochs: list
    stopped_by: str
    steps: int
    train_seconds: float
    compile_seconds: float
    step_seconds: float | None
    planned_steps: int | None = None
    diverged_at_step: int | None = None


class _KerasValidation(Hook):
    """`model.evaluate` on the validation arrays at each epoch end: each of its
    results goes into the epoch's logs as `val_<name>` (its own compiled loss and
    metrics, so a model ending in a softmax is scored as it was compiled)."""

    def __init__(self, x, y, batch_size):
        self.x, self.y, self.batch_size = x, y, batch_size

    def on_train_begin(self, run):
        # As `haet.hooks.Validation`: compile evaluation now (the budget counts it), for a
        # full batch and the last, partial one, so that the first epoch's end costs what
        # every epoch's end costs (the planner charges it to each).
        # (Under JAX the engine holds the state: as at every epoch's end, it is written
        # into the model first and read back after, since Keras' evaluation donates it.)
        n = self.batch_size + len(self.y) % self.batch_size
        run.engine.sync()
        run.engine.model.evaluate(self.x[:n], self.y[:n], batch_size=self.batch_size, verbose=0)
        run.engine.reload()

    def on_epoch_end(self, run, epoch, logs):
        scores = run.engine.model.evaluate(self.x, self.y, batch_size=self.batch_size, verbose=0, return_dict=True)
        logs.update({f"val_{name}": float(value) for name, value in scores.items()})


class _Recorder(Hook):
    """Keeps every epoch's logs (after the budget added the learning rate) and
    prints one line an epoch when `verbose`."""

    crosses_epochs = True

    def __init__(self, budget, verbose):
        self.budget, self.verbose = budget, verbose
        self.history = {}

    def on_epoch_end(self, run, epoch, logs):
        values = {name: float(np.asarray(value)) for name, value in logs.items()
                  if np.size(value) == 1 and np.issubdtype(np.asarray(value).dtype, np.number)}
        for name, value in values.items():
            self.history.setdefault(name, []).append(value)
        if self.verbose:
            row = self.budget.history[-1]
            total = "" if math.isinf(self.budget.budget_seconds) else f" of {self.budget.budget_seconds:g}"
            parts = [f"epoch {row['epoch']}{'' if row['complete'] else ' (cut short)'}: "
                     f"{row['elapsed_seconds']:.1f} s{total}"]
            parts += [f"{name} {value:.4g}" for name, value in values.items()]
            print(" | ".join(parts), flush=True)


def _planned_schedule(optimizer):
    """The optimizer's haet planned schedule (`haet.schedules.PlannedPiecewiseLinear`,
    `PlannedSchedule`), or None."""
    # Keras 3 optimizers keep the schedule they were given here; there is no public accessor.
    schedule = getattr(optimizers.inner(optimizer), "_learning_rate", None)
    return schedule if isinstance(schedule, schedules._PlannedSteps) else None


def _is_integer(value):
    """An integer that is not a bool (`True` is not a count)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _examples(x, name):
    """`x` as an array of N >= 1 numeric examples `(N, ...)`, with no nan or inf.

    Raises:
        ValueError: naming `name`: ragged, not numbers, of rank below 2, empty, or
            non-finite (the first such example).
    """
    try:
        x = np.asarray(x)
    except ValueError as e:  # ragged nested lists
        raise ValueError(f"{name} must be an array of N examples of one shape, (N, ...). Received: {e}") from None
    if x.ndim < 2:
        raise ValueError(f"{name} must be an array of N examples, (N, ...). Received shape {x.shape}.")
    floating = np.issubdtype(x.dtype, np.floating) or x.dtype.name == "bfloat16"  # (ml_dtypes' is not np.floating)
    if not (np.issubdtype(x.dtype, np.integer) or floating or x.dtype == bool):
        raise ValueError(f"{name} must hold integers or floats (uint8 images, or float32). Received dtype {x.dtype}.")
    if x.size == 0:
        raise ValueError(f"{name} holds no examples (shape {x.shape}).")
    if floating:
        chunk = max(1, (1 << 22) // max(1, x[0].size))  # about 4M values a pass: no copy of x in memory
        for start in range(0, len(x), chunk):
            finite = np.isfinite(x[start:start + chunk]).reshape(min(chunk, len(x) - start), -1).all(axis=1)
            if not finite.all():
                raise ValueError(f"{name}[{start + int(np.argmin(finite))}] holds nan or inf: the loss of any batch "
                                 f"with it would not be finite. Fix or drop those examples first.")
    return x


def _output_shapes(model, x):
    """The shapes of `model`'s outputs for `x`'s examples: its symbolic outputs, or
    (a subclassed model, a Sequential without an `Input`) those of a symbolic call
    on an input of x's shape and dtype, which builds the model as its first call
    would and computes nothing.

    Raises:
        ValueError: the model has other than one input, its input does not take x's
            examples (shape, or float images into an integer input), or the
            symbolic call fails (Keras' message, naming x's shape).
    """
    try:
        inputs, outputs = model.inputs, model.outputs
    except (AttributeError, ValueError):  # a subclassed model, a Sequential without an Input
        inputs = outputs = None
    if inputs:
        if len(inputs) != 1:
            raise ValueError(f"haet.fit trains models of one input; this one has {len(inputs)}.")
        expected = tuple(inputs[0].shape[1:])
        if len(expected) != x.ndim - 1 or any(e is not None and e != s for e, s in zip(expected, x.shape[1:])):
            raise ValueError(f"x's examples have shape {x.shape[1:]}, but the model takes {expected} (its Input).")
        dtype = np.dtype(keras.backend.standardize_dtype(inputs[0].dtype))
        if np.issubdtype(dtype, np.integer) and np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"x is {x.dtype}, but the model's Input is {dtype}: the values would be cut to integers "
                             f"(images scaled to [0, 1] would become 0). Pass the {dtype} images, or give the Input "
                             f"dtype={x.dtype.name}.")
    if outputs is None:
        try:
            outputs = keras.tree.flatten(model(keras.Input(x.shape[1:], dtype=x.dtype.name)))
        except Exception as e:  # whatever the model's own layers raise for this input
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"The model cannot take x's examples of shape {x.shape[1:]} and dtype {x.dtype}: "
                             f"{first}") from None
    return [tuple(output.shape) for output in outputs]


def _classes(model, x, one_hot_classes):
    """`(K, name)`: K, the number of classes the labels index, and the labels' name
    for the messages. K is `one_hot_classes` (checked against
    the model's output size), the size of the model's one output, or 2 for an
    output of one unit (a binary classifier: labels 0 and 1); None when the output
    size is not known.

    Raises:
        ValueError: more than one output, `one_hot_classes` other than the output's
            size, or an input that does not take `x` (`_output_shapes`).
    """
    shapes = _output_shapes(model, x)
    if len(shapes) != 1:
        raise ValueError(f"haet.fit trains models of one output (class scores); this one has {len(shapes)}.")
    size = shapes[0][-1] if shapes[0] else None
    if one_hot_classes is not None:
        if _is_integer(size) and size != one_hot_classes:
            raise ValueError(f"one_hot_classes={one_hot_classes}, but the model outputs {size} scores an example: "
                             f"they must match.")
        return one_hot_classes, "y"
    if size == 1:
        if _is_categorical_crossentropy(getattr(model, "loss", None)):
            # A softmax over one score is 1 whatever it is: a loss of 0 and no learning.
            raise ValueError("The model outputs one score an example, and its loss is a categorical "
                             "cross-entropy, which is 0 for one score (nothing would be learned): for binary "
                             "labels use keras.losses.BinaryCrossentropy, or give the model one output unit a "
                             "class.")
        return 2, "y (the model has one output unit: binary labels)"
    return size if _is_integer(size) and size > 1 else None, "y"


def _is_categorical_crossentropy(loss):
    """A loss (as `model.compile` keeps it: a name, a `keras.losses.Loss`, a function)
    that is Keras' sparse or one-hot categorical cross-entropy."""
    losses = keras.losses
    if isinstance(loss, str):
        return loss in ("sparse_categorical_crossentropy", "SparseCategoricalCrossentropy",
                        "categorical_crossentropy", "CategoricalCrossentropy")
    return (isinstance(loss, (losses.SparseCategoricalCrossentropy, losses.CategoricalCrossentropy))
            or loss in (losses.sparse_categorical_crossentropy, losses.categorical_crossentropy))


def _has_no_loss(model):
    """A model compiled without a loss whose class does not compute one itself."""
    return (getattr(model, "loss", None) is None and type(model).compute_loss is keras.Model.compute_loss
            and type(model).train_step is keras.Model.train_step)


def fit(model, x, y, *, budget_seconds=None, epochs=None, batch_size=32, learning_rate=None, validation_data=None,
        callbacks=(), one_hot_classes=None, seed=0, steps_per_execution=DEFAULT_STEPS_PER_EXECUTION,
        probe_steps=20, verbose=1, clock=time.perf_counter):
    """Trains a compiled Keras model for at most `budget_seconds` of wall-clock time
    and/or `epochs` epochs, with haet's training loop (see the module docstring).

    An epoch is `N // batch_size` steps of full batches in a permutation drawn from
    `(seed, epoch)`; the `N % batch_size` images left at its end wait for the next
    epoch's permutation (every step has one shape and compiles once). Keras
    callbacks are called at epoch granularity (`on_train_begin`, `on_epoch_begin`,
    `on_epoch_end`, `on_train_end`; never a batch hook). Validation, callbacks and
    the planner's probe count toward the budget.

    Args:
        model: a compiled `keras.Model` (optimizer, loss, metrics) taking `x` as
            stored; its `train_step` is the step.
        x: `(N, ...)` training inputs (integers or finite floats, of the shape and
            kind the model's input takes), copied to the accelerator once as they are
            (uint8 images take a quarter of float32's memory: normalize inside the
            model, e.g. with `keras.layers.Rescaling`).
        y: int class labels `(N,)` or `(N, 1)`.
        budget_seconds: seconds of training (a positive number), from the first
            step's start: compilation counts. None: no time limit (give `epochs`).
        epochs: the most epochs (a positive integer), or None: until the budget.
        batch_size: examples a step, in [1, N].
        learning_rate: None (the optimizer's own learning rate or schedule), or a
            wall-clock schedule: a function of the elapsed fraction of the budget in
            [0, 1) returning the learning rate, read at most 1,000 times a run (e.g.
            `lambda f: 1e-3 if f < 0.8 else 1e-4`), or a haet schedule of unit
            "budget" (`haet.schedules.PiecewiseConstant`: its steps end executions on
            time). The optimizer must then have a plain number as its learning rate.
            A planned schedule (`haet.schedules.PlannedPiecewiseLinear` with
            fraction knots, `PlannedSchedule`) goes in the optimizer instead: with
            `epochs` it spans them, otherwise the planner times `probe_steps` steps,
            undoes them and fits the schedule to the budget (re-planning if steps slow
            down).
        validation_data: None, or `(x_val, y_val)` scored with `model.evaluate` at
            each epoch end (`val_` + each compiled metric in the history and the
            callbacks' logs).
        callbacks: a list of `keras.callbacks.Callback`s (`EarlyStopping`,
            `TensorBoard`, `ModelCheckpoint`...), called at epoch ends; None: none.
        one_hot_classes: None, or K: the labels reach the loss as float32 one-hot
            rows of length K (for `CategoricalCrossentropy`, e.g. with label
            smoothing).
        seed: seed of the epoch permutations (an integer >= 0).
        steps_per_execution: the most steps one compiled execution runs (>= 1).
        probe_steps: steps the planner times before fitting a planned schedule.
        verbose: 0 silent, 1 one line an epoch.
        clock: function returning seconds (`time.perf_counter`; tests pass a fake).

    Returns:
        `FitResult`. The model holds the trained weights.

    Raises:
        ValueError: before any training: an uncompiled model, or one compiled
            without a loss (whose class computes none itself); a model of other
            than one input and one output; no budget and no epochs; a budget or
            epoch count that is not positive, or an infinite budget without
            epochs; inputs that are empty, ragged, not numbers, hold nan or inf,
            or that the model's input does not take (shape; float into an integer
            `Input`); inputs and labels that do not match; labels that are not
            integer class labels, or are outside [0, K) where K is known
            (`one_hot_classes`, the size of the model's one output, read by a
            symbolic call when the model has no symbolic outputs; 2 for an output
            of one unit, whose loss may not be a categorical cross-entropy: 0 for
            one score); `one_hot_classes` other than that size; a batch size
            outside [1, N]; `learning_rate` that is not callable, fails at 0, or is
            given to an optimizer that follows a schedule of its own (planned or
            not); a planned schedule in an optimizer that already ran steps;
            validation data that do not match, or are empty; callbacks that are
            not a list of Keras callbacks; `steps_per_execution` or `probe_steps`
            below 1, or a `steps_per_execution` reaching more than
            `haet.engine.MAX_EPOCHS_PER_EXECUTION` epochs; a seed below 0.
        KeyboardInterrupt: after a Ctrl-C (SIGINT, in the main thread), once the
            current execution ended and the model holds the weights of the steps
            done.
    """
    if not isinstance(model, keras.Model) or getattr(model, "optimizer", None) is None:
        raise ValueError("model must be a compiled keras.Model: call model.compile(optimizer=..., loss=..., "
                         "metrics=...) first.")
    if _has_no_loss(model):
        # (Under JAX its step would run with a loss of 0 and change nothing; under TensorFlow it fails in the step.)
        raise ValueError("model was compiled without a loss: pass one, e.g. model.compile(optimizer, "
                         "loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=[...]).")
    if budget_seconds is None and epochs is None:
        raise ValueError("Give budget_seconds (seconds of training), epochs, or both.")
    if budget_seconds is not None and not (isinstance(budget_seconds, numbers.Real) and budget_seconds > 0
                                           and not math.isnan(budget_seconds) and not isinstance(budget_seconds, bool)):
        raise ValueError(f"budget_seconds must be a positive number of seconds. Received: {budget_seconds!r}")
    if epochs is not None and not (_is_integer(epochs) and epochs >= 1):
        raise ValueError(f"epochs must be a positive integer (or None: until the budget). Received: {epochs!r}")
    if epochs is None and math.isinf(budget_seconds):
        raise ValueError("budget_seconds=inf with epochs=None would never stop: give epochs, or a finite budget.")
    if one_hot_classes is not None and not (_is_integer(one_hot_classes) and one_hot_classes >= 2):
        raise ValueError(f"one_hot_classes must be None or the number of classes (an integer >= 2). Received: "
                         f"{one_hot_classes!r}")
    x = _examples(x, "x")
    classes, labels_name = _classes(model, x, one_hot_classes)
    # Imported here, not with the others: `import haet` imports this module, and runpy
    # warns when `python -m haet.data` finds haet.data already imported.
    from haet import data

    # Labels past the model's outputs fail deep in TensorFlow's step, and under JAX give a wrong loss.
    y = data.class_labels(y, labels_name, len(x), classes)
    if not (_is_integer(batch_size) and 1 <= batch_size <= len(x)):
        raise ValueError(f"batch_size={batch_size!r} must be an integer between 1 and the {len(x)} training "
                         f"examples.")
    if verbose not in (0, 1) or isinstance(verbose, bool):
        raise ValueError(f"verbose must be 0 or 1. Received: {verbose!r}")
    for name, value in (("steps_per_execution", steps_per_execution), ("probe_steps", probe_steps)):
        if not (_is_integer(value) and value >= 1):
            raise ValueError(f"{name} must be a positive integer. Received: {value!r}")
    steps_per_epoch = len(x) // batch_size
    check_steps_per_execution(steps_per_execution, steps_per_epoch, len(x))
    if not (_is_integer(seed) and seed >= 0):
        raise ValueError(f"seed must be an integer >= 0 (it draws the epochs' permutations). Received: {seed!r}")
    if isinstance(callbacks, keras.callbacks.Callback):
        raise ValueError(f"callbacks must be a list of keras.callbacks.Callback instances: pass [{callbacks!r}].")
    callbacks = list(callbacks or ())
    wrong = [c for c in callbacks if not isinstance(c, keras.callbacks.Callback)]
    if wrong:
        raise ValueError(f"callbacks must be keras.callbacks.Callback instances. Received: {wrong!r}")
    if validation_data is not None:
        if not (isinstance(validation_data, (tuple, list)) and len(validation_data) == 2):
            raise ValueError("validation_data must be a pair (x_val, y_val).")
        x_val = _examples(validation_data[0], "x_val")
        if x_val.shape[1:] != x.shape[1:]:
            raise ValueError(f"x_val's examples have shape {x_val.shape[1:]}, x's {x.shape[1:]}.")
        y_val = data.class_labels(validation_data[1], "y_val", len(x_val), classes)
        # `model.evaluate` feeds the labels to the loss as given: as one-hot rows when training does.
        validation_data = (x_val, y_val if one_hot_classes is None else data.one_hot(y_val, one_hot_classes))
    planned = _planned_schedule(model.optimizer)
    wall_clock = None
    if learning_rate is not None:
        if planned is not None:
            raise ValueError("learning_rate is a wall-clock schedule, but the optimizer follows a planned schedule: "
                             "use one of them.")
        try:
            optimizers.learning_rate_variable(model.optimizer)
        except ValueError as e:  # an optimizer with a schedule of its own
            raise ValueError(f"learning_rate is a wall-clock schedule, but {e} Pass learning_rate=None to follow "
                             "the optimizer's, or compile the optimizer with a number as its learning rate.") from None
        if getattr(learning_rate, "unit", None) == "budget" and hasattr(learning_rate, "next_change"):
            wall_clock = learning_rate
        elif callable(learning_rate):
            wall_clock = schedules.BudgetSchedule.of_fraction(learning_rate)
        else:
            raise ValueError(f"learning_rate must be a function of the elapsed fraction of the budget, a haet "
                             f"schedule of unit 'budget', or None. Received: {learning_rate!r}")
        try:
            wall_clock(0.0)  # a function that fails, fails before any work
        except (TypeError, ValueError, ArithmeticError) as e:
            raise ValueError(f"learning_rate failed at 0 of the budget: {type(e).__name__}: {e}") from None
    # Without epochs the planner fits the schedule to the budget (there is one: checked above).
    needs_plan = planned is not None and getattr(planned, "needs_plan", True) and epochs is None
    if planned is not None:
        steps = epochs * steps_per_epoch if epochs else steps_per_epoch  # the planner sets it before training
        inner = optimizers.inner(model.optimizer)
        done = int(keras.ops.convert_to_numpy(inner.iterations))
        if done:
            raise ValueError(f"The optimizer has already run {done} steps, and its planned schedule counts from step "
                             f"0: compile the model with a new optimizer, or set model.optimizer.iterations to 0.")
        if planned.planned_steps is None:
            if inner.built:
                raise ValueError("The optimizer was built before its planned schedule got its variables: compile "
                                 "the model with a new optimizer.")
            planned.attach(inner, steps, steps_per_epoch)
        else:
            if isinstance(planned, schedules.PlannedPiecewiseLinear) and planned.knot_unit == "epochs":
                planned.steps_per_epoch = float(steps_per_epoch)
            planned.planned_steps.assign(float(steps))
            planned.plan_offset.assign(0.0)

    budget = budget_lib.WallClockBudget(math.inf if budget_seconds is None else budget_seconds, wall_clock,
                                        seed=seed, clock=clock)
    engine = make_engine(model, x, y, batch_size, seed=seed, one_hot_classes=one_hot_classes,
                         steps_per_execution=steps_per_execution)
    # Ctrl-C: the first stops at the next execution boundary with the state synced into
    # the model (under JAX it lives in the engine until then), and is raised from here.
    signals = StopSignals(signals=(signal.SIGINT,), then="raising KeyboardInterrupt with the model's weights "
                                                         "synced", after_training="returning the result")
    divergence = DivergenceGuard()
    hooks = [signals, divergence]
    if validation_data is not None:
        hooks.append(_KerasValidation(*validation_data, batch_size=batch_size))
    recorder = _Recorder(budget, verbose)
    hooks += [budget, recorder]
    if callbacks:
        hooks.append(KerasCallbacks(callbacks, model, epochs=epochs))
    planner = None
    if needs_plan:
        planner = budget_lib.StepPlanner(budget, planned.planned_steps, steps_per_epoch, probe_steps,
                                         plan_offset=planned.plan_offset,
                                         step=optimizers.inner(model.optimizer).iterations)
        hooks.append(planner)  # last: its epoch end measures the time the other hooks took
    with signals:
        try:
            training = Training(engine, budget, hooks, epochs=epochs or 0).fit()
        except KeyboardInterrupt as e:  # a second Ctrl-C, inside an execution
            # Under JAX the model's variables held the arrays the engine donated to the
            # executions since the last sync (deleted): the model could not be used again.
            if engine.sync_after_interrupt():
                e.add_note("The model holds the weights of the last step that ran (or those a callback wrote "
                           "after training).")
            else:
                e.add_note("It came while an execution held the training state: the model's weights are lost (its "
                           "variables hold deleted arrays); build or load the model again.")
            raise
    if training.stopped_by == "interrupted":
        raise KeyboardInterrupt(f"{signals.name} received: training stopped after {budget.steps} steps "
                                f"({budget.train_seconds():.1f} s); the model holds their weights")
    if planner is not None:
        planned_steps = planner.planned_steps_value
    else:  # fixed by `epochs`; None for a schedule that needs no plan (epoch knots) run on a budget
        planned_steps = steps if planned is not None and epochs else None
    return FitResult(
        history=recorder.history, epochs=[dict(row) for row in budget.history], stopped_by=training.stopped_by,
        steps=budget.steps, train_seconds=budget.train_seconds(), compile_seconds=budget.compile_seconds(),
        step_seconds=budget.steady_step_seconds(), planned_steps=planned_steps, diverged_at_step=divergence.step)
