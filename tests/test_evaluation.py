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


def test_labels_as_keras_datasets_gives_them_score_the_same_and_bad_ones_are_refused(monkeypatch):
    """(N, 1) labels (keras.datasets) broadcast against the predictions: accuracy over
    N**2 pairs, a confusion matrix counting N**2. Label -1 counted as the last class,
    logits passed as probabilities gave a loss of hundreds."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 10))
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = rng.integers(0, 10, 64)
    flat = evaluation.scores(probabilities, y, 10)
    column = evaluation.scores(probabilities, y[:, None], 10)
    assert column["accuracy"] == flat["accuracy"] == np.mean(probabilities.argmax(1) == y)
    assert column["loss"] == flat["loss"] and column["confusion_matrix"].sum() == 64
    np.testing.assert_array_equal(column["confusion_matrix"], flat["confusion_matrix"])
    assert evaluation.cross_entropy(logits, y[:, None]) == pytest.approx(flat["loss"], rel=1e-12)
    _, whole = evaluation.ensemble(np.stack([probabilities, probabilities]), y[:, None], 10)
    assert whole["accuracy"] == flat["accuracy"]
    for bad_probabilities, labels, message in [
            (probabilities, np.where(y == 3, -1, y), r"labels must be in \[0, 10\). Received min -1"),
            (probabilities, y.astype("float32"), "labels must be integers of shape"),
            (probabilities, y[:60], "64 images but 60 labels"),
            (logits, y, r"rows of class probabilities .* \(logits\? pass their softmax\)"),
            (probabilities[:, :9] / probabilities[:, :9].sum(1, keepdims=True), y % 9, "9 columns for num_classes=10"),
            (probabilities[0], y[:1], r"must be \(N, K\)")]:
        with pytest.raises(ValueError, match=message):
            evaluation.scores(bad_probabilities, labels, 10)
    # evaluate refuses bad labels before it predicts anything.
    monkeypatch.setattr(evaluation, "predict_probabilities", lambda *a, **k: pytest.fail("predicted"))
    with pytest.raises(ValueError, match=r"evaluate's labels: labels must be in \[0, 10\)"):
        evaluation.evaluate(None, np.zeros((64, 4, 4, 3), "uint8"), y + 1, 10, 32)


def test_predicting_in_batches_of_no_images_is_refused():
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(3)(inputs))
    for batch_size in (-1, 0, True):  # -1 returned no rows; 0 a range() error
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            evaluation.predict_logits(model, np.zeros((4, 2), "float32"), batch_size)
    assert evaluation.predict_logits(model, np.zeros((4, 2), "float32"), 3).shape == (4, 3)


def test_tta_views():
    x = np.arange(2 * 4 * 4 * 1, dtype=np.uint8).reshape(2, 4, 4, 1)
    assert len(evaluation.tta_views(x, "none")[0]) == 1
    (plain, flipped), weights, space = evaluation.tta_views(x, "flip")
    np.testing.assert_array_equal(flipped[:, :, ::-1], x)
    assert weights == [0.5, 0.5] and space == "logits"
    views, weights, _ = evaluation.tta_views(x, "flip_translate")
    assert len(views) == 6 and all(v.shape == x.shape for v in views) and math.isclose(sum(weights), 1.0)
    # Shifted by (2, 2): output pixel (0, 0) shows input pixel (2, 2).
    assert views[1][0, 0, 0, 0] == x[0, 2, 2, 0]
    # airbench: the image and its mirror, unshifted (0.25 each), shifted by -1 and +1 pixel
    # with reflect padding (0.125 each), combined on logits.
    views, weights, space = evaluation.tta_views(x, "airbench")
    assert weights == [0.25, 0.25, 0.125, 0.125, 0.125, 0.125] and space == "logits"
    np.testing.assert_array_equal(views[0], x)
    np.testing.assert_array_equal(views[1], x[:, :, ::-1])
    assert views[2][0, 1, 1, 0] == x[0, 0, 0, 0] and views[2][0, 0, 0, 0] == x[0, 1, 1, 0]  # reflect: row -1 = row 1
    assert views[4][0, 0, 0, 0] == x[0, 1, 1, 0] and views[4][0, 3, 3, 0] == x[0, 2, 2, 0]
    # The mirror image of each shift, as airbench's infer_mirror of each translate (it was the
    # mirror image shifted by the same pixels: a shift the other way along the columns).
    np.testing.assert_array_equal(views[3], views[2][:, :, ::-1])
    np.testing.assert_array_equal(views[5], views[4][:, :, ::-1])
    with pytest.raises(ValueError, match="Unknown test-time augmentation 'rotate'"):
        evaluation.tta_views(x, "rotate")


def test_flip_tta_averages_logits_as_page():
    # A "model" that looks only at the left column: flipping changes its answer. Page's
    # forward_tta averages logits; the mean of the probabilities (haet's before) gives
    # another loss: -log((sigmoid(2) + sigmoid(-6)) / 2) = 0.818 against 2.127.
    inputs = keras.Input((2, 2, 1))
    left = keras.layers.Lambda(lambda t: keras.ops.stack([t[:, 0, 0, 0], -t[:, 0, 0, 0]], axis=1))(inputs)
    model = keras.Model(inputs, left)
    x = np.array([[[[1.0], [-3.0]], [[0.0], [0.0]]]], "float32")
    plain = evaluation.evaluate(model, x, np.array([0]), 2, batch_size=1)
    both = evaluation.evaluate(model, x, np.array([0]), 2, batch_size=1, tta="flip")
    assert plain["accuracy"] == 1.0 and both["accuracy"] == 0.0  # mean logits (1, -1) and (-3, 3): (-1, 1)
    assert math.isclose(both["loss"], math.log(1 + math.exp(2)), rel_tol=1e-5)


def test_airbench_tta_weights_logits_not_probabilities():
    # A "model" whose logits are (v, -v) for the top-left pixel v: the combined logit is the
    # weighted mean of v over the six views, so the answer follows its sign.
    inputs = keras.Input((3, 3, 1))
    corner = keras.layers.Lambda(lambda t: keras.ops.stack([t[:, 0, 0, 0], -t[:, 0, 0, 0]], axis=1))(inputs)
    model = keras.Model(inputs, corner)
    x = np.zeros((1, 3, 3, 1), "float32")
    x[0, 0, 0, 0], x[0, 0, 2, 0], x[0, 1, 1, 0] = 8.0, -1.0, -1.0
    views, weights, _ = evaluation.tta_views(x, "airbench")
    mean_logit = sum(w * v[0, 0, 0, 0] for w, v in zip(weights, views))
    probabilities = evaluation.predict_probabilities(model, x, 1, "airbench")
    expected = 1 / (1 + math.exp(-2 * mean_logit))
    assert math.isclose(probabilities[0, 0], expected, rel_tol=1e-6)
