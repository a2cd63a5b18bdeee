"""Ensembles trained in one step (`--ensemble_members`): each member trains as if alone,
on its own batches; inference averages the members' probabilities."""

import dataclasses

import keras
import numpy as np
import pytest

from haet import models
from haet.engine import epoch_orders, epoch_permutation, make_engine

LOOPS = ["fused", "dispatch"] if keras.backend.backend() == "jax" else ["auto"]
CLASSES = 4


def _backbone(name):
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(6, 3, kernel_regularizer=keras.regularizers.L2(1e-2), name="conv")(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    outputs = keras.layers.Dense(CLASSES, name="logits")(h)
    return keras.Model(inputs, outputs, name=name)


def _compile(model):
    model.compile(keras.optimizers.SGD(0.2, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"],
                  jit_compile=True)
    return model


def _ensemble(members, seed=1):
    keras.utils.set_random_seed(seed)
    backbones = [_backbone(f"member{m}") for m in range(members)]
    return _compile(models.ensemble_with_input_pipeline(backbones, mean=np.full(3, 0.5), variance=np.full(3, 0.08)))


def _alone(ensemble, member):
    """Member `member` of `ensemble` as a single network with a copy of its weights."""
    single = models.with_input_pipeline(_backbone("alone"), mean=np.full(3, 0.5), variance=np.full(3, 0.08))
    for ours, theirs in zip(single.weights, ensemble.member_model(member).weights):
        ours.assign(np.asarray(theirs))
    return _compile(single)


def _data(n=24):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 8, 8, 3)).astype("uint8"), rng.integers(0, CLASSES, n).astype("int32")


@pytest.mark.parametrize("loop", LOOPS)
def test_each_member_trains_as_if_alone_on_its_own_batches(loop):
    """Three members, two epochs of 4-image steps in executions of 3, SGD with momentum,
    an L2 penalty and batch norm: every member ends with the weights, statistics and
    optimizer state of that network trained alone by Keras on the batches of its own
    order; the loss reported is the mean of the members' losses."""
    x, y = _data()
    ensemble = _ensemble(3)
    alone = [_alone(ensemble, m) for m in range(3)]
    engine = make_engine(ensemble, x, y, 4, seed=7, steps_per_execution=3, execution_loop=loop)
    assert engine.members == 3
    reported = []
    for epoch in range(2):
        engine.start_epoch(epoch)
        while engine.steps_left_in_epoch:
            reported += list(engine.run(min(3, engine.steps_left_in_epoch)))
    engine.sync()
    member_losses = np.zeros((3, 12))
    for m, single in enumerate(alone):
        for epoch in range(2):
            order = epoch_permutation(7, epoch, 24, member=m)
            for s in range(6):
                batch = order[s * 4:(s + 1) * 4]
                member_losses[m, epoch * 6 + s] = single.train_on_batch(x[batch], y[batch], return_dict=True)["loss"]
        sub = ensemble.member_model(m)
        for a, b in zip(sub.weights, single.weights):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6, err_msg=f"member {m} {a.path}")
        velocities = [v for v in single.optimizer.variables if "momentum" in v.path]
        ours = {id(v): i for i, v in enumerate(ensemble.trainable_variables)}
        ensemble_velocities = [v for v in ensemble.optimizer.variables if "momentum" in v.path]
        for variable, velocity in zip(sub.trainable_variables, velocities):
            np.testing.assert_allclose(np.asarray(ensemble_velocities[ours[id(variable)]]), np.asarray(velocity),
                                       rtol=2e-5, atol=2e-6)
    # Running means over each epoch of the members' mean loss (Keras reset per batch above).
    mean = member_losses.mean(axis=0)
    expected = [np.mean(mean[e * 6:e * 6 + k + 1]) for e in range(2) for k in range(6)]
    np.testing.assert_allclose(reported, expected, rtol=1e-4)


