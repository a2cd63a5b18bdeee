import keras
import numpy as np
import pytest

from haet.layers import CELU, GhostBatchNormalization


def test_ghost_batch_norm_normalizes_each_group_and_tracks_the_mean_statistics():
    rng = np.random.default_rng(0)
    # Two groups with different means: each is normalized on its own statistics.
    x = np.concatenate([rng.normal(5.0, 2.0, (4, 3, 3, 2)), rng.normal(-1.0, 0.5, (4, 3, 3, 2))]).astype("float32")
    layer = GhostBatchNormalization(num_splits=2, momentum=0.0, epsilon=0.0)
    y = np.asarray(layer(x, training=True))
    for group in (y[:4], y[4:]):
        np.testing.assert_allclose(group.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
        np.testing.assert_allclose(group.var(axis=(0, 1, 2)), 1.0, atol=1e-4)
    # momentum 0: the moving statistics are the mean of the two groups' statistics.
    expected_mean = (x[:4].mean(axis=(0, 1, 2)) + x[4:].mean(axis=(0, 1, 2))) / 2
    expected_var = (x[:4].var(axis=(0, 1, 2)) + x[4:].var(axis=(0, 1, 2))) / 2
    np.testing.assert_allclose(np.asarray(layer.moving_mean), expected_mean, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(layer.moving_variance), expected_var, rtol=1e-5)
    inference = np.asarray(layer(x, training=False))
    np.testing.assert_allclose(inference, (x - expected_mean) / np.sqrt(expected_var), rtol=1e-4, atol=1e-5)


def test_one_split_equals_keras_batch_norm():
    x = np.random.default_rng(1).normal(size=(8, 4, 4, 3)).astype("float32")
    ours = GhostBatchNormalization(1, momentum=0.9, epsilon=1e-3)
    theirs = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-3)
    np.testing.assert_allclose(np.asarray(ours(x, training=True)), np.asarray(theirs(x, training=True)), atol=1e-5)
    np.testing.assert_allclose(np.asarray(ours.moving_variance), np.asarray(theirs.moving_variance), rtol=1e-5)


def test_frozen_scale_is_not_trained_and_bad_splits_rejected():
    layer = GhostBatchNormalization(2, scale=False)
    layer.build((None, 4))
    assert [w.name for w in layer.trainable_weights] == ["beta"]
    with pytest.raises(ValueError, match="num_splits must be a positive integer. Received: num_splits=0"):
        GhostBatchNormalization(0)
    for kwargs, message in [(dict(num_splits=True), "num_splits must be"), (dict(momentum=1.5), "momentum must be"),
                            (dict(momentum=float("nan")), "momentum must be"),
                            (dict(epsilon=-1.0), "epsilon must be")]:  # epsilon -1 normalized to nan
        with pytest.raises(ValueError, match=message):
            GhostBatchNormalization(**kwargs)
    # NumPy scalars (what arrays give) are numbers like Python's; a bool is not (they were refused once the
    # checks moved to haet.fields, which took only int and float).
    GhostBatchNormalization(np.int64(2), momentum=np.float32(0.9), epsilon=np.float64(1e-5))
    with pytest.raises(ValueError, match="num_splits must be a positive integer"):
        GhostBatchNormalization(np.float32(2.0))
    from haet import averaging, fields, models

    averaging.Lookahead(total_steps=100, power=np.float32(1))
    models.resnet9(width_multiplier=0.125, logit_scale=np.float32(0.125))
    assert fields.is_number(np.float32(0.5)) and fields.is_number(np.int8(3)) and not fields.is_number(True)
    assert not fields.is_number(np.float32("nan")) and not fields.is_number("1")
    # A batch that does not split into equal ghost batches: named, not a reshape error.
    with pytest.raises(ValueError, match="a training batch of 6 is not a multiple of num_splits=4"):
        GhostBatchNormalization(4)(np.zeros((6, 4), "float32"), training=True)


def test_celu_known_values():
    y = np.asarray(CELU(0.3)(np.array([-1.0, 0.0, 2.0], "float32")))
    np.testing.assert_allclose(y, [0.3 * (np.exp(-1 / 0.3) - 1), 0.0, 2.0], rtol=1e-6)
    with pytest.raises(ValueError, match="alpha must be positive"):
        CELU(0.0)
