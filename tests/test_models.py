import keras
import numpy as np
import pytest

from haet import models
from haet.augment import RandomAffine


@pytest.mark.parametrize("width, params", [(1, 274_442), (6, 9_741_322)])
def test_resnet20_parameter_count_matches_docstring(width, params):
    model = models.resnet20(width_multiplier=width)
    assert model.count_params() == params
    assert f"{params:,}" in models.resnet20.__doc__


def test_resnet20_structure_and_output():
    model = models.resnet20(width_multiplier=2, num_classes=7, input_shape=(16, 16, 3))
    convs = [l for l in model.layers if isinstance(l, keras.layers.Conv2D)]
    assert len([c for c in convs if c.kernel_size == (3, 3)]) == 19  # + dense = 20 layers
    assert [c.filters for c in convs if c.kernel_size == (1, 1)] == [64, 128]
    assert len([l for l in model.layers if isinstance(l, keras.layers.Dropout)]) == 9
    y = model(np.zeros((3, 16, 16, 3), "float32"))
    assert tuple(y.shape) == (3, 7)
    no_dropout = models.resnet20(width_multiplier=1, dropout_rate=0.0)
    assert not any(isinstance(l, keras.layers.Dropout) for l in no_dropout.layers)


def test_logits_are_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = models.resnet20(width_multiplier=1)
        y = model(np.zeros((2, 32, 32, 3), "float32"))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.get_layer("stem_conv").compute_dtype == "bfloat16"
    assert keras.backend.standardize_dtype(y.dtype) == "float32"


@pytest.mark.parametrize(
    "kwargs, message",
    [({"width_multiplier": 0}, "resnet20 needs a positive integer width_multiplier. Received: 0"),
     ({"width_multiplier": 1.5}, "resnet20 needs a positive integer width_multiplier. Received: 1.5"),
     ({"dropout_rate": 1.0}, r"dropout_rate must be in \[0, 1\)"),
     ({"weight_decay": -1.0}, "weight_decay must be >= 0"),
     ({"num_classes": 1}, "num_classes must be >= 2")],
)
def test_bad_model_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        models.resnet20(**kwargs)


@pytest.mark.parametrize("builder, kwargs, message", [
    ("resnet9", {"ghost_batch_splits": 0}, "ghost_batch_splits must be a positive integer"),  # (plain batch norm)
    ("resnet9", {"ghost_batch_splits": -3}, "ghost_batch_splits must be a positive integer"),
    ("resnet9", {"logit_scale": 0.0}, "logit_scale must be a positive number"),
    ("airbench", {"logit_scale": -1 / 9, "whitening_images": np.zeros((2, 32, 32, 3), "float32")},
     "logit_scale must be a positive number"),
])
def test_bad_recipe_model_arguments(builder, kwargs, message):
    with pytest.raises(ValueError, match=message):
        getattr(models, builder)(**kwargs)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="Unknown model 'resnet50'. Allowed: resnet20, resnet9, airbench, tiny_cnn."):
        models.build_model("resnet50")


def test_tiny_cnn_parameter_count_matches_docstring():
    model = models.tiny_cnn()
    assert model.count_params() == 5562 and sum(int(np.prod(w.shape)) for w in model.trainable_weights) == 5466
    assert model.output.dtype == "float32" and model.output.shape == (None, 10)


def test_input_pipeline_takes_uint8_and_subtracts_the_mean():
    backbone = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Identity()])
    mean = np.full((4, 4, 3), 0.5, "float32")
    model = models.with_input_pipeline(backbone, mean, RandomAffine(seed=0))
    assert model.input.dtype == "uint8"
    x = np.full((1, 4, 4, 3), 255, np.uint8)
    np.testing.assert_allclose(np.asarray(model(x)), 0.5)
    assert isinstance(model.get_layer(index=3), RandomAffine)
    with pytest.raises(ValueError, match=r"mean has shape \(32, 32, 3\).*\(4, 4, 3\)"):
        models.with_input_pipeline(backbone, np.zeros((32, 32, 3)))
    # Per-channel standardization.
    channel = models.with_input_pipeline(backbone, np.array([0.5, 0.0, 1.0]), variance=np.array([0.25, 1.0, 4.0]))
    np.testing.assert_allclose(np.asarray(channel(x))[0, 0, 0], [1.0, 1.0, 0.0], atol=1e-5)


@pytest.mark.parametrize("kwargs, total, trainable", [
    ({}, 6_575_360, 6_570_880),
    ({"frozen_bn_scale": False}, 6_577_600, 6_573_120),
    ({"ghost_batch_splits": 4}, 6_575_360, 6_570_880),
])
def test_resnet9_parameter_counts_match_docstring(kwargs, total, trainable):
    model = models.resnet9(**kwargs)
    assert model.count_params() == total
    assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) == trainable
    assert f"{total:,}" in models.resnet9.__doc__ and f"{trainable:,}" in models.resnet9.__doc__


def test_resnet9_trains_with_ghost_batch_norm_and_scales_logits():
    model = models.resnet9(num_classes=3, input_shape=(16, 16, 1), width_multiplier=0.125,
                           ghost_batch_splits=2, logit_scale=0.5)
    assert [l.name for l in model.layers if isinstance(l, keras.layers.MaxPooling2D)] == \
        ["layer1_pool", "layer2_pool", "layer3_pool"]
    x = np.random.default_rng(0).normal(size=(8, 16, 16, 1)).astype("float32")
    y = np.arange(8) % 3
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=True)
    history = model.fit(x, y, batch_size=4, epochs=3, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    logits = np.asarray(model(x))
    pre_scale = keras.Model(model.input, model.get_layer("dense").output)
    np.testing.assert_allclose(logits, 0.5 * np.asarray(pre_scale(x)), rtol=1e-5, atol=1e-6)
    assert models.resnet9(input_shape=(28, 28, 1)).output.shape == (None, 10)  # MNIST
    with pytest.raises(ValueError, match=">= 8. Received: input_shape=\\(4, 4, 3\\)"):
        models.resnet9(input_shape=(4, 4, 3))