def test_inference_averages_the_members_probabilities_and_members_stand_alone():
    x, _ = _data(10)
    ensemble = _ensemble(3)
    members = [np.asarray(ensemble.member_model(m)(x), np.float64) for m in range(3)]
    probabilities = np.mean([np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(
        1, keepdims=True) for z in members], axis=0)
    logits = np.asarray(ensemble(x), np.float64)
    np.testing.assert_allclose(np.log(probabilities), logits, rtol=1e-5, atol=1e-5)
    # Members differ: each was initialized on its own.
    assert not np.allclose(members[0], members[1])
    # The members' weights given as the ensemble's lists score as the member itself.
    from haet.engine import current_weights, predictor_of

    weights = ensemble.member_weights(2, current_weights(ensemble))
    np.testing.assert_allclose(predictor_of(ensemble.member_model(2))(x, 4, weights), members[2], rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("tta", ["none", "flip", "airbench"])
def test_one_pass_scores_the_ensemble_and_each_member(tta):
    """`predict_ensemble_probabilities` (every member's logits once) equals predicting
    with the ensemble and then with each member alone, for TTA that averages
    probabilities (flip) and logits (airbench), with weights other than the model's."""
    from haet import evaluation
    from haet.engine import current_weights

    x, _ = _data(10)
    ensemble = _ensemble(3)
    assert ensemble.members_model().output_shape == (None, 3, CLASSES)
    trainable, non_trainable = current_weights(ensemble)
    # Other weights than the model's (as the raw weights next to EMA ones).
    weights = ([np.asarray(v) * 1.5 for v in trainable], [np.asarray(v) for v in non_trainable])
    probabilities, members = evaluation.predict_ensemble_probabilities(ensemble, x, 4, tta, weights=weights)
    np.testing.assert_allclose(probabilities, evaluation.predict_probabilities(ensemble, x, 4, tta, weights=weights),
                               rtol=1e-5, atol=1e-6)
    assert len(members) == 3
    for m, member in enumerate(members):
        alone = evaluation.predict_probabilities(ensemble.member_model(m), x, 4, tta,
                                                 weights=ensemble.member_weights(m, weights))
        np.testing.assert_allclose(member, alone, rtol=1e-6, atol=1e-7)
    # The model's own weights are not the ones given.
    assert not np.allclose(evaluation.predict_ensemble_probabilities(ensemble, x, 4, tta)[0], probabilities)


def test_log_mean_softmax_is_the_ensemble_layer_even_where_probabilities_underflow():
    from haet import evaluation

    logits = np.array([[[0.0, 800.0, -800.0], [900.0, 0.0, -900.0]], [[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]])
    expected = np.asarray(models.MemberAverage()([logits[:, 0], logits[:, 1]]), np.float64)
    ours = evaluation.log_mean_softmax(logits, axis=1)
    assert np.all(np.isfinite(ours))
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.exp(ours[1]), [0.5 * (a + b) for a, b in zip(
        np.exp([1, 2, 3]) / np.exp([1, 2, 3]).sum(), np.exp([3, 2, 1]) / np.exp([3, 2, 1]).sum())], rtol=1e-12)


def test_training_mode_gives_each_member_its_block_of_rows():
    x, _ = _data(12)
    ensemble = _ensemble(3)
    out = np.asarray(ensemble(x, training=False))
    assert out.shape == (12, CLASSES)
    block = np.asarray(ensemble(x, training=True))
    assert block.shape == (12, CLASSES)
    for m in range(3):
        rows = slice(4 * m, 4 * (m + 1))
        alone = np.asarray(ensemble.member_model(m)(x[rows], training=True))
        np.testing.assert_allclose(block[rows], alone, rtol=1e-5, atol=1e-5)


def test_an_ensemble_saves_and_loads_as_one_model(tmp_path):
    x, _ = _data(6)
    ensemble = _ensemble(2)
    path = str(tmp_path / "ensemble.keras")
    ensemble.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, models.EnsembleModel)
    assert loaded.ensemble_members == 2
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(ensemble(x)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(loaded.member_model(1)(x)), np.asarray(ensemble.member_model(1)(x)),
                               rtol=1e-5, atol=1e-6)


def test_epoch_orders_member_zero_is_the_single_network_order_and_copies_alternate():
    single = epoch_permutation(3, 5, 10)
    orders = epoch_orders(3, 5, 10, members=3).reshape(3, 10)
    np.testing.assert_array_equal(orders[0], single)
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])
    for row in orders:
        np.testing.assert_array_equal(np.sort(row), np.arange(10))
    # Two precomputed copies (alternating flip): in epoch 5 member 0 reads copy 1, member 1 copy 0.
    with_copies = epoch_orders(3, 5, 10, members=2, copies=2).reshape(2, 10)
    np.testing.assert_array_equal(with_copies[0], single + 10)
    np.testing.assert_array_equal(with_copies[1], epoch_permutation(3, 5, 10, member=1))


