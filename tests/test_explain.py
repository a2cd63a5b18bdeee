import keras
import numpy as np
import pytest

from haet import models
from haet.augment import RandomAffine
from haet.explain import grad_cam


def _positive_conv_model():
    """Conv with positive weights (feature = brightness), GAP, dense head."""
    inputs = keras.Input((16, 16, 1))
    x = keras.layers.Conv2D(2, 3, padding="same", kernel_initializer="ones", activation="relu", name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(2, kernel_initializer=keras.initializers.Constant([[1.0, -1.0], [1.0, -1.0]]))(x)
    return keras.Model(inputs, outputs)


def test_heatmap_shape_range_and_localization():
    images = np.zeros((3, 16, 16, 1), "float32")
    images[0, :4, :4] = 1.0   # top-left patch
    images[1, 10:, 10:] = 1.0  # bottom-right patch
    images[2, 6:9, 2:5] = 1.0
    result = grad_cam(_positive_conv_model(), images, class_index=[0, 0, 0])
    heat = result["heatmaps"]
    assert heat.shape == (3, 16, 16) and heat.dtype == np.float32
    assert heat.min() >= 0.0 and heat.max() == pytest.approx(1.0)
    for k, (rows, cols) in enumerate([(slice(0, 4), slice(0, 4)), (slice(10, 16), slice(10, 16)),
                                      (slice(6, 9), slice(2, 5))]):
        peak = np.unravel_index(heat[k].argmax(), heat[k].shape)
        assert rows.start <= peak[0] < rows.stop and cols.start <= peak[1] < cols.stop
        # Far from the patch the heatmap is (nearly) cold.
        outside = np.ones((16, 16), bool)
        outside[max(rows.start - 3, 0):rows.stop + 3, max(cols.start - 3, 0):cols.stop + 3] = False
        assert heat[k][outside].max() < 0.05
    assert result["layer"] == "conv"
    # Class 1 is the negative of class 0: no positive evidence, an all-zero heatmap.
    assert grad_cam(_positive_conv_model(), images, class_index=[1, 1, 1])["heatmaps"].max() == 0.0


def test_haet_model_with_uint8_pipeline():
    backbone = models.resnet20(width_multiplier=1, input_shape=(32, 32, 3))
    model = models.with_input_pipeline(backbone, np.full((32, 32, 3), 0.5, "float32"), RandomAffine(seed=0))
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    result = grad_cam(model, images)
    assert result["layer"] == "stage3_block3_out"
    assert result["heatmaps"].shape == (2, 32, 32)
    assert 0.0 <= result["heatmaps"].min() and result["heatmaps"].max() <= 1.0
    np.testing.assert_allclose(result["logits"], np.asarray(model(images)), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(result["class_index"], result["logits"].argmax(axis=1))


def test_bad_layer_names_are_reported():
    with pytest.raises(ValueError, match="No layer 'conv9'.*4-D layers: \\['input_layer.*'conv'\\]"):
        grad_cam(_positive_conv_model(), np.zeros((1, 16, 16, 1), "float32"), layer_name="conv9")


@pytest.mark.e2e
def test_explain_command_line_writes_a_figure_and_refuses_bad_inputs_before_work(tmp_path, cifar10_slice_dir):
    import os
    import subprocess
    import sys

    from conftest import REPO, run_tool_cases

    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inputs)
    outputs = keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(x))
    model_path = tmp_path / "model.keras"
    keras.Model(inputs, outputs, name="tiny").save(model_path)
    mnist = tmp_path / "mnist"
    mnist.mkdir()
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        np.savez(mnist / f"{split}.npz", x=rng.integers(0, 256, (20, 28, 28, 1), dtype=np.uint8),
                 y=np.arange(20, dtype=np.uint8) % 10)
    damaged = tmp_path / "damaged.keras"
    damaged.write_bytes(b"not a zip file")
    # A model of 2 classes (--classes=3,5) in its run folder, and the same model outside one.
    two = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(x)), name="two")
    (tmp_path / "run").mkdir()
    two.save(tmp_path / "run" / "model.keras")
    (tmp_path / "run" / "record.json").write_text('{"flags": {"dataset": "cifar10", "classes": [3, 5]}}')
    two.save(tmp_path / "two.keras")
    (tmp_path / "best.keras").symlink_to(tmp_path / "run" / "model.keras")  # (its run folder is the link's target's)
    (tmp_path / "odd").mkdir()
    two.save(tmp_path / "odd" / "model.keras")
    (tmp_path / "odd" / "record.json").write_text('{"flags": ["--classes=3,5"]}')  # not a run's: no classes read
    env = dict(os.environ, PYTHONPATH=REPO, MPLBACKEND="Agg")

    def explain(*args):
        common = [f"--model={model_path}", f"--data_dir={cifar10_slice_dir}", "--num_images=4"]
        return subprocess.run([sys.executable, "-m", "haet.explain", *common, *args], env=env, capture_output=True,
                              text=True)

    out = tmp_path / "new" / "gradcam.png"  # its folder is made
    result = explain(f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    written = out.read_bytes()
    assert written[:8] == b"\x89PNG\r\n\x1a\n"
    bads = (([f"--out={out}"], "exists and is not overwritten"),
            ([f"--out={tmp_path / 'g.txt'}"], "matplotlib cannot write .txt files"),
            ([f"--out={tmp_path / 'g.png'}", f"--model={damaged}"], "cannot be loaded as a Keras model"),
            ([f"--out={tmp_path / 'g.png'}", "--dataset=mnist", f"--data_dir={mnist}"],
             "--model takes images of shape (32, 32, 3); mnist's are (28, 28, 1)"),
            # (its 2 outputs were drawn as airplane and automobile, over images of every class)
            ([f"--out={tmp_path / 'g.png'}", f"--model={tmp_path / 'two.keras'}"],
             "--model has 2 outputs; the 10 classes of cifar10 are not its classes"),
            ([f"--out={tmp_path / 'g.png'}", f"--model={tmp_path / 'odd' / 'model.keras'}"],
             "--model has 2 outputs; the 10 classes of cifar10 are not its classes"),
            ([f"--out={tmp_path / 'g.png'}", f"--model={tmp_path / 'run' / 'model.keras'}", "--dataset=mnist",
              f"--data_dir={mnist}"], "--model was trained on cifar10 (its record.json): pass --dataset=cifar10."),
            # --classes: for a model outside its run folder; checked against the run's and the outputs.
            ([f"--out={tmp_path / 'g.png'}", f"--model={tmp_path / 'run' / 'model.keras'}", "--classes=5,3"],
             "--classes=5,3 is not what the model's run trained on (3,5, its record.json): leave --classes out."),
            ([f"--out={tmp_path / 'g.png'}", "--classes=3,5"],  # (a model outside a run folder, 10 outputs)
             "--model has 10 outputs; the 2 classes of cifar10[3,5] are not its classes: pass the --dataset (and "
             "--classes) it was trained on"),
            ([f"--out={tmp_path / 'g.png'}", f"--model={tmp_path / 'two.keras'}", "--classes=3,x"],
             "--classes must be comma-separated class ids of cifar10 (e.g. --classes=3,5). Received: 3,x"),
            ([f"--out={tmp_path / 'g.png'}", f"--model={tmp_path / 'two.keras'}", "--classes=3,10"],
             "classes must be at least 2 distinct ids in [0, 10) of cifar10. Received: [3, 10]"))
    cases = [[f"--model={model_path}", f"--data_dir={cifar10_slice_dir}", "--num_images=4", *args] for args, _ in bads]
    for (args, message), refused in zip(bads, run_tool_cases("haet.explain", cases, env=env)):
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
        assert "haet.explain: error: " in refused.stderr and message in refused.stderr, refused.stderr[-3000:]
    assert out.read_bytes() == written and sorted(os.listdir(tmp_path / "new")) == ["gradcam.png"]
    for name, model, *given in (("subset.png", tmp_path / "run" / "model.keras"),
                                ("linked.png", tmp_path / "best.keras"),
                                ("same.png", tmp_path / "run" / "model.keras", "--classes=3,5"),
                                ("moved.png", tmp_path / "two.keras", "--classes=3,5")):
        subset = explain(f"--out={tmp_path / name}", f"--model={model}", *given)
        assert subset.returncode == 0 and (tmp_path / name).exists(), subset.stderr[-3000:]
    assert not (tmp_path / "g.png").exists() and not (tmp_path / "g.txt").exists()
