"""Test-set evaluation: accuracy, loss and confusion matrix, with optional test-time augmentation."""

import numpy as np

from haet import fields
from haet.fields import Field

TTA_MODES = ("none", "flip", "flip_translate", "airbench")

FIELDS = (
    Field("tta", "none", "Test-time augmentation: none; flip (the mean logits of the image and its mirror "
          "image, Page's); "
          "flip_translate (also shifted by +-2 pixels, 6 views); airbench (the image and its mirror image, "
          "unshifted and shifted by -1 and +1 pixel, logits weighted 0.5/0.25/0.25).",
          fields.one_of(TTA_MODES, "tta")),
    Field("eval_batch_size", 500, "Examples per evaluation step.", fields.positive(integer=True)),
)
# flip_translate: each of these (rows, cols) shifts in pixels, with and without a flip.
TTA_SHIFTS = ((0, 0), (2, 2), (-2, -2))
# airbench (KellerJordan/cifar10-airbench, airbench94.py, infer with tta_level=2): the
# mirror-averaged logits of the image (weight 0.5) and of its one-pixel shifts up-left
# and down-right with reflect padding (0.25 each).
AIRBENCH_SHIFTS = ((0, 0), (-1, -1), (1, 1))
AIRBENCH_WEIGHTS = (0.5, 0.25, 0.25)


def _shift(images, rows, cols):
    """Translates uint8 `(N, H, W, C)` images by whole pixels, mirror-padding the edges."""
    pad = max(abs(rows), abs(cols))
    if pad == 0:
        return images
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    h, w = images.shape[1:3]
    return padded[:, pad + rows:pad + rows + h, pad + cols:pad + cols + w]


def tta_views(images, tta):
    """The views of `images` that test-time augmentation combines, and how.

    "none": the images; "flip": and their left-right mirror images, logits averaged
    (Page's ResNet-9, davidcpage/cifar10-fast: `forward_tta` averages the logits; before
    2026-11-25 haet averaged their probabilities);
    "flip_translate": both, each also shifted by (2, 2) and (-2, -2) pixels (6
    views); "airbench": the image unshifted and shifted by (-1, -1) and (1, 1)
    pixels, each with its mirror image (6 views, airbench94's `tta_level=2`).

    Returns:
        `(views, weights, space)`: uint8 arrays shaped like `images`, one weight per
        view (summing to 1), and "probabilities" or "logits": what the weights average.

    Raises:
        ValueError: an unknown mode.
    """
    if tta not in TTA_MODES:
        raise ValueError(f"Unknown test-time augmentation {tta!r}. Allowed: {', '.join(TTA_MODES)}.")
    if tta == "none":
        return [images], [1.0], "probabilities"
    flipped = images[:, :, ::-1]
    if tta == "flip":
        return [images, flipped], [0.5, 0.5], "logits"
    if tta == "flip_translate":
        views = [_shift(v, r, c) for v in (images, flipped) for r, c in TTA_SHIFTS]
        return views, [1.0 / len(views)] * len(views), "probabilities"
    # Each shift, then its mirror image (airbench: infer_mirror of each translate): the
    # mirror of a shift by (r, c) is the mirror image shifted by (r, -c), not (r, c).
    views = [view for shifted in (_shift(images, r, c) for r, c in AIRBENCH_SHIFTS)
             for view in (shifted, shifted[:, :, ::-1])]
    return views, [w / 2 for w in AIRBENCH_WEIGHTS for _ in range(2)], "logits"


def predict_logits(model, images, batch_size, weights=None):
    """Logits of `model` on `images` (uint8 or float `(N, H, W, C)`): float32 `(N, classes)`
    (the model's output shape with N rows: `(N, members, classes)` for an ensemble's
    `members_model()`).

    `weights`: `(trainable, non_trainable)` value lists to predict with instead of
    the model's own (`haet.engine.current_weights`); the model is left untouched.
    """
    from haet.engine import predictor_of

    return predictor_of(model)(images, batch_size, weights)


