import math

import keras
import numpy as np

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
