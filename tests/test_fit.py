"""`haet.fit`: a user's own compiled Keras model trained by haet's loop under a budget
(fake clocks: each step costs STEP seconds)."""

import math
import os
import signal

import keras
import numpy as np
import pytest

import haet
from haet import engine as engine_lib
from haet import cli, optimizers, schedules
from conftest import FakeClock

STEP = 0.125  # seconds a step on the fake clock: exact in binary, and short enough that
# executions are not cut for a responsive Ctrl-C (about 2 s an execution)


@pytest.fixture
def data(cifar10_arrays):
    """64 real CIFAR-10 images cut to 8x8 (uint8) and their labels, (64, 1) as keras.datasets gives."""
    x, y = cifar10_arrays[0][:64, :8, :8], cifar10_arrays[1][:64]
    return x, y.reshape(-1, 1)


def tiny_model(seed=0, dtype="uint8", activation="relu"):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((8, 8, 3), dtype=dtype), keras.layers.Rescaling(1 / 255),
                             keras.layers.Conv2D(4, 3, activation=activation), keras.layers.GlobalAveragePooling2D(),
                             keras.layers.Dense(10)])


def compiled(model, optimizer=None):
    model.compile(optimizer or keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


@pytest.fixture
def clock(monkeypatch):
    """A fake clock that each training step moves by STEP seconds; `clock.runs` lists
    each execution as (steps done before it, steps, learning rate it ran with)."""
    clock, original = FakeClock(), engine_lib.Engine.run
    clock.runs = []

    def timed(self, steps):
        try:
            rate = float(self.read(optimizers.learning_rate_variable(self.model.optimizer)))
        except ValueError:  # a schedule of the optimizer's own
            rate = None
        clock.runs.append((round(clock.t / STEP), steps, rate))
        clock.t += steps * STEP
        return original(self, steps)

    monkeypatch.setattr(engine_lib.Engine, "run", timed)
    return clock


def test_a_budget_stops_training_after_its_seconds(data, clock):
    x, y = data
    model = compiled(tiny_model())
    before = [np.array(w) for w in model.get_weights()]
    result = haet.fit(model, x, y, budget_seconds=10 * STEP, batch_size=8, steps_per_execution=4, verbose=0,
                      clock=clock)
    # 8 steps an epoch: the first epoch whole, the second cut after 2 steps, at the budget's end.
    assert result.stopped_by == "budget" and result.steps == 10 and result.train_seconds == 10 * STEP
    assert [row["steps"] for row in result.epochs] == [8, 2] and not result.epochs[-1]["complete"]
    assert [row["elapsed_seconds"] for row in result.epochs] == [8 * STEP, 10 * STEP]
    assert len(result.history["loss"]) == len(result.history["accuracy"]) == 2
    assert all(math.isfinite(v) for v in result.history["loss"])
    assert result.history["learning_rate"] == pytest.approx([0.1, 0.1])
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 10  # the model holds the trained state
    assert any(not np.allclose(a, b) for a, b in zip(before, model.get_weights()))


def test_an_epoch_trains_as_keras_does_batch_by_batch(data):
    # The same steps as `train_on_batch` on the epoch's permutation: haet's loop changes
    # where the batches come from, not what a step does.
    x, y = data
    model, reference = compiled(tiny_model()), compiled(tiny_model())
    reference.set_weights(model.get_weights())
    result = haet.fit(model, x, y, epochs=2, batch_size=16, seed=3, verbose=0)
    assert result.stopped_by == "epochs" and result.steps == 8
    for epoch in range(2):
        order = engine_lib.epoch_permutation(3, epoch, len(x))
        for k in range(4):
            batch = order[16 * k:16 * (k + 1)]
            reference.train_on_batch(x[batch], y[batch])
    for ours, theirs in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


def test_a_wall_clock_learning_rate_changes_on_time(data, clock):
    x, y = data
    model = compiled(tiny_model())
    # A piecewise-constant schedule says where it changes: the execution ends there.
    result = haet.fit(model, x, y, budget_seconds=12 * STEP, batch_size=16, steps_per_execution=16, verbose=0,
                      clock=clock,
                      learning_rate=schedules.PiecewiseConstant([0.5], [0.1, 0.01]))
    assert result.steps == 12
    assert [steps for _, steps, _ in clock.runs] == [1, 5, 6]
    assert [rate for _, _, rate in clock.runs] == pytest.approx([0.1, 0.1, 0.01])
    # Epochs of 4 steps: the first ended in the second execution, before the change.
    assert result.history["learning_rate"] == pytest.approx([0.1, 0.01, 0.01])


def test_a_function_of_the_budget_fraction_is_a_wall_clock_learning_rate(data, clock):
    x, y = data
    model = compiled(tiny_model())
    result = haet.fit(model, x, y, budget_seconds=20 * STEP, batch_size=8, steps_per_execution=4, verbose=0,
                      clock=clock, learning_rate=lambda fraction: 0.1 * (1 - fraction))
    # Read before each execution: after 0, 1, 5, 9, 13 and 17 of the 20 steps that fit.
    assert [t for t, _, _ in clock.runs] == [0, 1, 5, 9, 13, 17]
    assert [rate for _, _, rate in clock.runs] == pytest.approx([0.1 * (1 - t / 20) for t in (0, 1, 5, 9, 13, 17)])
    assert result.steps == 20 and result.stopped_by == "budget"


def test_a_planned_schedule_is_fitted_to_the_budget(data, clock):
    x, y = data
    model = compiled(tiny_model(), keras.optimizers.SGD(
        schedules.PlannedPiecewiseLinear([0, 0.5, 1], [0, 0.2, 0]), momentum=0.9, nesterov=True))
    result = haet.fit(model, x, y, budget_seconds=20 * STEP, batch_size=16, probe_steps=2, verbose=0, clock=clock)
    # The probe (1 + 2 steps, undone) leaves the time of 17 steps: 4 epochs of 4 steps.
    assert result.planned_steps == 16 and result.steps == 16 and result.stopped_by == "planned"
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 16
    rates = result.history["learning_rate"]
    assert rates == pytest.approx([0.1, 0.2, 0.1, 0.0], abs=1e-6)


def test_a_planned_schedule_with_epochs_spans_them(data):
    x, y = data
    model = compiled(tiny_model(), keras.optimizers.SGD(schedules.PlannedPiecewiseLinear([0, 0.5, 1], [0, 0.2, 0])))
    result = haet.fit(model, x, y, epochs=2, batch_size=16, verbose=0)
    assert result.planned_steps == 8 and result.stopped_by == "epochs"
    assert result.history["learning_rate"] == pytest.approx([0.2, 0.0], abs=1e-6)


def test_a_schedule_in_epochs_runs_on_a_budget_without_a_plan(data, clock):
    x, y = data
    model = compiled(tiny_model(), keras.optimizers.SGD(
        schedules.PlannedPiecewiseLinear([0, 1, 2], [0.2, 0.1, 0.0], knot_unit="epochs")))
    result = haet.fit(model, x, y, budget_seconds=12 * STEP, batch_size=16, verbose=0, clock=clock)
    # (It used to train, then fail computing planned_steps from epochs=None.)
    assert result.planned_steps is None and result.steps == 12 and result.stopped_by == "budget"
    assert result.history["learning_rate"] == pytest.approx([0.1, 0.0, 0.0], abs=1e-6)  # at 1, 2 and 3 epochs


def test_validation_and_callbacks_at_epoch_ends(data, cifar10_arrays):
    x, y = data
    x_val, y_val = cifar10_arrays[2][:40, :8, :8], cifar10_arrays[3][:40]
    seen = []

    class StopAfterTwo(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            seen.append(("begin", epoch))

        def on_epoch_end(self, epoch, logs=None):
            seen.append(("end", epoch, sorted(logs)))
            if epoch == 1:
                self.model.stop_training = True

    model = compiled(tiny_model())
    result = haet.fit(model, x, y, epochs=5, batch_size=16, validation_data=(x_val, y_val),
                      callbacks=[StopAfterTwo()], verbose=0)
    assert result.stopped_by == "early_stopping" and result.steps == 8
    keys = ["accuracy", "learning_rate", "loss", "val_accuracy", "val_loss"]
    assert seen == [("begin", 0), ("end", 0, keys), ("begin", 1), ("end", 1, keys)]
    scores = model.evaluate(x_val, y_val, batch_size=16, verbose=0, return_dict=True)
    assert result.history["val_loss"][-1] == pytest.approx(scores["loss"], rel=1e-5)
    assert result.history["val_accuracy"][-1] == pytest.approx(scores["accuracy"])
    assert result.epochs[-1]["val_loss"] == pytest.approx(scores["loss"], rel=1e-5)


def test_a_non_finite_loss_stops_training_at_its_step(data):
    x, y = data
    x = x.astype("float32") + 1.0
    x[37] = -1.0  # the batch that holds image 37 has a NaN loss: the model takes the square root
    keras.utils.set_random_seed(0)
    model = compiled(keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Lambda(keras.ops.sqrt),
                                       keras.layers.Conv2D(4, 3), keras.layers.GlobalAveragePooling2D(),
                                       keras.layers.Dense(10)]))  # (no ReLU: it would turn NaN into 0)
    result = haet.fit(model, x, y, epochs=3, batch_size=8, steps_per_execution=32, verbose=0)
    position = int(np.flatnonzero(engine_lib.epoch_permutation(0, 0, 64) == 37)[0])
    assert result.stopped_by == "diverged" and result.diverged_at_step == position // 8 + 1


