"""Test-set evaluation from one pass of predictions: accuracy, loss, confusion matrix."""

import numpy as np


def predict_logits(model, images, batch_size):
    """Logits of `model` on `images` (uint8 or float `(N, H, W, C)`): float32 `(N, classes)`."""
    return np.asarray(model.predict(images, batch_size=batch_size, verbose=0), dtype=np.float32)


def cross_entropy(logits, labels):
    """Mean softmax cross-entropy (nats) of float `(N, K)` logits against int `(N,)` labels.

    Unlike `model.evaluate`'s loss, it holds no weight-decay penalty.
    """
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def confusion_matrix(labels, predictions, num_classes):
    """int64 `(num_classes, num_classes)`: row = true class, column = predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels), np.asarray(predictions)), 1)
    return matrix


def evaluate(model, images, labels, num_classes, batch_size):
    """Accuracy (fraction), cross-entropy and confusion matrix of `model` on a test set.

    Returns:
        dict with `accuracy` (float), `loss` (float, nats) and `confusion_matrix`
        (int64 `(num_classes, num_classes)`).
    """
    logits = predict_logits(model, images, batch_size)
    predictions = logits.argmax(axis=1)
    return {
        "accuracy": float((predictions == labels).mean()),
        "loss": cross_entropy(logits, labels),
        "confusion_matrix": confusion_matrix(labels, predictions, num_classes),
    }
