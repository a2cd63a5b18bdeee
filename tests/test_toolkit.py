"""Validation split, model selection, snapshot ensembles and TensorBoard in `train`."""

import csv
import dataclasses
import os

import numpy as np
import pytest

from haet.schedules import cycle_ends
from haet.training import TrainConfig, split_validation, train


def _tiny(data_dir, **changes):
    base = dict(
        budget_seconds=600.0, data_dir=data_dir, train_size=200, model="tiny_cnn", width_multiplier=1.0,
        batch_size=25, optimizer="sgd", augmentation="none", input_normalization="channel_standardize",
        eval_batch_size=250, save_model=False,
    )
    base.update(changes)
    return TrainConfig(**base)


def test_validation_split_is_class_balanced_disjoint_and_seeded(cifar10_arrays):
    x, y = cifar10_arrays[0][:1000], cifar10_arrays[1][:1000]
    x_fit, y_fit, x_val, y_val = split_validation(x, y, 100, 10, seed=1)
    assert len(y_fit) == 900 and len(y_val) == 100
    assert np.bincount(y_val, minlength=10).tolist() == [10] * 10
    fit_rows = {row.tobytes() for row in x_fit.reshape(900, -1)}
    assert not any(row.tobytes() in fit_rows for row in x_val.reshape(100, -1))
    again = split_validation(x, y, 100, 10, seed=1)
    assert np.array_equal(again[3], y_val) and np.array_equal(again[2], x_val)
    assert not np.array_equal(split_validation(x, y, 100, 10, seed=2)[2], x_val)
    with pytest.raises(ValueError, match="not a multiple of the 10 classes"):
        split_validation(x, y, 105, 10, seed=1)


def test_keep_best_and_early_stopping_select_on_validation_only(tmp_path, cifar10_slice_dir):
    # A learning rate far too large after the first epochs: validation accuracy
    # peaks early and early stopping ends the run before the 12 planned epochs.
    config = _tiny(cifar10_slice_dir, lr_schedule="constant", learning_rate=3.0, lr_schedule_unit="steps",
                   epochs=12, validation_size=50, early_stopping_patience=3, keep_best=True, evaluate_test=False)
    record, run_dir = train(config, results_dir=str(tmp_path))
    assert record["train_examples"] == 150 and record["validation_examples"] == 50
    assert record["test_accuracy"] is None and record["test_examples"] == 0
    assert "test_accuracy_variants" not in record
    assert not os.path.exists(os.path.join(run_dir, "confusion_matrix.csv"))
    with open(os.path.join(run_dir, "history.csv")) as f:
        rows = list(csv.DictReader(f))
    val = [float(r["val_accuracy"]) for r in rows]
    assert len(val) == record["epochs"]
    best = int(np.argmax(val))
    assert record["best_validation_epoch"] == best + 1
    # Either early stopping ended the run 3 epochs after the best one, or all 12 ran.
    assert record["epochs"] == (best + 1 + 3 if record["stopped_early"] else 12)
    # The final model is the best epoch's: its validation accuracy is that epoch's.
    assert record["validation_accuracy"] == pytest.approx(max(val), abs=1e-6)
    assert set(record["validation_accuracy_variants"]) == {"best"}


def test_snapshot_ensemble_of_cosine_restarts_with_tensorboard(tmp_path, cifar10_slice_dir):
    config = _tiny(cifar10_slice_dir, lr_schedule="cosine_restarts", learning_rate=0.05, lr_cycles=3,
                   lr_schedule_unit="steps", epochs=3, snapshot_ensemble=True, tensorboard=True,
                   validation_size=50, tta="flip")
    record, run_dir = train(config, results_dir=str(tmp_path))
    # 150 images / 25 = 6 steps an epoch, 18 planned: snapshots after steps 6, 12 and 18.
    assert record["steps"] == 18 and len(record["test_snapshot_accuracies"]) == 3
    assert set(record["test_accuracy_variants"]) == {
        "final", "final_tta_flip", "snapshot_ensemble", "snapshot_ensemble_tta_flip"}
    assert record["test_snapshot_accuracies"][-1] == record["test_accuracy_variants"]["final"]
    assert len(set(record["test_snapshot_accuracies"])) > 1
    assert record["test_accuracy"] == record["test_accuracy_variants"]["final_tta_flip"]
    events = [f for _, _, files in os.walk(os.path.join(run_dir, "tensorboard")) for f in files]
    assert any(f.startswith("events.out.tfevents") for f in events)
    warm = dataclasses.replace(config, warmup=0.2)
    assert cycle_ends(warm) == pytest.approx((0.2 + 0.8 / 3, 0.2 + 1.6 / 3, 1.0)) and cycle_ends(warm)[-1] == 1.0
    with pytest.raises(ValueError, match="snapshot_ensemble keeps the raw weights"):
        dataclasses.replace(config, ema_decay=0.9)


