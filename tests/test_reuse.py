"""Models others can reuse: keras.applications-style constructors, load_model after
`import haet` with the optimizer state, SavedModel export, explain and ensembles on
every model."""

import functools
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from conftest import REPO
from haet import evaluation, models
from haet.training import TrainConfig, train

SMALL = {"resnet20": dict(width_multiplier=1), "resnet9": dict(width_multiplier=0.125, ghost_batch_splits=2),
         "airbench": dict(width_multiplier=0.0625), "tiny_cnn": dict(width_multiplier=1)}
# airbench computes its whitening from images (a training run gives it the training set).
WHITENING_IMAGES = np.random.default_rng(2).normal(size=(8, 32, 32, 3)).astype("float32")
CONSTRUCTORS = {"resnet20": models.ResNet20, "resnet9": models.ResNet9, "tiny_cnn": models.TinyCNN,
                "airbench": functools.partial(models.Airbench, whitening_images=WHITENING_IMAGES)}


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_constructors_in_the_keras_applications_style(name, tmp_path):
    build = CONSTRUCTORS[name]
    top = build(classes=7, **SMALL[name])
    assert top.output_shape == (None, 7)
    for pooling, rank in ((None, 4), ("avg", 2), ("max", 2)):
        features = build(include_top=False, pooling=pooling, **SMALL[name])
        assert len(features.output_shape) == rank and features.output_shape[-1] > 0
    # weights= a saved haet model: the same logits on the same (normalized) images.
    images = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype("float32")
    saved = models.with_input_pipeline(build(classes=7, **SMALL[name]), np.zeros(3, "float32"), None,
                                       np.ones(3, "float32"))
    saved.save(tmp_path / "m.keras")
    loaded = build(classes=7, weights=str(tmp_path / "m.keras"), **SMALL[name])
    np.testing.assert_allclose(np.asarray(loaded(images)), np.asarray(models.backbone_of(saved)(images)),
                               atol=1e-5)
    with pytest.raises(ValueError, match="pass classes= as trained, or include_top=False"):
        build(classes=3, weights=str(tmp_path / "m.keras"), **SMALL[name])
    build(classes=3, include_top=False, weights=str(tmp_path / "m.keras"), **SMALL[name])
    with pytest.raises(ValueError, match="pooling applies to include_top=False"):
        build(pooling="avg")
    with pytest.raises(ValueError, match="does not exist"):
        build(weights=str(tmp_path / "none.keras"))


def test_an_ensemble_of_every_model():
    images = np.random.default_rng(1).integers(0, 256, (6, 32, 32, 3)).astype(np.uint8)
    labels = np.array([0, 1, 2, 3, 4, 5])
    members = [models.with_input_pipeline(CONSTRUCTORS[name](**SMALL[name]), np.zeros(3, "float32"), None,
                                          np.ones(3, "float32")) for name in sorted(models.MODELS)]
    probabilities = [evaluation.predict_probabilities(m, images, 6) for m in members]
    member_scores, ensemble = evaluation.ensemble(probabilities, labels, 10)
    assert len(member_scores) == len(models.MODELS)
    np.testing.assert_allclose(ensemble["loss"], -np.mean(np.log(np.mean(probabilities, axis=0)[np.arange(6), labels])),
                               rtol=1e-5)


_LOAD = """
import sys, warnings, json
warnings.simplefilter("error", UserWarning)  # a skipped optimizer state is an error here
import haet, keras, numpy as np
from haet.explain import grad_cam
images = np.load(sys.argv[1])
out = {}
for path in sys.argv[2:]:
    model = keras.saving.load_model(path)
    out[path] = {"optimizer_variables": len(model.optimizer.variables),
                 "heatmaps": list(grad_cam(model, images)["heatmaps"].shape),
                 "logits": np.asarray(model.predict(images, verbose=0)).tolist()}
print(json.dumps(out))
"""


@pytest.mark.e2e
def test_saved_models_load_after_import_haet_export_and_explain(tmp_path, cifar10_slice_dir):
    run_dirs = {}
    for name in sorted(models.MODELS):
        config = TrainConfig(budget_seconds=600.0, data_dir=cifar10_slice_dir, train_size=100, model=name,
                             batch_size=20, optimizer="sgd", lr_schedule="one_cycle", epochs=1, ema_decay=0.9,
                             augmentation="crop_flip_cutout", input_normalization="channel_standardize",
                             eval_batch_size=500, export="saved_model" if name == "resnet9" else "none",
                             **SMALL[name])
        record, run_dirs[name] = train(config, results_dir=str(tmp_path / name))
        assert record["status"] == "completed" and "artifact_errors" not in record
    images = np.load(os.path.join(cifar10_slice_dir, "test.npz"))["x"][:4]
    np.save(tmp_path / "images.npy", images)
    env = dict(os.environ, PYTHONPATH=REPO, MPLBACKEND="Agg")
    paths = [os.path.join(run_dirs[name], "model.keras") for name in sorted(run_dirs)]
    # A fresh process that imports only haet and keras: load (optimizer state whole), predict, Grad-CAM.
    result = subprocess.run([sys.executable, "-c", _LOAD, str(tmp_path / "images.npy"), *paths], env=env,
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    tf = pytest.importorskip("tensorflow")
    for name, path in zip(sorted(run_dirs), paths):
        model = keras.saving.load_model(path)
        assert loaded[path]["optimizer_variables"] == len(model.optimizer.variables), name
        assert loaded[path]["heatmaps"] == [4, 32, 32]
        np.testing.assert_allclose(loaded[path]["logits"], np.asarray(model.predict(images, verbose=0)),
                                   rtol=1e-5, atol=1e-4)
        if name != "resnet9":  # the export does not depend on the network: one model (custom layers) shows it
            assert not os.path.exists(os.path.join(run_dirs[name], "saved_model"))
            continue
        restored = tf.saved_model.load(os.path.join(run_dirs[name], "saved_model"))  # kept: it owns the variables
        served = restored.serve(tf.constant(images))
        np.testing.assert_allclose(np.asarray(served), loaded[path]["logits"], rtol=1e-5, atol=1e-4)
    # The command line too, on the model with ghost batch norm.
    out = tmp_path / "gradcam.png"
    result = subprocess.run([sys.executable, "-m", "haet.explain", f"--model={run_dirs['resnet9']}/model.keras",
                             f"--data_dir={cifar10_slice_dir}", f"--out={out}", "--num_images=4"],
                            env=env, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.stat().st_size > 5000


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_fine_tuning_transfers_every_model(name):
    def wrapped(classes):
        return models.with_input_pipeline(CONSTRUCTORS[name](classes=classes, **SMALL[name]), np.zeros(3, "float32"),
                                          None, np.ones(3, "float32"))

    source, target = wrapped(5), wrapped(3)
    summary = models.transfer_weights(source, target, name, freeze_stages=1)
    assert summary["layers_transferred"] > 0 and summary["layers_frozen"] > 0
    src, dst = models.backbone_of(source), models.backbone_of(target)
    copied = [layer for layer in dst.layers if layer.weights and layer.name not in ("logits", "dense")]
    for layer in copied:
        for a, b in zip(src.get_layer(layer.name).get_weights(), layer.get_weights()):
            np.testing.assert_array_equal(a, b)
    assert target.output_shape == (None, 3) and any(not layer.trainable for layer in dst.layers)
