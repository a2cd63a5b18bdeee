"""The engine computes what Keras' own step computes, on resident data, with one compile."""

import keras
import numpy as np
import pytest

from haet.augment import RandomCropFlipCutout
from haet.engine import Predictor, _batch, current_weights, epoch_permutation, make_engine


def _model(seed=1, ema=True, learning_rate=0.1):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3), dtype="uint8")
    h = keras.layers.Rescaling(1 / 255)(inputs)
    h = RandomCropFlipCutout(1, True, 2, seed=3)(h)
    h = keras.layers.Conv2D(6, 3)(h)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.Dropout(0.3, seed=5)(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    outputs = keras.layers.Dense(4, kernel_regularizer=keras.regularizers.L2(1e-3))(h)
    model = keras.Model(inputs, outputs)
    optimizer = keras.optimizers.SGD(learning_rate, momentum=0.9, use_ema=ema, ema_momentum=0.5)
    model.compile(optimizer, keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1),
                  metrics=["accuracy"], jit_compile=True)
    return model


def _data(n=20):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 8, 8, 3)).astype("uint8"), rng.integers(0, 4, n)


def _train(engine, epochs, k):
    losses = []
    for epoch in range(epochs):
        engine.start_epoch(epoch)
        while engine.steps_left_in_epoch:
            losses += list(engine.run(min(k, engine.steps_left_in_epoch)))
    return losses


LOOPS = ["fused", "dispatch"] if keras.backend.backend() == "jax" else ["auto"]


@pytest.mark.parametrize("loop", LOOPS)
def test_engine_steps_equal_keras_train_on_batch_on_the_same_batches(loop):
    """Executions of 3 steps (and a last of 2) over two epochs, augmentation, dropout,
    batch norm, label smoothing, weight decay, momentum and EMA included: the same
    weights, statistics and optimizer state as Keras' own step fed those batches."""
    x, y = _data()
    ours = _model()
    engine = make_engine(ours, x, y, 4, seed=7, one_hot_classes=4, steps_per_execution=3, execution_loop=loop)
    running = _train(engine, 2, 3)
    engine.sync()
    theirs = _model()
    step_losses = []
    for epoch in range(2):
        order = epoch_permutation(7, epoch, 20)
        for s in range(5):
            batch = order[s * 4:(s + 1) * 4]
            logs = theirs.train_on_batch(x[batch], keras.utils.to_categorical(y[batch], 4), return_dict=True)
            step_losses.append(logs["loss"])
    for a, b in zip([*ours.weights, *ours.optimizer.variables], [*theirs.weights, *theirs.optimizer.variables]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6, err_msg=a.path)
    # The engine reports the epoch's running mean after each step; Keras reset per batch here.
    expected = [np.mean(step_losses[e * 5:e * 5 + k + 1]) for e in range(2) for k in range(5)]
    np.testing.assert_allclose(running, expected, rtol=1e-5)
    assert engine.epoch_metrics()["loss"] == pytest.approx(expected[-1], rel=1e-5)
    assert 0.0 <= engine.epoch_metrics()["accuracy"] <= 1.0


@pytest.mark.parametrize("loop", LOOPS)
def test_executions_across_epoch_ends_train_as_epoch_by_epoch(loop):
    """Executions of 7 steps over epochs of 5 (7, 7, 1 steps: epoch ends at the 5th
    step of the first execution, the 3rd of the second and the last step) give the
    same weights, per-step running losses, per-epoch metrics and learning rates (a
    decaying schedule) as executions cut at each epoch's end; one compilation."""
    x, y = _data()

    def model():
        return _model(learning_rate=keras.optimizers.schedules.PolynomialDecay(0.1, 20, 0.01))

    by_epoch = make_engine(model(), x, y, 4, seed=7, one_hot_classes=4, steps_per_execution=7,
                           execution_loop=loop, span_epochs=False)
    assert not by_epoch.spans_epochs
    expected_losses, expected_ends = [], []
    for epoch in range(3):
        by_epoch.start_epoch(epoch)
        while by_epoch.steps_left_in_epoch:
            expected_losses += list(by_epoch.run(min(7, by_epoch.steps_left_in_epoch)))
        expected_ends.append((by_epoch.epoch_metrics(), by_epoch.learning_rate))
        assert [e.epoch for e in by_epoch.take_ended_epochs()] == [epoch]
    by_epoch.sync()

    spanning = make_engine(model(), x, y, 4, seed=7, one_hot_classes=4, steps_per_execution=7,
                           execution_loop=loop)
    assert spanning.spans_epochs and spanning.steps_allowed() == 7
    spanning.start_epoch(0)
    losses = list(spanning.run(7))
    assert (spanning.epoch, spanning.step_in_epoch) == (1, 2)
    losses += list(spanning.run(7))
    np.testing.assert_array_equal(spanning.step_epochs, [1, 1, 1, 2, 2, 2, 2])
    np.testing.assert_array_equal(spanning.step_positions, [3, 4, 5, 1, 2, 3, 4])
    losses += list(spanning.run(1))
    assert (spanning.epoch, spanning.step_in_epoch) == (2, 5)
    ends = spanning.take_ended_epochs()
    assert [(e.epoch, e.steps, e.after_steps) for e in ends] == [(0, 5, 5), (1, 5, 3), (2, 5, 1)]
    assert spanning.take_ended_epochs() == []
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-6)
    for end, (logs, learning_rate) in zip(ends, expected_ends):
        assert end.logs.keys() == logs.keys()
        for name in logs:
            assert end.logs[name] == pytest.approx(logs[name], rel=1e-6), name
        assert end.learning_rate == pytest.approx(learning_rate, rel=1e-6)
    assert len({e.learning_rate for e in ends}) == 3  # the schedule moved
    spanning.sync()
    for a, b in zip([*spanning.model.weights, *spanning.model.optimizer.variables],
                    [*by_epoch.model.weights, *by_epoch.model.optimizer.variables]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6, err_msg=a.path)
    # An execution from an epoch's end goes on with the next epoch.
    spanning.run(2)
    assert (spanning.epoch, spanning.step_in_epoch) == (3, 2)
    if keras.backend.backend() == "jax":
        assert (spanning._fused if loop == "fused" else spanning._step)._cache_size() == 1
    else:
        assert spanning._execution.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("loop", LOOPS)
