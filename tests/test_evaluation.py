import math

import keras
import numpy as np
import pytest

from haet import evaluation


def test_cross_entropy_known_values():
    # Uniform logits over 4 classes: ln 4. A confident right answer: ~0.
    assert math.isclose(evaluation.cross_entropy(np.zeros((3, 4)), np.array([0, 1, 2])), math.log(4))
    assert evaluation.cross_entropy(np.array([[100.0, 0.0]]), np.array([0])) < 1e-30
    assert math.isclose(evaluation.cross_entropy(np.array([[0.0, math.log(3)]]), np.array([0])), math.log(4))


def test_confusion_matrix_counts():
    m = evaluation.confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2], 3)
    np.testing.assert_array_equal(m, [[1, 1, 0], [0, 1, 0], [1, 0, 2]])


def test_evaluate_matches_keras_on_a_fixed_model():
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(3, kernel_initializer="ones", bias_initializer="zeros")(inputs))
    model.get_layer(index=1).set_weights([np.array([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]], "float32"),
                                          np.zeros(3, "float32")])
    x = np.array([[2.0, 0.0], [0.0, 2.0], [-2.0, 0.0], [1.0, 0.0]], "float32")
    y = np.array([0, 1, 2, 1])
    result = evaluation.evaluate(model, x, y, 3, batch_size=2)
    assert result["accuracy"] == 0.75
    np.testing.assert_array_equal(result["confusion_matrix"], [[1, 0, 0], [1, 1, 0], [0, 0, 1]])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, model.predict(x, verbose=0))
    assert math.isclose(result["loss"], float(loss), rel_tol=1e-5)


def test_tta_views():
    x = np.arange(2 * 4 * 4 * 1, dtype=np.uint8).reshape(2, 4, 4, 1)
    assert len(evaluation.tta_views(x, "none")) == 1
    plain, flipped = evaluation.tta_views(x, "flip")
    np.testing.assert_array_equal(flipped[:, :, ::-1], x)
    views = evaluation.tta_views(x, "flip_translate")
    assert len(views) == 6 and all(v.shape == x.shape for v in views)
    # Shifted by (2, 2): output pixel (0, 0) shows input pixel (2, 2).
    assert views[1][0, 0, 0, 0] == x[0, 2, 2, 0]
    with pytest.raises(ValueError, match="Unknown test-time augmentation 'rotate'"):
        evaluation.tta_views(x, "rotate")


def test_flip_tta_averages_probabilities():
    # A "model" that looks only at the left column: flipping changes its answer.
    inputs = keras.Input((2, 2, 1))
    left = keras.layers.Lambda(lambda t: keras.ops.stack([t[:, 0, 0, 0], -t[:, 0, 0, 0]], axis=1))(inputs)
    model = keras.Model(inputs, left)
    x = np.array([[[[1.0], [-3.0]], [[0.0], [0.0]]]], "float32")
    plain = evaluation.evaluate(model, x, np.array([0]), 2, batch_size=1)
    both = evaluation.evaluate(model, x, np.array([0]), 2, batch_size=1, tta="flip")
    assert plain["accuracy"] == 1.0 and both["accuracy"] == 0.0  # mean of p(0)=0.88 and 0.0025
    p0 = (1 / (1 + math.exp(-2)) + 1 / (1 + math.exp(6))) / 2
    assert math.isclose(both["loss"], -math.log(p0), rel_tol=1e-5)