def test_ctrl_c_stops_at_the_execution_boundary_with_the_weights_synced(data, clock, monkeypatch):
    x, y = data
    original = engine_lib.Engine.run

    def interrupted(self, steps):  # Ctrl-C during the third execution
        losses = original(self, steps)
        if len(clock.runs) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return losses

    monkeypatch.setattr(engine_lib.Engine, "run", interrupted)
    model = compiled(tiny_model())
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt, match="SIGINT received: training stopped after 9 steps"):
        haet.fit(model, x, y, budget_seconds=100 * STEP, batch_size=8, steps_per_execution=4, verbose=0, clock=clock)
    # Executions of 1, 4 and 4 steps ran: the model (not only the engine) holds their result.
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 9
    assert signal.getsignal(signal.SIGINT) is handler  # the caller's handler is back


def test_a_second_ctrl_c_inside_an_execution_leaves_the_model_usable(data, clock, monkeypatch):
    """Two Ctrl-Cs in the third execution, after its steps: the second raised there, and
    under JAX the model's variables held the arrays the engine had donated to the
    execution (deleted: the model could not be read or saved)."""
    x, y = data
    original = engine_lib.Engine.run

    def interrupted(self, steps):
        losses = original(self, steps)
        if len(clock.runs) == 3:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # (raises here)
        return losses

    monkeypatch.setattr(engine_lib.Engine, "run", interrupted)
    model = compiled(tiny_model())
    with pytest.raises(KeyboardInterrupt, match=r"second stop signal \(SIGINT\)") as stopped:
        haet.fit(model, x, y, budget_seconds=100 * STEP, batch_size=8, steps_per_execution=4, verbose=0, clock=clock)
    assert stopped.value.__notes__ == ["The model holds the weights of the last step that ran (or those a callback "
                                       "wrote after training)."]
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 9  # the host had the third's result
    assert np.isfinite(model.predict(x[:4], verbose=0)).all()