def test_member_batch_and_ensemble_checks():
    with pytest.raises(ValueError, match="member must be in"):
        models.MemberBatch(2, 2)
    with pytest.raises(ValueError, match="at least one member"):
        models.ensemble_with_input_pipeline([], mean=np.zeros(3))
    other = keras.Model(i := keras.Input((8, 8, 3)), keras.layers.Dense(5)(keras.layers.Flatten()(i)))
    with pytest.raises(ValueError, match="same images and classes"):
        models.ensemble_with_input_pipeline([_backbone("a"), other], mean=np.zeros(3))
    with pytest.raises(ValueError, match=r"member must be in \[0, 2\)"):
        _ensemble(2).member_model(2)


def test_a_run_trains_an_ensemble_and_records_every_member(tmp_path, cifar10_slice_dir):
    """Three members with augmentation, EMA, flip TTA, a validation split and the health
    monitor: the record has each member's accuracy and the ensemble's; the saved model
    is the ensemble, and its accuracy is that of the mean of its members' probabilities."""
    from haet import evaluation
    from haet.training import TrainConfig, train

    config = TrainConfig(budget_seconds=600.0, data_dir=cifar10_slice_dir, train_size=100, model="tiny_cnn",
                         width_multiplier=1, batch_size=20, optimizer="sgd", lr_schedule="constant",
                         learning_rate=0.05, lr_schedule_unit="steps", epochs=2, augmentation="crop_flip_cutout",
                         eval_batch_size=250, validation_size=20, ema_decay=0.9, tta="flip", health_every_steps=2,
                         ensemble_members=3, steps_per_execution=3)
    record, run_dir = train(config, results_dir=str(tmp_path))
    assert record["status"] == "completed" and record["steps"] == 8
    assert record["model"] == "tiny_cnn_ensemble_of_3"
    # Each member trained on 8 steps of 20 images: 2 epochs each; the device on three times that.
    assert record["images_seen"] == 160 and record["epochs_equivalent"] == 2.0
    assert record["images_per_second"] == pytest.approx(480 / record["train_seconds"], rel=1e-3)
    assert 0 < record["between_executions_seconds"] < record["train_seconds"]  # validation between epochs
    for split, size in (("test", 500), ("validation", 20)):
        accuracies = record[f"member_{split}_accuracies"]
        assert len(accuracies) == 3 and all(0 <= a <= 1 for a in accuracies)
        assert record[f"mean_member_{split}_accuracy"] == pytest.approx(np.mean(accuracies))
    model = keras.saving.load_model(f"{run_dir}/model.keras")
    assert isinstance(model, models.EnsembleModel) and model.ensemble_members == 3
    x_test = np.load(f"{cifar10_slice_dir}/test.npz")["x"]
    y_test = np.load(f"{cifar10_slice_dir}/test.npz")["y"]
    members = [evaluation.predict_probabilities(model.member_model(m), x_test, 250, "flip") for m in range(3)]
    for m in range(3):
        assert evaluation.scores(members[m], y_test, 10)["accuracy"] == pytest.approx(
            record["member_test_accuracies"][m])
    # The ensemble's TTA averages the views of log-mean probabilities; without TTA it is
    # exactly the mean of the members' probabilities.
    plain = [evaluation.predict_probabilities(model.member_model(m), x_test, 250) for m in range(3)]
    variant = record["headline_variant"].replace("_tta_flip", "")
    assert evaluation.scores(np.mean(plain, axis=0), y_test, 10)["accuracy"] == pytest.approx(
        record["test_accuracy_variants"][variant])
    import csv

    with open(f"{run_dir}/history.csv") as f:
        rows = list(csv.DictReader(f))
    assert all(float(r["health_update_ratio_median"]) > 0 for r in rows)
    with open(f"{run_dir}/health.csv") as f:
        names = {r["variable"] for r in csv.DictReader(f)}
    assert {n.split("/")[0] for n in names} == {"member0", "member1", "member2", "(all)"}