def test_executions_of_any_length_share_one_compiled_program(loop):
    x, y = _data(40)
    model = _model(ema=False)
    engine = make_engine(model, x, y, 4, one_hot_classes=4, steps_per_execution=8, execution_loop=loop)
    snapshot = engine.snapshot()
    engine.start_epoch(0)
    for steps in (1, 8, 1):
        engine.run(steps)
    engine.assign(model.optimizer.variables[1], 0.05)  # the learning rate
    engine.start_epoch(1)
    engine.run(3)
    engine.restore(snapshot)
    engine.start_epoch(0)
    engine.run(2)
    if keras.backend.backend() == "jax":
        assert (engine._fused if loop == "fused" else engine._step)._cache_size() == 1
    else:
        assert engine._execution.experimental_get_tracing_count() == 1
    engine.sync()
    assert float(np.asarray(model.optimizer.learning_rate)) == pytest.approx(0.1)  # restored


def test_reload_keeps_the_arrays_nothing_replaced():
    x, y = _data()
    model = _model(ema=False)
    engine = make_engine(model, x, y, 4, one_hot_classes=4)
    engine.start_epoch(0)
    engine.run(2)
    engine.sync()
    held = [list(group) for group in engine._state] if keras.backend.backend() == "jax" else None
    model.reset_metrics()  # replaces the metrics' values only
    engine.reload()
    if held is not None:
        assert all(a is b for a, b in zip(held[0], engine._state[0]))  # weights: not committed again
        assert not any(a is b for a, b in zip(held[3], engine._state[3]))  # metrics: the new zeros
    engine.run(2)
    assert engine.epoch_metrics()["loss"] > 0


def test_read_gives_a_variable_as_the_state_holds_it():
    x, y = _data()
    model = _model(ema=False)
    engine = make_engine(model, x, y, 4, one_hot_classes=4, steps_per_execution=3)
    engine.start_epoch(0)
    engine.run(3)
    assert int(engine.read(model.optimizer.iterations)) == 3  # without a sync
    engine.assign(model.optimizer.iterations, 7)
    assert int(engine.read(model.optimizer.iterations)) == 7
    engine.sync()
    assert int(engine.read(model.optimizer.iterations)) == 7


@pytest.mark.parametrize("loop", LOOPS)
def test_a_new_epoch_starts_its_metrics_afresh_in_the_state_and_the_model(loop):
    """After `start_epoch` the model's metric variables hold their initial values too,
    so a hook that writes a variable and reloads (as the loop's hooks do between the
    epoch end's sync and the next execution) keeps the reset: the epoch's first step
    counts alone, not on top of the last epoch's."""
    x, y = _data()
    model = _model(ema=False)
    engine = make_engine(model, x, y, 4, one_hot_classes=4, execution_loop=loop)
    counts = [v for v in model.metrics_variables if v.path.endswith("count")]
    engine.start_epoch(0)
    engine.run(1)
    engine.sync()
    one_step = [float(np.asarray(v.value)) for v in counts]
    engine.reload()
    engine.run(2)
    engine.sync()  # the loop's epoch end
    engine.reload()
    engine.start_epoch(1)
    for variable in model.metrics_variables:
        np.testing.assert_array_equal(np.asarray(variable.value), np.zeros(variable.shape))
    bias = model.layers[-1].bias
    bias.assign(np.asarray(bias.value) + 0.0)  # a hook's write...
    engine.reload()  # ...read back
    engine.run(1)
    engine.sync()
    assert counts and one_step[0] > 0 and [float(np.asarray(v.value)) for v in counts] == one_step