def test_a_second_ctrl_c_in_the_planners_probe_leaves_the_model_without_the_probes_steps(data, clock,
                                                                                          monkeypatch):
    """The probe's steps are undone when it ends; two Ctrl-Cs after its second execution
    left them in the model (3 optimizer steps, no kept one)."""
    from haet import budget as budget_lib

    x, y = data
    original = budget_lib.WallClockBudget.execute
    probes = []

    def execute(self, engine, steps, probe=False):
        losses = original(self, engine, steps, probe)
        probes.append(probe)
        if probes == [True, True]:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # (raises here)
        return losses

    monkeypatch.setattr(budget_lib.WallClockBudget, "execute", execute)
    model = compiled(tiny_model(), keras.optimizers.SGD(schedules.PlannedPiecewiseLinear([0, 0.5, 1], [0, 0.2, 0])))
    before = [np.array(w) for w in model.get_weights()]
    with pytest.raises(KeyboardInterrupt, match="second stop signal"):
        haet.fit(model, x, y, budget_seconds=20 * STEP, batch_size=16, probe_steps=2, verbose=0, clock=clock)
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 0
    for weight, initial in zip(model.get_weights(), before):
        np.testing.assert_array_equal(weight, initial)


def test_a_second_ctrl_c_after_training_keeps_the_weights_a_callback_restored(data, clock, monkeypatch):
    """A callback that writes other weights at the end of training (as
    EarlyStopping(restore_best_weights=True) does): a second Ctrl-C in a later
    callback's on_train_end wrote the last step's weights over them."""
    x, y = data

    class RestoreInitial(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.initial = self.model.get_weights()

        def on_train_end(self, logs=None):
            self.model.set_weights(self.initial)

    class CtrlCTwice(keras.callbacks.Callback):
        def on_train_end(self, logs=None):
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # (raises here)

    restore = RestoreInitial()
    model = compiled(tiny_model())
    with pytest.raises(KeyboardInterrupt, match="second stop signal"):
        haet.fit(model, x, y, epochs=2, batch_size=16, callbacks=[restore, CtrlCTwice()], verbose=0, clock=clock)
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 8  # it trained
    for weight, initial in zip(model.get_weights(), restore.initial):
        np.testing.assert_array_equal(weight, initial)


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="only JAX donates the state to an execution")
def test_a_second_ctrl_c_that_cuts_an_execution_under_jax_says_the_weights_are_lost(data, clock, monkeypatch):
    """Raised while the execution held the state (its donated arrays deleted, the new
    ones not yet returned): nothing can be written back, and the error says so."""
    x, y = data
    original = engine_lib.Engine.run

    def cut(self, steps):
        if len(clock.runs) == 3:
            for values in self._state:
                for value in values:
                    value.delete()  # what donating them to the execution did
            raise cli.SecondStopSignal("second stop signal (SIGINT)", "SIGINT")
        return original(self, steps)

    monkeypatch.setattr(engine_lib.Engine, "run", cut)
    with pytest.raises(KeyboardInterrupt) as stopped:
        haet.fit(compiled(tiny_model()), x, y, budget_seconds=100 * STEP, batch_size=8, steps_per_execution=4,
                 verbose=0, clock=clock)
    assert "the model's weights are lost" in stopped.value.__notes__[0]


