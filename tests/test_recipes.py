"""The pieces of Page's bag of tricks: per-variable learning rates, PCA whitening, pool
before batch norm, learning-rate knots in epochs."""

import dataclasses

import keras
import numpy as np
import pytest

from haet import models, optimizers, schedules
from haet.config import TrainConfig
from haet.layers import GhostBatchNormalization, PatchWhitening


def _bn_model(ghost):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 4, 2))
    h = keras.layers.Conv2D(3, 3, padding="same", use_bias=False, name="conv")(inputs)
    h = GhostBatchNormalization(2, scale=False, name="bn")(h) if ghost else \
        keras.layers.BatchNormalization(scale=False, name="bn")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, keras.layers.Dense(2, name="dense")(h))


@pytest.mark.parametrize("ghost", [False, True])
@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_a_step_moves_batch_norm_shifts_64_times_as_far(ghost, name):
    """Same weights, same batch: with bn_shift_lr_multiplier=64 the shifts move 64x as
    far (SGD: the update is linear in the rate; Adam: its first step is lr * sign-ish,
    also linear), every other variable as far as without."""
    x = np.random.default_rng(1).normal(size=(4, 4, 4, 2)).astype("float32")
    # Not one label of each class per ghost batch of 2: there the two examples' pooled
    # features are opposite (zero mean), their softmaxes sum to (1, 1) like their one-hot
    # labels, and the gradients of the BN shift and the dense bias vanish (rounding left).
    y = np.array([0, 0, 1, 0])
    moved = {}
    for multiplier in (1.0, 64.0):
        config = TrainConfig(optimizer=name, bn_shift_lr_multiplier=multiplier, momentum=0.9)
        model = _bn_model(ghost)
        before = {v.path: np.array(v.value) for v in model.trainable_variables}
        model.compile(optimizers.make_optimizer(config, 1e-3),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.train_on_batch(x, y)
        moved[multiplier] = {v.path: np.array(v.value) - before[v.path] for v in model.trainable_variables}
    shifts = [p for p in moved[1.0] if p.endswith("bn/beta")]
    assert len(shifts) == 1 and len(moved[1.0]) == 4  # conv kernel, BN shift, dense kernel and bias
    for path, delta in moved[1.0].items():
        expected = delta * (64.0 if path in shifts else 1.0)
        np.testing.assert_allclose(moved[64.0][path], expected, rtol=1e-4, atol=1e-9, err_msg=path)
        assert np.abs(delta).max() > 1e-6, path  # the step moved it (learning rate 1e-3)


def test_multipliers_are_saved_with_the_optimizer_and_checked(caplog):
    import logging

    with caplog.at_level(logging.WARNING):
        optimizers.SGD(0.1, weight_decay=1e-4)  # no multiplier: nothing to say
        optimizers.SGD(0.1, learning_rate_multipliers=[("beta$", 64)])
        assert not caplog.records
        # Keras' decoupled decay goes at the base rate: the multiplier does not scale it.
        optimizers.Adam(0.1, weight_decay=1e-4, learning_rate_multipliers=[("beta$", 64)])
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["Adam(weight_decay=0.0001)"]
    optimizer = optimizers.SGD(0.1, learning_rate_multipliers=[("beta$", 64)])
    again = optimizers.SGD.from_config(optimizer.get_config())
    assert again.learning_rate_multipliers == (("beta$", 64.0),)
    with pytest.raises(ValueError, match="positive finite number"):
        optimizers.SGD(0.1, learning_rate_multipliers=[("beta$", 0)])
    with pytest.raises(ValueError, match="not a regular expression"):
        optimizers.SGD(0.1, learning_rate_multipliers=[("(beta", 2)])
    for given, message in [(("beta$", 64.0), r"a list of \(pattern, multiplier\) pairs. Received \('beta\$', 64.0\): "
                                             r"pass \[\('beta\$', 64.0\)\]"),  # ("too many values to unpack")
                           ([(b"beta$", 64.0)], "the pattern a str"),  # (stored as "b'beta$'", matching nothing)
                           ([("beta$", float("inf"))], "positive finite number")]:
        with pytest.raises(ValueError, match=message):
            optimizers.SGD(0.1, learning_rate_multipliers=given)
    assert optimizers.SGD(0.1, learning_rate_multipliers=[("beta$", np.float32(2))]).learning_rate_multipliers == (
        ("beta$", 2.0),)


def test_bn_shift_weight_decay_is_weight_decay_over_the_multiplier():
    config = TrainConfig(model="resnet9", width_multiplier=0.125, weight_decay=2.5e-4, bn_shift_weight_decay=True,
                         bn_shift_lr_multiplier=64, batch_size=32)
    backbone = models.build_backbone(config, 10, (32, 32, 3))
    bn = backbone.get_layer("layer1_bn")
    assert bn.beta_regularizer.l2 == pytest.approx(2.5e-4 / 64)
    assert backbone.get_layer("layer1_conv").kernel_regularizer.l2 == pytest.approx(2.5e-4)
    plain = models.build_backbone(dataclasses.replace(config, bn_shift_weight_decay=False), 10, (32, 32, 3))
    assert plain.get_layer("layer1_bn").beta_regularizer is None


def test_patch_whitening_whitens_the_patches_it_was_adapted_on():
    rng = np.random.default_rng(0)
    # Correlated channels and neighbouring pixels.
    base = rng.normal(size=(64, 10, 10, 3))
    images = base + 0.8 * np.roll(base, 1, axis=2) + 0.5 * base[..., ::-1]
    layer = PatchWhitening(2, epsilon=1e-9, padding="valid")
    layer.adapt(images)
    out = np.asarray(layer(images.astype("float32")), np.float64).reshape(-1, 12)
    covariance = out.T @ out / (len(out) - 1)
    np.testing.assert_allclose(covariance, np.eye(12), atol=1e-3)
    # Filters ordered by decreasing eigenvalue: the first one's response varies the most before whitening.
    kernel = np.asarray(layer.kernel.value).reshape(12, 12)
    norms = np.linalg.norm(kernel, axis=0)
    assert np.all(np.diff(norms) >= -1e-6)  # 1 / sqrt(eigenvalue) grows as eigenvalues fall
    both = PatchWhitening(2, epsilon=1e-2, padding="valid", both_signs=True, use_bias=True)
    both.adapt(images)
    assert tuple(both.kernel.shape) == (2, 2, 3, 24) and both.bias is not None
    np.testing.assert_allclose(np.asarray(both.kernel.value)[..., 12:], -np.asarray(both.kernel.value)[..., :12])
    with pytest.raises(ValueError, match="adapt takes"):
        layer.adapt(images[..., :2])


def test_patch_whitening_refuses_what_it_cannot_whiten_and_stays_usable():
    """Adapted first on images without their channel axis, the layer was built for 10
    channels and refused the right images for good; called on other channels it ran a
    grouped convolution (8 outputs where 16 were declared)."""
    images = np.random.default_rng(0).normal(size=(8, 6, 6, 3)).astype("float32")
    layer = PatchWhitening(2, padding="valid", use_bias=True)
    with pytest.raises(ValueError, match="not built yet"):
        layer.set_bias_trainable(False)  # (AttributeError before)
    for bad, message in [(images[..., 0], r"adapt takes \(N, H, W, C\) images"),
                         (images[:0], "N >= 1"),
                         (np.where(images > 2, np.nan, images), "hold nan or inf"),
                         (images.astype(str), "images of numbers")]:
        with pytest.raises(ValueError, match=message):
            layer.adapt(bad)
        assert not layer.built
    layer.adapt(images)  # the right images after the wrong ones
    assert tuple(layer.kernel.shape) == (2, 2, 3, 12)
    with pytest.raises(ValueError, match="expected axis -1 of input shape to have value 3"):
        layer(np.zeros((1, 6, 6, 2), "float32"))
    for kwargs in (dict(patch_size=True), dict(epsilon=float("inf")), dict(epsilon=0)):
        with pytest.raises(ValueError, match="patch_size must be|epsilon must be"):
            PatchWhitening(**kwargs)
    # The builders compare the whitening images with their input.
    with pytest.raises(ValueError, match=r"whitening_images must be \(N, H, W, 3\) images, as the model's input"):
        models.resnet9(prep="whitening", whitening_images=images[..., :1].repeat(6, 1).repeat(6, 2))
    with pytest.raises(ValueError, match=r"whitening_images must be \(N, H, W, 3\) images"):
        models.airbench(whitening_images=np.zeros((2, 32, 32, 1), "float32"))


def test_resnet9_with_whitening_and_pool_before_bn(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(20, 32, 32, 3)).astype("float32")
    model = models.resnet9(width_multiplier=0.125, prep="whitening", whitening_images=images, pool_before_bn=True,
                           logit_scale=1 / 16)
    whitening = model.get_layer("prep_whitening")
    assert tuple(whitening.kernel.shape) == (3, 3, 3, 27) and not whitening.trainable_weights
    assert model.get_layer("prep_conv").kernel.shape[:2] == (1, 1)
    # conv-pool-BN-act in the pooling layers; the residual blocks are conv-BN-act.
    assert model.get_layer("layer1_bn").input is model.get_layer("layer1_pool").output
    assert model.get_layer("layer1_pool").input is model.get_layer("layer1_conv").output
    assert model.get_layer("layer1_res1_bn").input is model.get_layer("layer1_res1_conv").output
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(np.asarray(loaded.get_layer("prep_whitening").kernel.value),
                                  np.asarray(whitening.kernel.value))
    np.testing.assert_allclose(np.asarray(loaded(images[:2])), np.asarray(model(images[:2])), rtol=1e-5, atol=1e-6)
    # The keras.applications-style constructor takes the filters from the weights file.
    again = models.ResNet9(weights=path, width_multiplier=0.125, prep="whitening", pool_before_bn=True,
                           logit_scale=1 / 16)
    np.testing.assert_allclose(np.asarray(again(images[:2])), np.asarray(model(images[:2])), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="whitening_images"):
        models.resnet9(prep="whitening")


def test_the_bag_of_tricks_options_are_refused_on_other_models():
    with pytest.raises(ValueError, match="--prep, --pool_before_bn apply to --model=resnet9"):
        TrainConfig(model="resnet20", prep="whitening", pool_before_bn=True)
    with pytest.raises(ValueError, match="--pytorch_init applies to --model=resnet9 or airbench, not resnet20"):
        TrainConfig(model="resnet20", pytorch_init=True)


def test_pytorch_init_draws_kernels_as_pytorch_does():
    """Page's and airbench's code keep PyTorch's default init of nn.Conv2d / nn.Linear,
    uniform in +-1/sqrt(fan_in); haet drew resnet9's convs from he_uniform (sqrt(6)
    times wider) and both heads from Glorot uniform."""
    keras.utils.set_random_seed(0)
    page, default = models.resnet9(pytorch_init=True), models.resnet9()
    for name, fan_in in (("prep_conv", 27), ("layer1_conv", 576), ("layer3_res2_conv", 4608), ("dense", 512)):
        bound = 1 / np.sqrt(fan_in)
        kernel = np.asarray(page.get_layer(name).kernel.value)
        assert np.abs(kernel).max() <= bound + 1e-7 and np.abs(kernel).max() > 0.95 * bound, name
        assert np.std(kernel) == pytest.approx(bound / np.sqrt(3), rel=0.05), name
        wider = np.std(np.asarray(default.get_layer(name).kernel.value))
        assert wider > 2 * np.std(kernel), name  # he_uniform: x sqrt(6); Glorot at 512 -> 10: x 2.3
    head = models.airbench(pytorch_init=True, whitening_images=np.random.default_rng(0).normal(size=(64, 32, 32, 3)))
    kernel = np.asarray(head.get_layer("dense").kernel.value)
    assert np.abs(kernel).max() <= 1 / np.sqrt(256) + 1e-7 and kernel.shape == (256, 10)
    config = _flagfile_config("page_bag_of_tricks.flags")
    assert config.pytorch_init and config.cutout_size == 0  # the notebook's 10-epoch run has no cutout
    assert _flagfile_config("airbench94.flags").pytorch_init


def test_learning_rate_knots_in_epochs():
    schedule = schedules.PlannedPiecewiseLinear((0, 2, 8), (0.0, 1.0, 0.1), knot_unit="epochs")
    assert not schedule.needs_plan
    optimizer = keras.optimizers.SGD(schedule)
    schedule.attach(optimizer, 1.0, steps_per_epoch=10)  # the plan does not matter
    rates = [float(schedule(step)) for step in (0, 10, 20, 50, 80, 200)]
    np.testing.assert_allclose(rates, [0.0, 0.5, 1.0, 0.55, 0.1, 0.1], rtol=1e-6)
    again = schedules.PlannedPiecewiseLinear.from_config(schedule.get_config())
    assert (again.knot_unit, again.steps_per_epoch) == ("epochs", 10.0)
    with pytest.raises(ValueError, match="knots in epochs must increase"):
        schedules.PlannedPiecewiseLinear((0, 3, 2), (0, 1, 0), knot_unit="epochs")
    config = TrainConfig(lr_schedule="one_cycle", one_cycle_knots=(0, 2, 8), one_cycle_learning_rates=(0, 1, 0.1),
                         one_cycle_knot_unit="epochs", optimizer="sgd")
    assert schedules.learning_rate_schedule(config).knot_unit == "epochs"
    with pytest.raises(ValueError, match="strictly from 0 to 1"):
        TrainConfig(lr_schedule="one_cycle", one_cycle_knots=(0, 2, 8), one_cycle_learning_rates=(0, 1, 0.1))


def _flagfile_config(*names, **overrides):
    import os

    from absl import flags as absl_flags

    from conftest import REPO
    from haet import config as config_lib

    values = absl_flags.FlagValues()
    config_lib.define_flags(values)
    values(["prog"] + [f"--flagfile={os.path.join(REPO, 'flags', name)}" for name in names])
    return config_lib.config_from_flags(values, **overrides)


@pytest.mark.e2e
def test_the_bag_of_tricks_trains_evaluates_and_saves(tmp_path, cifar10_slice_dir):
    """The HAET flagfiles at a tiny size and a 12 s budget: whitening, pool before BN, shift
    multiplier, ghost BN, label smoothing, one-cycle planned to fit the budget, EMA every
    5 steps with statistics, airbench TTA; the headline chosen on the validation split,
    and the saved model is the one it scores."""
    from haet.training import train

    config = _flagfile_config(
        "page_bag_of_tricks.flags", "page_bag_of_tricks_haet.flags", data_dir=cifar10_slice_dir, train_size=200,
        validation_size=40, width_multiplier=0.0625, batch_size=32, ghost_batch_splits=2, budget_seconds=12.0,
        planner_probe_steps=5, tta="airbench", eval_batch_size=250, checkpoint_every=0.0)
    record, run_dir = train(config, results_dir=str(tmp_path))
    assert record["status"] == "completed"
    # The planner probed 1 + 5 steps (discarded), then planned whole epochs of 5 steps, or
    # part of one when not one fitted (a loaded machine): either they all ran, or the
    # budget ran out first. (Fewer probe steps when the compilation alone outlasts the budget.)
    assert 1 <= record["probe_steps"] <= 6 and record["planned_epochs"] >= 1
    if record["stopped_by"] == "planned":
        assert record["steps"] == record["planned_steps"]
        if record["planned_steps"] >= 5:
            assert record["planned_steps"] == record["planned_epochs"] * 5 == record["epochs_completed"] * 5
        else:
            assert record["planned_epochs"] == 1 and record["epochs_completed"] == 0
    else:
        assert record["stopped_by"] == "budget" and record["train_seconds"] >= 12.0
    assert set(record["test_accuracy_variants"]) == {"ema", "ema_tta_airbench", "raw", "raw_tta_airbench"}
    assert len({round(v, 6) for v in record["test_loss_variants"].values()}) == 4  # EMA and TTA each matter
    validation = record["validation_accuracy_variants"]
    chosen = "raw_tta_airbench" if validation["raw_tta_airbench"] > validation["ema_tta_airbench"] else \
        "ema_tta_airbench"
    assert record["headline_variant"] == chosen and record["headline_chosen_on"] == "validation"
    assert record["test_accuracy"] == record["test_accuracy_variants"][chosen]
    model = keras.saving.load_model(f"{run_dir}/model.keras")
    from haet import evaluation
    from haet.training import prepare_data

    data = prepare_data(config)
    probabilities = evaluation.predict_probabilities(model, data.dataset.x_test, 250, "airbench")
    assert evaluation.scores(probabilities, data.dataset.y_test, 10)["accuracy"] == pytest.approx(
        record["test_accuracy"], abs=1e-9)
    assert tuple(model.get_layer("resnet9").get_layer("prep_whitening").kernel.shape) == (3, 3, 3, 27)