def _checked(values, labels, what):
    """`values` as float64 `(N, K)` and `labels` as int32 `(N,)` (`haet.data.class_labels`:
    `(N, 1)` taken, as `keras.datasets` gives them).

    Raises:
        ValueError: `values` not of rank 2, labels not integers, not N of them, or
            outside [0, K).
    """
    from haet.data import class_labels  # (lazily: see haet.budgeted)

    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"{what} must be (N, K). Received shape {values.shape}.")
    return values, class_labels(labels, f"labels for {len(values)} rows of {what}", len(values), values.shape[1])


def cross_entropy(logits, labels):
    """Mean softmax cross-entropy (nats) of float `(N, K)` logits against int `(N,)`
    (or `(N, 1)`) labels.

    Unlike `model.evaluate`'s loss, it holds no weight-decay penalty.

    Raises:
        ValueError: as `scores`' labels.
    """
    logits, labels = _checked(logits, labels, "logits")
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def confusion_matrix(labels, predictions, num_classes):
    """int64 `(num_classes, num_classes)`: row = true class, column = predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels), np.asarray(predictions)), 1)
    return matrix


def _softmax(logits):
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def combine_views(logits, view_weights, space):
    """Class probabilities float64 `(N, K)` from the logits of each view, a list of
    float `(N, K)` arrays, as `tta_views` says: the weighted mean of their softmax
    probabilities (`space` "probabilities") or the softmax of their weighted mean
    ("logits")."""
    logits = [np.asarray(o, dtype=np.float64) for o in logits]
    if space == "logits":
        return _softmax(sum(w * o for w, o in zip(view_weights, logits)))
    return sum(w * _softmax(o) for w, o in zip(view_weights, logits))


def predict_probabilities(model, images, batch_size, tta="none", weights=None):
    """Softmax probabilities of `model` (with `weights`, see `predict_logits`) on uint8
    `(N, H, W, C)` images, combined over the views of `tta_views(images, tta)` (its
    weighted mean of the probabilities, or the softmax of its weighted mean of the
    logits): float64 `(N, classes)`."""
    views, view_weights, space = tta_views(images, tta)
    return combine_views([predict_logits(model, v, batch_size, weights) for v in views], view_weights, space)


def log_mean_softmax(logits, axis):
    """The log of the mean over `axis` of softmax probabilities (over the last axis)
    of float `logits`, in float64: an ensemble's logits from its members' (a
    logsumexp of log-softmaxes, so no log(0) where a probability underflows)."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    top = log_p.max(axis=axis, keepdims=True)
    mean = np.log(np.exp(log_p - top).mean(axis=axis, keepdims=True)) + top
    return np.squeeze(mean, axis=axis)


def predict_ensemble_probabilities(model, images, batch_size, tta="none", weights=None):
    """An ensemble's probabilities and each member's from one pass over the images.

    `predict_probabilities(model, ...)` of a `haet.models.EnsembleModel` and of each
    `model.member_model(m)`, derived from every member's logits on each view
    (`model.members_model()`): for each view the ensemble's logits are the log of
    the members' mean softmax (as the model's `MemberAverage` computes them), then
    views combine as `tta_views` says, for the ensemble and for each member. The
    cost of one ensemble prediction instead of two (ensemble, then members).

    Args:
        model: an `EnsembleModel`.
        images: uint8 `(N, H, W, C)`.
        batch_size: examples per compiled call.
        tta: a mode of `TTA_MODES`.
        weights: the ensemble's `(trainable, non_trainable)` value lists
            (`haet.engine.current_weights`), or None for its current variables.

    Returns:
        `(ensemble, members)`: float64 `(N, classes)` and a list of one such array
        per member.
    """
    from haet.engine import current_weights

    views, view_weights, space = tta_views(images, tta)
    sub = model.members_model()
    sub_weights = model.weights_of(sub, weights if weights is not None else current_weights(model))
    stacked = [predict_logits(sub, v, batch_size, sub_weights) for v in views]  # each (N, members, K)
    ensemble = combine_views([log_mean_softmax(s, axis=1) for s in stacked], view_weights, space)
    members = [combine_views([s[:, m] for s in stacked], view_weights, space) for m in range(sub.output_shape[1])]
    return ensemble, members


