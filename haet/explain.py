"""Grad-CAM heatmaps: where in an image a classifier looks for its predicted class.

Grad-CAM (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via
Gradient-based Localization", ICCV 2017): with `A` the feature maps `(h, w, k)` of a
convolutional layer and `y` the class logit, the heatmap is
`ReLU(sum_k mean_ij(dy/dA_ijk) * A_k)`, upsampled to the image size and divided by
its maximum.

    python -m haet.explain --model=RUN/model.keras --data_dir=../shared/data/cifar10 \\
        --out=gradcam.png --num_images=24

Works under the TensorFlow and JAX backends (`_logits_and_gradients` hides which).
"""

import os

import keras
import numpy as np

from haet import augment  # noqa: F401 -- registers RandomAffine for load_model
from haet import autodiff, cli, models


def _split(model, layer_name=None):
    """Splits `model` into (preprocess, features, head) at a 4-D feature layer.

    A model from `haet.models.with_input_pipeline` holds its backbone as a nested
    model after the preprocessing layers; a plain model is its own backbone.
    `layer_name` defaults to the backbone's last layer with a 4-D output.

    Raises:
        ValueError: if the layer does not exist or has no 4-D output.
    """
    backbone = next((l for l in reversed(model.layers) if isinstance(l, keras.Model)), model)
    preprocess = [] if backbone is model else model.layers[1:model.layers.index(backbone)]
    if layer_name is None:
        candidates = [l for l in backbone.layers if len(l.output.shape) == 4]
        if not candidates:
            raise ValueError(f"Model {model.name!r} has no layer with a 4-D (batch, h, w, channels) output.")
        layer = candidates[-1]
    else:
        try:
            layer = backbone.get_layer(layer_name)
        except ValueError:
            raise ValueError(
                f"No layer {layer_name!r} in {backbone.name!r}. 4-D layers: "
                f"{[l.name for l in backbone.layers if len(l.output.shape) == 4]}"
            ) from None
        if len(layer.output.shape) != 4:
            raise ValueError(f"Layer {layer_name!r} has output shape {layer.output.shape}, not 4-D.")
    features = keras.Model(backbone.input, layer.output)
    head = keras.Model(layer.output, backbone.output)
    return preprocess, features, head, layer.name


def _logits_and_gradients(head, feature_maps, class_index):
    """Logits `(N, K)` and d(logit[class_index]) / d(feature_maps), as NumPy arrays."""
    index = keras.ops.convert_to_tensor(np.asarray(class_index)[:, None])

    def score(f):
        logits = head(f, training=False)
        return keras.ops.sum(keras.ops.take_along_axis(logits, index, axis=1)), logits

    _, logits, grads = autodiff.value_and_gradient(score, feature_maps)
    return logits, grads


def grad_cam(model, images, class_index=None, layer_name=None, member=0):
    """Grad-CAM heatmaps of `model` for `images`.

    Args:
        model: a classifier `keras.Model` returning logits; of a
            `haet.models.EnsembleModel`, member `member` is explained (the
            members' feature maps are their own).
        images: `(N, H, W, C)` array as the model takes it (uint8 for haet models).
        class_index: int `(N,)` classes to explain; default the predicted ones.
        layer_name: the convolutional layer to explain; default the last 4-D one.

    Returns:
        dict: `heatmaps` float32 `(N, H, W)` in [0, 1] (all zeros where the class
        gets no positive evidence), `logits` float32 `(N, K)`, `class_index`
        int `(N,)`, `layer` (name).

    Raises:
        ValueError: for a missing or non-4-D layer, or a member the ensemble lacks.
    """
    if isinstance(model, models.EnsembleModel):
        model = model.member_model(member)
    elif member != 0:
        raise ValueError(f"member={member} names an ensemble member; {model.name!r} is a single network "
                         "(use member=0).")
    preprocess, features, head, layer = _split(model, layer_name)
    x = images
    for l in preprocess:
        if not isinstance(l, (augment.RandomAffine, augment.RandomCropFlipCutout)):  # identity at inference
            x = l(x)
    feature_maps = np.asarray(features(x, training=False), dtype=np.float32)
    if class_index is None:
        class_index = np.asarray(head(feature_maps, training=False)).argmax(axis=1)
    class_index = np.asarray(class_index, dtype=np.int32)
    logits, grads = _logits_and_gradients(head, feature_maps, class_index)
    weights = grads.mean(axis=(1, 2))  # (N, k)
    cam = np.maximum(np.einsum("nhwk,nk->nhw", feature_maps, weights), 0.0).astype(np.float32)
    height, width = np.shape(images)[1:3]
    cam = np.asarray(keras.ops.image.resize(cam[..., None], (height, width), interpolation="bilinear"))[..., 0]
    cam = np.maximum(cam, 0.0)
    peak = cam.max(axis=(1, 2), keepdims=True)
    cam = np.where(peak > 0, cam / np.where(peak > 0, peak, 1.0), 0.0).astype(np.float32)
    return {"heatmaps": cam, "logits": logits.astype(np.float32), "class_index": class_index, "layer": layer}