def test_one_line_an_epoch_when_verbose(data, capsys):
    x, y = data
    haet.fit(compiled(tiny_model()), x, y, epochs=2, batch_size=32)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["epoch 1", "epoch 2"]
    assert all("| loss " in line and "learning_rate 0.1" in line for line in lines)


@pytest.mark.parametrize("change, message", [
    (dict(model="uncompiled"), "must be a compiled keras.Model"),
    (dict(budget_seconds=None, epochs=None), "Give budget_seconds"),
    (dict(budget_seconds=0), "budget_seconds must be a positive number"),
    (dict(budget_seconds=float("nan")), "budget_seconds must be a positive number"),
    (dict(epochs=1.5), "epochs must be a positive integer"),
    (dict(y="float"), "y: labels must be integers of shape"),
    (dict(y="short"), "y: 64 images but 63 labels"),
    (dict(y="negative"), r"labels must be in \[0, 10\). Received min -1"),
    (dict(y="too_large"), r"labels must be in \[0, 10\). Received min 0, max 10"),
    (dict(batch_size=65), "batch_size=65 must be an integer between 1 and the 64"),
    (dict(learning_rate=0.1), "learning_rate must be a function"),
    (dict(learning_rate=lambda f: -1.0), r"learning rate at 0 of the budget is -1.0"),
    (dict(optimizer="cosine", learning_rate=lambda f: 0.1), "^learning_rate is a wall-clock schedule, but SGD has no "
                                                            "learning-rate variable: it follows a schedule. Pass "
                                                            "learning_rate=None"),
    (dict(optimizer="planned", learning_rate=lambda f: 0.1), "use one of them"),
    (dict(optimizer="planned_used"), "already run 3 steps"),
    (dict(validation_data="mismatch"), "x_val's examples have shape"),
    (dict(callbacks=[print]), "keras.callbacks.Callback instances"),
    (dict(verbose=2), "verbose must be 0 or 1"),
    (dict(steps_per_execution=0), "steps_per_execution must be a positive integer"),
])
def test_bad_arguments_fail_before_any_training(data, change, message):
    x, y = data
    change = dict(change)
    kind = change.pop("optimizer", None)
    optimizer = {"cosine": lambda: keras.optimizers.SGD(keras.optimizers.schedules.CosineDecay(0.1, 100)),
                 "planned": lambda: keras.optimizers.SGD(schedules.PlannedPiecewiseLinear([0, 1], [0.1, 0])),
                 "planned_used": lambda: keras.optimizers.SGD(schedules.PlannedPiecewiseLinear([0, 1], [0.1, 0])),
                 None: lambda: None}[kind]()
    if kind == "planned_used":
        optimizer.iterations.assign(3)  # as after an earlier fit
    model = tiny_model()
    if change.pop("model", None) != "uncompiled":
        compiled(model, optimizer)
    labels = {"float": y.astype("float32"), "short": y[:63], "negative": np.where(np.arange(64) == 5, -1, y[:, 0].astype(int)),
              "too_large": np.where(np.arange(64) == 5, 10, y[:, 0].astype(int))}
    if isinstance(change.get("y"), str):
        y = labels[change.pop("y")]
    if change.get("validation_data") == "mismatch":
        change["validation_data"] = (np.zeros((4, 9, 9, 3), "uint8"), np.zeros(4, int))
    kwargs = dict(budget_seconds=5, batch_size=8, verbose=0)
    kwargs.update(change)
    with pytest.raises(ValueError, match=message):
        haet.fit(model, x, y, **kwargs)
    if getattr(model, "optimizer", None) is not None:
        assert not model.optimizer.built  # nothing trained, nothing built