def scores(probabilities, labels, num_classes):
    """Accuracy (fraction), cross-entropy (nats) and confusion matrix of predicted class
    probabilities float `(N, K)` against int labels `(N,)` (or `(N, 1)`, as
    `keras.datasets` gives them: before, they broadcast against the predictions, the
    confusion matrix counting N**2 pairs).

    Returns:
        dict with `accuracy` (float), `loss` (float) and `confusion_matrix` (int64 `(K, K)`).

    Raises:
        ValueError: probabilities not `(N, num_classes)` rows of probabilities (>= 0,
            summing to 1 within 1e-3: logits are refused), or labels that are not N
            integers in [0, K).
    """
    probabilities, labels = _checked(probabilities, labels, "probabilities")
    if probabilities.shape[1] != num_classes:
        raise ValueError(f"probabilities have {probabilities.shape[1]} columns for num_classes={num_classes}.")
    sums = probabilities.sum(axis=1)
    if len(probabilities) and (probabilities.min() < 0 or np.abs(sums - 1).max() > 1e-3):
        raise ValueError(f"probabilities must be rows of class probabilities (>= 0, summing to 1): received rows "
                         f"summing to {sums.min():.4g}..{sums.max():.4g}, min {probabilities.min():.4g} (logits? "
                         f"pass their softmax).")
    predictions = probabilities.argmax(axis=1)
    return {
        "accuracy": float((predictions == labels).mean()),
        "loss": float(-np.log(np.maximum(probabilities[np.arange(len(labels)), labels], 1e-300)).mean()),
        "confusion_matrix": confusion_matrix(labels, predictions, num_classes),
    }


def evaluate(model, images, labels, num_classes, batch_size, tta="none"):
    """Accuracy (fraction), cross-entropy and confusion matrix of `model` on a test set.

    With test-time augmentation, the predicted class probabilities are averaged
    over the views of `tta_views`.

    Returns:
        dict with `accuracy` (float), `loss` (float, nats, of the averaged
        probabilities) and `confusion_matrix` (int64 `(num_classes, num_classes)`).

    Raises:
        ValueError: labels that are not `len(images)` integers in [0, num_classes)
            (before any prediction), or as `scores`.
    """
    from haet.data import class_labels

    labels = class_labels(labels, "evaluate's labels", len(images), num_classes)
    return scores(predict_probabilities(model, images, batch_size, tta), labels, num_classes)


def ensemble(probabilities, labels, num_classes):
    """Scores of each member and of their ensemble (the mean of the members' predicted
    probabilities, as in Lakshminarayanan et al. 2017 and Huang et al. 2017's snapshot
    ensembles).

    Args:
        probabilities: float `(N, K)` arrays, one per member (>= 1): a list, or
            an `(M, N, K)` array.
        labels: int `(N,)` (or `(N, 1)`).
        num_classes: K.

    Returns:
        `(member_scores, ensemble_scores)`: a list of `scores` dicts and one dict.

    Raises:
        ValueError: no members, or members of different shapes.
    """
    probabilities = list(probabilities)  # (a stacked array too: one member a row)
    if not probabilities:
        raise ValueError("An ensemble needs at least one member.")
    shapes = {np.shape(p) for p in probabilities}
    if len(shapes) != 1:
        raise ValueError(f"Ensemble members predict arrays of different shapes: {sorted(shapes)}.")
    members = [scores(p, labels, num_classes) for p in probabilities]
    mean = np.mean([np.asarray(p, dtype=np.float64) for p in probabilities], axis=0)
    return members, scores(mean, labels, num_classes)