@pytest.mark.parametrize("changes, message", [
    (dict(keep_best=True), "set --validation_size"),
    (dict(early_stopping_patience=2), "set --validation_size"),
    (dict(evaluate_test=False), "evaluate_test=False needs --validation_size"),
    (dict(validation_size=190), "leaves fewer than batch_size=25"),
    (dict(validation_size=50, keep_best=True, ema_decay=0.9), "choose the final weights"),
])
def test_bad_validation_settings(changes, message, cifar10_slice_dir):
    with pytest.raises(ValueError, match=message):
        _tiny(cifar10_slice_dir, **changes)


def test_health_monitor_update_is_learning_rate_times_gradient():
    """Plain SGD on the whole (fixed) set each step: every update is exactly lr x the probe gradient,
    at every sample (the gradient function is compiled once, its weights arguments, not constants):
    the loss is traced once (it ran eagerly at every sample, 0.7 s each for ResNet-20 on the CPU)."""
    import keras

    from haet.budget import WallClockBudget
    from haet.engine import make_engine
    from haet.hooks import TrainingHealth
    from haet.loop import Training

    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(16, 5)).astype("float32")
    y = np.arange(16) % 3
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(3)])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss, jit_compile=True)
    traced = []
    health = TrainingHealth(x, y, lambda labels, logits: traced.append(1) or loss(labels, logits), every_steps=2)
    before = [np.array(v) for v in model.trainable_variables]
    engine = make_engine(model, x, y, 16, steps_per_execution=8)
    budget = WallClockBudget(1000.0)
    Training(engine, budget, [health, budget], epochs=6).fit()
    assert sorted({r["step"] for r in health.rows}) == [0, 2, 4] and len(traced) == 1
    first = [r for r in health.rows if r["step"] == 0]
    assert [r["variable"] for r in first][-1] == "(all)" and len(first) == 3  # two kernels + total
    for r in health.rows:
        if r["variable"] != "(all)":
            assert r["update_norm"] == pytest.approx(0.1 * r["grad_norm"], rel=1e-4), r
        assert r["update_ratio"] == pytest.approx(r["update_norm"] / r["weight_norm"])
    assert health.rows[0]["grad_norm"] != pytest.approx(health.rows[-3]["grad_norm"], rel=1e-3)
    kernel = before[0]
    assert first[0]["weight_norm"] == pytest.approx(np.linalg.norm(kernel), rel=1e-6)
    with pytest.raises(ValueError, match="every_steps must be a positive integer"):
        TrainingHealth(x, y, loss, every_steps=0)


def test_health_monitor_in_a_run_writes_health_csv_and_history(tmp_path, cifar10_slice_dir):
    config = _tiny(cifar10_slice_dir, lr_schedule="constant", learning_rate=0.05, epochs=2,
                   lr_schedule_unit="steps", health_every_steps=4, tensorboard=True, label_smoothing=0.1)
    record, run_dir = train(config, results_dir=str(tmp_path))
    with open(os.path.join(run_dir, "health.csv")) as f:
        rows = list(csv.DictReader(f))
    assert sorted({int(r["step"]) for r in rows}) == [0, 4, 8, 12]  # 2 epochs of 8 steps
    assert all(float(r["grad_norm"]) > 0 and 0 < float(r["update_ratio"]) < 1 for r in rows)
    with open(os.path.join(run_dir, "history.csv")) as f:
        history = list(csv.DictReader(f))
    assert all(float(h["health_grad_norm"]) > 0 for h in history)
    assert os.listdir(os.path.join(run_dir, "tensorboard", "health"))


def test_snapshot_keeper_keeps_the_weights_at_each_cycle_end_and_the_final_ones():
    import keras

    from haet.budget import Progress, WallClockBudget
    from haet.engine import make_engine
    from haet.hooks import SnapshotKeeper
    from haet.loop import Hook, Training

    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.SparseCategoricalCrossentropy(
        from_logits=True), jit_compile=True)
    kept_at = []

    class Weights(Hook):
        def after_execution(self, run, steps, losses):
            run.engine.sync()
            kept_at.extend([[np.array(v) for v in model.trainable_variables]] * steps)

    engine = make_engine(model, x, np.arange(8) % 2, 8, steps_per_execution=4)
    budget = WallClockBudget(1000.0)
    # 10 steps; progress = steps / 10: snapshots after steps 3 and 6, and at the end.
    keeper = SnapshotKeeper([0.3, 0.6, 1.0], Progress(budget, lambda: 10))
    Training(engine, budget, [budget, keeper, Weights()], epochs=10).fit()
    assert [f for f, _ in keeper.snapshots] == [0.3, 0.6, 1.0]
    for (_, (trainable, _)), step in zip(keeper.snapshots, (3, 6, 10)):
        for a, b in zip(trainable, kept_at[step - 1]):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(keeper.snapshots[0][1][0][0], keeper.snapshots[1][1][0][0])