class ThreeClasses(keras.Model):
    """A subclassed model of 3 classes: no symbolic outputs to read the class count from."""

    def __init__(self):
        super().__init__()
        self.flatten, self.dense = keras.layers.Flatten(), keras.layers.Dense(3)

    def call(self, x):
        return self.dense(self.flatten(keras.ops.cast(x, "float32") / 255.0))


def _two_outputs():
    inputs = keras.Input((8, 8, 3), dtype="uint8")
    features = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
    return keras.Model(inputs, [keras.layers.Dense(10)(features), keras.layers.Dense(2)(features)])


def _units(units, with_input=True):
    layers = [keras.layers.Rescaling(1 / 255), keras.layers.Flatten(), keras.layers.Dense(units)]
    return keras.Sequential(([keras.Input((8, 8, 3), dtype="uint8")] if with_input else []) + layers)


@pytest.mark.parametrize("case, message", [
    ("no_loss", "model was compiled without a loss"),
    ("inf_budget", "budget_seconds=inf with epochs=None would never stop"),
    ("nan_image", r"x\[5\] holds nan or inf"),
    ("no_images", r"x holds no examples \(shape \(0, 8, 8, 3\)\)"),
    ("strings", "x must hold integers or floats"),
    ("ragged", "x must be an array of N examples of one shape"),
    ("other_shape", r"x's examples have shape \(8, 8, 1\), but the model takes \(8, 8, 3\)"),
    ("float_into_uint8", "x is float32, but the model's Input is uint8: the values would be cut"),
    ("one_hot_other_size", "one_hot_classes=3, but the model outputs 10 scores"),
    ("two_outputs", "haet.fit trains models of one output"),
    ("one_unit", r"y \(the model has one output unit: binary labels\): labels must be in \[0, 2\)"),
    ("one_unit_softmax", "outputs one score an example, and its loss is a categorical cross-entropy, which is 0"),
    ("one_unit_by_name", "outputs one score an example, and its loss is a categorical cross-entropy, which is 0"),
    ("subclassed", r"y: labels must be in \[0, 3\). Received min 0, max 9"),
    ("no_input", r"y: labels must be in \[0, 3\). Received min 0, max 9"),
    ("no_input_other_shape", r"The model cannot take x's examples of shape \(8, 8, 3\)"),
    ("huge_execution", r"steps_per_execution=1000000000 would let one execution reach .* pass steps_per_execution "
                       r"<= 8185 \(1024 epochs\)"),
    ("negative_seed", "seed must be an integer >= 0"),
    ("no_seed", "seed must be an integer >= 0"),
    ("one_callback", r"callbacks must be a list of keras.callbacks.Callback instances: pass \[<"),
    ("no_validation_images", "x_val holds no examples"),
    ("rate_of_a_string", "learning_rate failed at 0 of the budget: ValueError: could not convert"),
    ("rate_of_nothing", "learning_rate failed at 0 of the budget: TypeError"),
    ("epochs_true", "epochs must be a positive integer"),
    ("batch_true", "batch_size=True must be an integer"),
])
def test_bad_models_and_inputs_fail_before_any_training(data, case, message):
    """Each of these trained silently to a meaningless result under JAX, failed after
    training started, hung, or failed inside Keras or NumPy without naming the argument."""
    x, y = data
    kwargs = dict(budget_seconds=5, batch_size=8, verbose=0)
    model = {"two_outputs": _two_outputs, "one_unit": lambda: _units(1), "one_unit_softmax": lambda: _units(1),
             "one_unit_by_name": lambda: _units(1), "subclassed": ThreeClasses,
             "no_input": lambda: _units(3, with_input=False),
             "no_input_other_shape": lambda: keras.Sequential([keras.layers.Reshape((8, 8)), keras.layers.Flatten(),
                                                               keras.layers.Dense(10)]),
             }.get(case, tiny_model)()
    if case == "no_loss":
        model.compile(keras.optimizers.SGD(0.1), metrics=["accuracy"])
    elif case == "one_unit":  # binary labels: labels 2..9 are refused
        model.compile(keras.optimizers.SGD(0.1), keras.losses.BinaryCrossentropy(from_logits=True))
    elif case == "one_unit_by_name":
        model.compile(keras.optimizers.SGD(0.1), "categorical_crossentropy")
    else:
        compiled(model, keras.optimizers.SGD(0.1))
    if case == "inf_budget":
        kwargs["budget_seconds"] = math.inf
    elif case == "nan_image":
        model = compiled(tiny_model(dtype="float32"))
        x = x.astype("float32")
        x[5, 1, 2, 0] = np.nan
    elif case == "no_images":
        x, y = x[:0], y[:0]
    elif case == "strings":
        x = x.astype(str)
    elif case == "ragged":
        x = [x[0], x[1, :4]]
    elif case == "other_shape":
        x = x[..., :1]
    elif case == "float_into_uint8":
        x = x.astype("float32") / 255
    elif case == "one_hot_other_size":
        kwargs["one_hot_classes"] = 3
    elif case == "huge_execution":
        kwargs["steps_per_execution"] = 10**9
    elif case in ("negative_seed", "no_seed"):
        kwargs["seed"] = -1 if case == "negative_seed" else None
    elif case == "one_callback":
        kwargs["callbacks"] = keras.callbacks.EarlyStopping()
    elif case == "no_validation_images":
        kwargs["validation_data"] = (x[:0], y[:0])
    elif case == "rate_of_a_string":
        kwargs["learning_rate"] = lambda fraction: "x"
    elif case == "rate_of_nothing":
        kwargs["learning_rate"] = lambda: 0.1
    elif case == "epochs_true":
        kwargs["epochs"] = True
    elif case == "batch_true":
        kwargs["batch_size"] = True
    with pytest.raises(ValueError, match=message):
        haet.fit(model, x, y, **kwargs)
    assert not model.optimizer.built  # nothing trained, nothing built


