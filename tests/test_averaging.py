"""The moving average of the weights and batch-norm statistics, updated inside the compiled step."""

import keras
import numpy as np
import pytest

from haet.averaging import ExponentialMovingAverage, batch_norm_statistics
from haet.engine import make_engine
from haet.hooks import MovingAverage


def _model():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((8, 8, 3), dtype="uint8")
    h = keras.layers.Rescaling(1 / 255)(inputs)
    h = keras.layers.Conv2D(6, 3)(h)
    h = keras.layers.BatchNormalization(momentum=0.5)(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    outputs = keras.layers.Dense(4)(h)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.SGD(0.5, momentum=0.9), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=True)
    return model


def _data(n=40):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 8, 8, 3)).astype("uint8"), rng.integers(0, 4, n)


def _values(variables):
    return [keras.ops.convert_to_numpy(v.value).copy() for v in variables]


def _trace(average, steps, k=1):
    """Trains `steps` steps in executions of `k`; returns the engine, the averaged
    sources' values before training and after every execution, and the averages."""
    x, y = _data()
    model = _model()
    engine = make_engine(model, x, y, 4, steps_per_execution=k, averages=[average])
    sources = [*model.trainable_variables, *batch_norm_statistics(model)]
    seen = [_values(sources)]
    done, epoch = 0, 0
    while done < steps:
        if not engine.steps_left_in_epoch or engine.epoch is None:
            engine.start_epoch(epoch)
            epoch += 1
        run = min(k, steps - done, engine.steps_left_in_epoch)
        engine.run(run)
        done += run
        engine.sync()
        seen.append(_values(sources))
    return engine, seen, _values(average.averages)


def _expected(seen, decay, every=1, warmup=True):
    """The average of the values after each step, computed here in NumPy."""
    average = [v.astype(np.float64) for v in seen[0]]
    for step, values in enumerate(seen[1:], start=1):
        if step % every:
            continue
        n = step // every - 1
        d = decay ** every
        if warmup:
            d = min(d, (1 + n) / (10 + n))
        average = [d * a + (1 - d) * v for a, v in zip(average, values)]
    return average


def test_the_average_follows_its_formula_with_warmup_every_k_steps_and_statistics():
    average = ExponentialMovingAverage(0.9, every_steps=3, warmup=True, statistics=True)
    engine, seen, got = _trace(average, 9)
    assert len(got) == len(engine.model.trainable_variables) + 2  # + the BN moving mean and variance
    for a, b in zip(got, _expected(seen, 0.9, every=3)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert int(keras.ops.convert_to_numpy(average.steps.value)) == 9


def test_executions_of_several_steps_average_as_single_steps_do():
    one = _trace(ExponentialMovingAverage(0.8, every_steps=2), 8, k=1)[2]
    fused = _trace(ExponentialMovingAverage(0.8, every_steps=2), 8, k=8)[2]
    for a, b in zip(one, fused):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_after_20_steps_the_warmed_up_average_is_near_the_raw_weights_not_the_initial_ones():
    """Decay 0.998 (a horizon of 500 steps): with the warm-up, 20 steps put the average
    next to the trained weights; without it (Keras' use_ema), next to the initial ones."""
    def distances(warmup):
        engine, seen, got = _trace(ExponentialMovingAverage(0.998, warmup=warmup), 20, k=5)
        kernels = range(len(engine.model.trainable_variables))
        flat = [np.concatenate([values[i].ravel() for i in kernels]) for values in (seen[0], seen[-1], got)]
        initial, raw, averaged = flat
        return np.linalg.norm(averaged - raw), np.linalg.norm(averaged - initial), np.linalg.norm(raw - initial)

    to_raw, to_initial, moved = distances(warmup=True)
    assert moved > 0.1
    assert to_raw < 0.3 * moved and to_initial > 0.7 * moved
    to_raw, to_initial, _ = distances(warmup=False)
    assert to_initial < 0.1 * moved and to_raw > 0.9 * moved


def test_without_statistics_only_the_weights_are_averaged_and_the_hook_writes_the_average_in():
    average = ExponentialMovingAverage(0.5, statistics=False)
    engine, seen, got = _trace(average, 4)
    model = engine.model
    assert len(got) == len(model.trainable_variables)
    statistics_before = _values(batch_norm_statistics(model))
    hook = MovingAverage(average)
    hook.on_train_end(type("Run", (), {"engine": engine})())
    for variable, value in zip(model.trainable_variables, got):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(variable.value), value, rtol=1e-6)
    for variable, value in zip(batch_norm_statistics(model), statistics_before):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable.value), value)
    raw_trainable, raw_non_trainable = hook.raw_weights
    for a, b in zip(raw_trainable, seen[-1]):
        np.testing.assert_allclose(a, b)
    assert len(raw_non_trainable) == len(model.non_trainable_variables)


def test_snapshots_hold_the_averages():
    average = ExponentialMovingAverage(0.5)
    engine, _, got = _trace(average, 4)
    snapshot = engine.snapshot()
    assert len(snapshot) == len(engine.variable_paths())
    assert any(path.startswith("ema_") for path in engine.variable_paths())
    engine.start_epoch(1)
    engine.run(1)
    engine.restore(snapshot)
    engine.sync()
    for a, b in zip(_values(average.averages), got):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kwargs, message", [
    (dict(decay=1.0), "decay must be in"), (dict(decay=0.9, every_steps=0), "every_steps"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ExponentialMovingAverage(**kwargs)


def test_recomputed_statistics_are_the_mean_of_the_batch_statistics():
    from haet.averaging import recompute_batch_norm_statistics

    model = _model()
    x, _ = _data(12)
    bn = model.get_layer(index=3)
    features = keras.Model(model.inputs, bn.input)  # the conv's output, what the BN normalizes
    used = recompute_batch_norm_statistics(model, x, batch_size=4, max_images=8, seed=1)
    assert used == 8 and bn.momentum == 0.5  # restored
    chosen = np.random.default_rng(1).permutation(12)[:8]
    batches = [np.asarray(features(x[np.sort(chosen[i:i + 4])]), np.float64) for i in (0, 4)]
    mean = np.mean([b.mean(axis=(0, 1, 2)) for b in batches], axis=0)
    variance = np.mean([b.var(axis=(0, 1, 2)) for b in batches], axis=0)
    np.testing.assert_allclose(np.asarray(bn.moving_mean.value), mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(bn.moving_variance.value), variance, rtol=1e-4, atol=1e-6)
    # Fewer images than a batch: all of them, and the count says so (it said 32 for 10).
    assert recompute_batch_norm_statistics(model, x[:10], batch_size=32) == 10
    assert recompute_batch_norm_statistics(model, x, batch_size=4, max_images=2) == 4  # one whole batch
    before = np.asarray(bn.moving_mean.value).copy()
    for images, kwargs, message in [(x[:0], {}, "received none"),  # the statistics became NaN
                                    (x, dict(batch_size=0), "batch_size must be a positive integer"),
                                    (x, dict(batch_size=-2), "batch_size must be a positive integer"),
                                    (x, dict(max_images=0), "max_images must be a positive integer")]:
        with pytest.raises(ValueError, match=message):
            recompute_batch_norm_statistics(model, images, **{"batch_size": 4, **kwargs})
    np.testing.assert_array_equal(np.asarray(bn.moving_mean.value), before)