def _classes_of_run(model_path, dataset):
    """The `--classes` of the run that saved `model_path` (its folder's record.json,
    the folder of the file a link points to): a tuple of class ids, `()` for all
    classes; None for a model outside a run folder or beside a record.json that is
    not a run's.

    Raises:
        ValueError: the run trained on another dataset than `dataset`.
    """
    from haet import results

    folder = os.path.dirname(os.path.realpath(model_path))
    try:
        flags_of_run = results.read_record(folder).get("flags")
    except ValueError:  # none, or not a run's record
        return None
    if not isinstance(flags_of_run, dict):
        return None
    if flags_of_run.get("dataset", dataset) != dataset:
        raise ValueError(f"--model was trained on {flags_of_run['dataset']} (its record.json): pass "
                         f"--dataset={flags_of_run['dataset']}.")
    return tuple(int(c) for c in flags_of_run.get("classes") or ())


def classes_to_explain(given, model_path, dataset):
    """The class ids whose test images explain `model_path`: `given` (`--classes`,
    a list of strings or None), else those of its run (`_classes_of_run`); `()`
    for all classes. The count of the model's outputs is checked against them after.

    Raises:
        ValueError: `given` holds something other than integers, or differs from
            the classes of the model's run (its record.json); the run trained on
            another dataset.
    """
    of_run = _classes_of_run(model_path, dataset)
    if given is None:
        return of_run or ()
    try:
        classes = tuple(int(c) for c in given)
    except ValueError:
        raise ValueError(f"--classes must be comma-separated class ids of {dataset} (e.g. --classes=3,5). "
                         f"Received: {','.join(given)}") from None
    if of_run is not None and classes != of_run:
        said = ",".join(map(str, of_run)) if of_run else "all classes"
        raise ValueError(f"--classes={','.join(map(str, classes))} is not what the model's run trained on "
                         f"({said}, its record.json): leave --classes out.")
    return classes


def main(argv):
    """`python -m haet.explain`: checks the flags, the model file and the output
    before loading anything (`app.UsageError`, exit status 2), then writes the PNG."""
    del argv  # (haet.cli.run refuses arguments other than flags)
    from absl import app, flags, logging

    from haet import data, plots, results

    f = flags.FLAGS
    try:
        results.check_new_file(f.out, "--out")
        plots.check_figure_path(f.out, "--out")
        model = models.load_saved_model(f.model, f"--model={f.model!r}",
                                        "Pass a saved .keras model (a run folder's model.keras).", compile=True)
        classes = classes_to_explain(f.classes, f.model, f.dataset)  # (before the data are read)
        dataset = data.select_classes(data.load_dataset(f.dataset, f.data_dir), classes)
        outputs = model.output_shape[-1]
        if outputs != dataset.info.num_classes:  # (its outputs were drawn with other classes' names)
            raise ValueError(f"--model has {outputs} outputs; the {dataset.info.num_classes} classes of "
                             f"{dataset.info.name} are not its classes: pass the --dataset (and --classes) it was "
                             "trained on (a model of a --classes subset in its run folder: its record.json names "
                             "them).")
        if not 1 <= f.num_images <= len(dataset.y_test):
            raise ValueError(f"--num_images must be between 1 and the {len(dataset.y_test)} test images of "
                             f"{f.dataset}. Received: {f.num_images}")
        expected = tuple(model.input_shape[1:])
        if any(a is not None and a != b for a, b in zip(expected, dataset.x_test.shape[1:])) \
                or len(expected) != dataset.x_test.ndim - 1:
            raise ValueError(f"--model takes images of shape {expected}; {f.dataset}'s are "
                             f"{dataset.x_test.shape[1:]}: pass the --dataset the model was trained on.")
        pick = np.sort(np.random.default_rng(f.seed).choice(len(dataset.y_test), f.num_images, replace=False))
        images, labels = dataset.x_test[pick], dataset.y_test[pick]
        result = grad_cam(model, images, layer_name=f.layer, member=f.member)
    except (ValueError, RuntimeError) as e:  # RuntimeError: no local copy of the data
        raise app.UsageError(str(e)) from None
    name = f"{model.name} member {f.member}" if isinstance(model, models.EnsembleModel) else model.name
    predicted = result["logits"].argmax(axis=1)
    try:
        results.write_new_file(results.make_parents(f.out), lambda path: plots.plot_grad_cam_grid(
            images, result["heatmaps"], labels, predicted, dataset.info.class_names, path,
            title=f"Grad-CAM of {name} at {result['layer']} on {f.num_images} {f.dataset} test images"))
    except OSError as e:  # whole or not at all: no empty PNG refuses the rerun
        cli.not_written(f"--out={f.out}", e)
    logging.info("%d/%d correct; wrote %s", int((predicted == labels).sum()), len(labels), f.out)


if __name__ == "__main__":
    from absl import flags

    from haet.data import DATASETS

    flags.DEFINE_string("model", None, "A saved .keras classifier.", required=True)
    flags.DEFINE_enum("dataset", "cifar10", sorted(DATASETS), "Dataset of the test images.")
    flags.DEFINE_string("data_dir", None, "Folder with train.npz/test.npz; unset: tensorflow-datasets.")
    flags.DEFINE_string("out", "gradcam.png", "PNG to write (must not exist).")
    flags.DEFINE_integer("num_images", 24, "Test images to show, drawn with --seed.")
    flags.DEFINE_integer("seed", 0, "Seed choosing the test images.", lower_bound=0)
    flags.DEFINE_string("layer", None, "Layer to explain; default the last 4-D layer.")
    flags.DEFINE_list("classes", None, "Class ids the model was trained on (train's --classes, e.g. 3,5), for "
                      "a model outside its run folder; default: its run's (record.json), else all classes.")
    flags.DEFINE_integer("member", 0, "Of an ensemble model (--ensemble_members): the member to explain.",
                         lower_bound=0)
    cli.run(main)