def test_airbench_members_each_have_their_whitening_bias_gated():
    from haet.training import FreezeWhiteningBias, _whitening_layers

    keras.utils.set_random_seed(0)
    images = np.random.default_rng(0).normal(size=(64, 32, 32, 3)).astype("float32")
    backbones = [models.airbench(width_multiplier=0.25, whitening_images=images, name=f"airbench_member{m}")
                 for m in range(2)]
    ensemble = models.ensemble_with_input_pipeline(backbones, mean=np.zeros(3))
    layers = _whitening_layers(ensemble)
    assert len(layers) == 2 and layers[0] is not layers[1]
    assert models.backbone_of(ensemble) is backbones[0]

    class Engine:  # the hook writes through the engine
        def assign(self, variable, value):
            variable.assign(value)

    hook = FreezeWhiteningBias(layers, 3)
    run = type("Run", (), {"engine": Engine()})()
    hook.on_epoch_begin(run, 2)
    assert [float(np.asarray(layer.bias_gate)) for layer in layers] == [1.0, 1.0]
    hook.on_epoch_begin(run, 3)
    assert [float(np.asarray(layer.bias_gate)) for layer in layers] == [0.0, 0.0]


def test_init_from_cannot_start_every_member_from_one_model(tmp_path):
    from haet.training import TrainConfig

    path = tmp_path / "model.keras"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="same weights"):
        TrainConfig(init_from=str(path), ensemble_members=2)


def test_the_ensemble_benchmark_times_every_mechanism(tmp_path):
    """scripts/bench_ensembles.py's measurements on a tiny network: N separate steps, the
    N-branch step and (JAX) the vmapped step, each a positive time."""
    import importlib.util
    import os

    from conftest import REPO
    from haet import bench, training

    spec = importlib.util.spec_from_file_location("bench_ensembles", os.path.join(REPO, "scripts",
                                                                                  "bench_ensembles.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = training.TrainConfig(model="tiny_cnn", width_multiplier=1, batch_size=8, train_size=40,
                                  augmentation="crop_flip_cutout", ensemble_members=2)
    bench.prepare_data_dir(config, str(tmp_path), 10)
    config = dataclasses.replace(config, data_dir=str(tmp_path))
    with training.settings_of(config) as settings:
        data = training.prepare_data(config)
        rows = module.keras_steps(config, data, settings, 2, 1)
        expected = ["separate", "branches"]
        if keras.backend.backend() == "jax":
            rows += module.jax_steps(config, data, settings, 2, 1)
            expected += ["sgd_separate", "sgd_branches", "sgd_vmap"]
    assert [name for name, _, _ in rows] == expected
    assert all(seconds > 0 and compile_seconds >= 0 for _, seconds, compile_seconds in rows)


def test_recomputed_batch_norm_statistics_are_each_members_own_on_whole_batches():
    from haet.averaging import recompute_batch_norm_statistics

    x, _ = _data(16)
    ensemble = _ensemble(2)
    recompute_batch_norm_statistics(ensemble, x, 8)
    statistics = [[np.asarray(w) for w in ensemble.get_layer(f"member{m}").get_layer("bn").non_trainable_weights]
                  for m in range(2)]
    for m in range(2):
        recompute_batch_norm_statistics(ensemble.member_model(m), x, 8)
        alone = [np.asarray(w) for w in ensemble.get_layer(f"member{m}").get_layer("bn").non_trainable_weights]
        for a, b in zip(statistics[m], alone):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not np.allclose(statistics[0][0], statistics[1][0])


def test_grad_cam_explains_one_member_and_report_labels_name_the_ensemble():
    from haet import report
    from haet.explain import grad_cam

    x, _ = _data(3)
    ensemble = _ensemble(2)
    for m in range(2):
        result = grad_cam(ensemble, x, member=m)
        np.testing.assert_allclose(result["logits"], np.asarray(ensemble.member_model(m)(x)), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="single network"):
        grad_cam(ensemble.member_model(0), x, member=1)
    record = {"model": "resnet20_ensemble_of_4",
              "flags": {"model": "resnet20", "width_multiplier": 6, "batch_size": 32, "ensemble_members": 4}}
    assert report.recipe_of(record) == "resnet20 width 6, batch 32, ensemble of 4"