def test_models_without_symbolic_outputs_one_hot_validation_and_no_callbacks_train(data, cifar10_arrays):
    x, y = data
    y3 = y % 3
    for model in (ThreeClasses(), _units(3, with_input=False)):
        result = haet.fit(compiled(model), x, y3, epochs=1, batch_size=16, callbacks=None, verbose=0)
        assert result.stopped_by == "epochs" and result.steps == 4 and np.isfinite(result.history["loss"][0])
    # Labels as one-hot rows (label smoothing) with validation: the validation labels go to the loss as one-hot
    # rows too (it failed with "target.shape=(None,), output.shape=(None, 10)").
    model = tiny_model()
    model.compile(keras.optimizers.SGD(0.1), keras.losses.CategoricalCrossentropy(from_logits=True,
                                                                                  label_smoothing=0.1),
                  metrics=["categorical_accuracy"])
    x_val, y_val = cifar10_arrays[2][:40, :8, :8], cifar10_arrays[3][:40]
    result = haet.fit(model, x, y, epochs=1, batch_size=16, one_hot_classes=10, validation_data=(x_val, y_val),
                      verbose=0)
    one_hot = keras.ops.one_hot(y_val, 10)
    scores = model.evaluate(x_val, one_hot, batch_size=16, verbose=0, return_dict=True)
    assert result.history["val_loss"][-1] == pytest.approx(scores["loss"], rel=1e-5)
    assert result.history["val_categorical_accuracy"][-1] == pytest.approx(scores["categorical_accuracy"])