def test_restore_replays_the_same_steps():
    x, y = _data()
    model = _model()
    engine = make_engine(model, x, y, 4, one_hot_classes=4)
    snapshot = engine.snapshot()
    first = _train(engine, 1, 5)
    engine.sync()
    weights = [np.array(w) for w in model.get_weights()]
    engine.restore(snapshot)
    assert _train(engine, 1, 5) == first
    engine.sync()
    for a, b in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("loop", LOOPS)
def test_no_host_to_device_copy_per_step(loop):
    if keras.backend.backend() != "jax":
        pytest.skip("JAX transfer guards")
    import jax

    x, y = _data(40)
    engine = make_engine(_model(ema=False), x, y, 4, one_hot_classes=4, steps_per_execution=10, execution_loop=loop)
    engine.start_epoch(0)
    engine.run(1)  # compile
    # Only the execution's start and length cross, explicitly; no batch is copied.
    with jax.transfer_guard_host_to_device("disallow"):
        engine.run(9)


def test_batches_are_gathered_from_the_epoch_copy_and_its_labels():
    images = np.arange(6 * 2, dtype=np.uint8).reshape(6, 2, 1, 1) // 2  # 2 copies of 3 images, values 0..5
    labels = np.array([7, 8, 9])
    order = np.array([2, 0, 1], np.int32) + 3  # epoch 1 reads copy 1
    x, y = _batch(images, labels, order, 1, 2, 3, None)
    np.testing.assert_array_equal(np.asarray(x)[:, 0, 0, 0], [3, 4])
    np.testing.assert_array_equal(np.asarray(y), [7, 8])
    _, one_hot = _batch(images, labels % 4, order, 0, 1, 3, 4)
    np.testing.assert_array_equal(np.asarray(one_hot), [[0, 1, 0, 0]])


def test_permutations_depend_on_seed_and_epoch_only():
    a = epoch_permutation(3, 5, 100)
    assert sorted(a) == list(range(100)) and a.dtype == np.int32
    np.testing.assert_array_equal(a, epoch_permutation(3, 5, 100))
    assert not np.array_equal(a, epoch_permutation(3, 6, 100))
    assert not np.array_equal(a, epoch_permutation(4, 5, 100))


def test_bad_engine_arguments_and_calls():
    x, y = _data()
    model = _model(ema=False)
    with pytest.raises(ValueError, match="batch_size=21 must be between 1 and the 20"):
        make_engine(model, x, y, 21)
    with pytest.raises(ValueError, match="steps_per_execution must be a positive integer. Received: 0"):
        make_engine(model, x, y, 4, steps_per_execution=0)
    with pytest.raises(ValueError, match="copies=2 copies of the 20 labelled images. Received 20"):
        make_engine(model, x, y, 4, copies=2)
    with pytest.raises(ValueError, match="Unknown execution_loop 'eager'"):
        make_engine(model, x, y, 4, execution_loop="eager")
    uncompiled = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="must be compiled"):
        make_engine(uncompiled, x, y, 4)
    with pytest.raises(ValueError, match="span_epochs must be None, True or False. Received: 'yes'"):
        make_engine(model, x, y, 4, span_epochs="yes")
    engine = make_engine(model, x, y, 4, one_hot_classes=4, steps_per_execution=2, span_epochs=False)
    with pytest.raises(RuntimeError, match="start_epoch"):
        engine.run(1)
    engine.start_epoch(0)
    with pytest.raises(ValueError, match=r"steps must be in \[1, 2\]"):
        engine.run(3)
    with pytest.raises(ValueError, match=r"steps must be in \[1, 2\].*Received: 1.5"):
        engine.run(1.5)
    engine.run(2)
    engine.run(2)
    with pytest.raises(ValueError, match=r"steps must be in \[1, 1\] .*1 left in the epoch\)"):
        engine.run(2)


def test_predictor_scores_given_weights_without_touching_the_model():
    x, y = _data(23)
    model = _model(ema=False)
    engine = make_engine(model, x, y, 4, one_hot_classes=4)
    before = current_weights(model)
    before = ([np.array(v) for v in before[0]], [np.array(v) for v in before[1]])
    _train(engine, 1, 5)
    engine.sync()
    predictor = Predictor(model)
    expected = np.asarray(model(x, training=False))
    np.testing.assert_allclose(predictor(x, 10), expected, rtol=1e-5, atol=1e-6)  # 23 = 10 + 10 + 3 (padded)
    trained = [np.array(w) for w in model.get_weights()]
    old = predictor(x, 10, weights=before)
    assert not np.allclose(old, expected)
    for a, b in zip(trained, model.get_weights()):
        np.testing.assert_array_equal(a, b)  # the model kept its own weights
    fresh = _model(ema=False)
    np.testing.assert_allclose(old, np.asarray(fresh(x, training=False)), rtol=1e-5, atol=1e-6)
