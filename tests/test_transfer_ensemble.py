"""Transfer learning (class subsets, --init_from, frozen stages) and ensembles of runs."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest

from conftest import REPO, run_tool_cases, shared_dataset_dir
from haet import data, evaluation, models, training
from haet.training import TrainConfig, train


def test_select_classes_relabels_in_the_given_order(cifar10_arrays):
    x, y, xt, yt = cifar10_arrays
    ds = data.Dataset(data.DATASETS["cifar10"], x[:2000], y[:2000], xt[:1000], yt[:1000], "test")
    sub = data.select_classes(ds, (9, 1))
    assert sub.info.class_names == ("truck", "automobile") and sub.info.num_classes == 2
    assert sub.info.name == "cifar10[9,1]"
    assert set(np.unique(sub.y_train)) == {0, 1}
    assert np.array_equal(sub.x_train[sub.y_train == 0], x[:2000][y[:2000] == 9])
    assert len(sub.y_test) == int(np.isin(yt[:1000], [9, 1]).sum()) == sub.info.test_examples
    assert data.select_classes(ds, ()) is ds
    for bad in [(1,), (1, 1), (1, 10)]:
        with pytest.raises(ValueError, match="at least 2 distinct ids in \\[0, 10\\)"):
            data.select_classes(ds, bad)


def _tiny(**changes):
    base = dict(budget_seconds=600.0, dataset="mnist", data_dir=shared_dataset_dir("mnist"), train_size=100,
                model="resnet9", width_multiplier=0.125, batch_size=25, optimizer="sgd",
                lr_schedule="cosine", lr_schedule_unit="steps", learning_rate=0.05, epochs=2,
                augmentation="none", input_normalization="channel_standardize", eval_batch_size=1000)
    base.update(changes)
    return TrainConfig(**base)


@pytest.mark.e2e
def test_fine_tuning_copies_the_backbone_replaces_the_head_and_freezes_stages(tmp_path):
    source_record, source_dir = train(_tiny(classes=(0, 1, 2, 3, 4)), results_dir=str(tmp_path / "src"))
    assert source_record["dataset"] == "mnist[0,1,2,3,4]" and source_record["test_examples"] == 5139
    source = keras.saving.load_model(os.path.join(source_dir, "model.keras"))
    config = _tiny(classes=(5, 6, 7, 8, 9, 0), train_size=120, learning_rate=0.01, freeze_stages=2,
                   init_from=os.path.join(source_dir, "model.keras"), save_model=True)
    record, run_dir = train(config, results_dir=str(tmp_path / "dst"))
    tuned = keras.saving.load_model(os.path.join(run_dir, "model.keras"))
    transfer = record["transfer"]
    # prep and layer1 (conv + BN each, and layer1's two residual convs) are frozen.
    assert transfer["layers_frozen"] == 3 * 2 * 2 + 2 and transfer["parameters_frozen"] > 0
    src, dst = models.backbone_of(source), models.backbone_of(tuned)
    for name in ("prep_conv", "layer1_res2_conv", "prep_bn"):
        for a, b in zip(src.get_layer(name).get_weights(), dst.get_layer(name).get_weights()):
            np.testing.assert_array_equal(a, b)  # frozen: unchanged by fine-tuning
    trained = [not np.array_equal(a, b) for a, b in zip(src.get_layer("layer3_conv").get_weights(),
                                                        dst.get_layer("layer3_conv").get_weights())]
    assert trained[0]  # later stages were fine-tuned
    assert dst.get_layer("dense").get_weights()[0].shape[-1] == 6  # a new head for 6 classes
    assert record["test_examples"] == int(np.isin(data.load_dataset("mnist", shared_dataset_dir("mnist")).y_test,
                                                  [5, 6, 7, 8, 9, 0]).sum())
    assert transfer["layers_not_transferred"] == [] and transfer["input_normalization_transferred"] is True
    # The source's per-channel statistics (of digits 0-4), not those of the new images (5-9, 0).
    for a, b in zip(models.input_statistics_of(source), models.input_statistics_of(tuned)):
        np.testing.assert_array_equal(a, b)
    scratch, _, _ = training.build_model(dataclasses.replace(config, init_from=None, freeze_stages=0),
                                         training.prepare_data(config))
    assert not np.array_equal(models.input_statistics_of(scratch)[0], models.input_statistics_of(tuned)[0])
    with pytest.raises(ValueError, match="No layer of .* matches"):
        train(_tiny(model="resnet20", width_multiplier=1, init_from=os.path.join(source_dir, "model.keras")),
              results_dir=str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()  # refused before the run folder was made
    with pytest.raises(ValueError, match="freeze_stages needs --init_from"):
        _tiny(freeze_stages=1)
    with pytest.raises(ValueError, match=r"freeze_stages must be in \[0, 4\]"):
        _tiny(freeze_stages=5, init_from=os.path.join(source_dir, "model.keras"))


def _saved_tiny_cnn(path, input_shape):
    backbone = models.tiny_cnn(num_classes=5, input_shape=input_shape, width_multiplier=0.5)
    model = models.with_input_pipeline(backbone, np.zeros(input_shape, np.float32))
    model.save(path)
    return model


def test_a_model_to_fine_tune_from_that_cannot_load_or_fit_is_refused_before_anything_is_written(
        tmp_path, monkeypatch):
    from haet.training import SetupError, SetupInterrupted

    results_dir = tmp_path / "runs"
    tiny = dict(model="tiny_cnn", width_multiplier=0.5, lr_schedule="constant", epochs=1)
    junk = tmp_path / "junk.keras"
    junk.write_text("not a model")
    truncated = tmp_path / "truncated.keras"
    _saved_tiny_cnn(tmp_path / "whole.keras", (28, 28, 1))
    truncated.write_bytes((tmp_path / "whole.keras").read_bytes()[:1000])
    read = []
    real_prepare_data = training.prepare_data
    monkeypatch.setattr(training, "prepare_data", lambda config: read.append(config) or real_prepare_data(config))
    for bad in (junk, truncated):
        with pytest.raises(SetupError, match=rf"--init_from='{bad}' cannot be loaded as a Keras model \(not a zip "
                                             r"archive, as a \.keras file is.*Pass the model\.keras of a completed"):
            train(_tiny(init_from=str(bad), **tiny), results_dir=str(results_dir))
    assert not read  # refused before the data were read
    # Loads, but fits nothing of the network to train (Keras' "File not found" was the message before).
    with pytest.raises(SetupError, match=r"--init_from=.*whole\.keras.*No layer of .* matches .* same --model"):
        train(_tiny(init_from=str(tmp_path / "whole.keras")), results_dir=str(results_dir))
    # Trained on RGB images: block1's conv cannot be copied into a model of MNIST's one channel,
    # so freezing block1 would freeze random weights.
    _saved_tiny_cnn(tmp_path / "rgb.keras", (28, 28, 3))
    with pytest.raises(SetupError, match=r"freeze_stages=1 would freeze block1_conv of .* at their random "
                                         r"initialization"):
        train(_tiny(init_from=str(tmp_path / "rgb.keras"), freeze_stages=1, **tiny), results_dir=str(results_dir))
    assert not results_dir.exists()  # no failed run folder for any of them
    # Without freezing, it trains, and the record names what kept its initialization.
    record, _ = train(_tiny(init_from=str(tmp_path / "rgb.keras"), **tiny), results_dir=str(results_dir))
    assert record["status"] == "completed"
    assert record["transfer"]["layers_not_transferred"] == ["block1_conv"]
    assert record["transfer"]["layers_transferred"] == 3  # block1_bn, block2_conv, block2_bn
    assert record["transfer"]["input_normalization_transferred"] is False  # RGB statistics, grayscale images
    # Loading the source first (to refuse it before the data) leaves the fresh layers' initialization as a
    # model built without a source has it: Keras seeds the initializers it makes while loading from
    # Python's random generator.
    config = _tiny(init_from=str(tmp_path / "rgb.keras"), **tiny)
    data = real_prepare_data(config)

    def fresh_layers(config):
        keras.utils.set_random_seed(0)
        model, _, _ = training.build_model(config, data)
        backbone = models.backbone_of(model)
        return [w for name in ("block1_conv", "logits") for w in backbone.get_layer(name).get_weights()]

    for a, b in zip(fresh_layers(config), fresh_layers(dataclasses.replace(config, init_from=None))):
        np.testing.assert_array_equal(a, b)
    # A second stop signal while setting up: nothing was written, and the error says so.
    monkeypatch.setattr(training, "prepare_data", lambda config: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(SetupInterrupted, match="during setup, before anything was written"):
        train(_tiny(**tiny), results_dir=str(tmp_path / "interrupted"))
    assert not (tmp_path / "interrupted").exists()


def test_ensemble_of_two_different_models_averages_their_probabilities():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, 40)

    def model(seed):
        keras.utils.set_random_seed(seed)
        inputs = keras.Input((8, 8, 3), dtype="uint8")
        x = keras.layers.Rescaling(1 / 255)(inputs)
        x = keras.layers.Flatten()(x)
        return keras.Model(inputs, keras.layers.Dense(3)(x))

    a, b = model(1), model(2)

    def softmax(z):
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    pa = softmax(np.asarray(a.predict(images, verbose=0), np.float64))
    pb = softmax(np.asarray(b.predict(images, verbose=0), np.float64))
    from haet.ensemble import evaluate_ensemble

    members, ensemble = evaluate_ensemble([a, b], images, labels, 3, batch_size=16)
    assert members[0]["accuracy"] == pytest.approx(((pa.argmax(1)) == labels).mean())
    assert members[1]["accuracy"] == pytest.approx(((pb.argmax(1)) == labels).mean())
    mean = (pa + pb) / 2
    assert ensemble["accuracy"] == pytest.approx((mean.argmax(1) == labels).mean())
    assert ensemble["loss"] == pytest.approx(-np.log(mean[np.arange(40), labels]).mean(), rel=1e-5)
    assert not np.array_equal(pa.argmax(1), pb.argmax(1))  # the members really differ
    with pytest.raises(ValueError, match="different shapes"):
        evaluation.ensemble([pa, pb[:10]], labels, 3)


@pytest.mark.e2e
def test_ensemble_command_on_two_real_runs(tmp_path):
    runs = [train(_tiny(seed=s, epochs=1), results_dir=str(tmp_path / "runs"))[1] for s in (0, 1)]
    env = dict(os.environ, PYTHONPATH=REPO)
    result = subprocess.run([sys.executable, "-m", "haet.ensemble", f"--runs={','.join(runs)}",
                             f"--results_dir={tmp_path / 'ens'}"], env=env, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    (out,) = os.listdir(tmp_path / "ens")
    record = json.loads(open(tmp_path / "ens" / out / "record.json").read())
    singles = [json.loads(open(os.path.join(r, "record.json")).read())["test_accuracy"] for r in runs]
    assert record["member_test_accuracies"] == pytest.approx(singles)
    assert record["test_examples"] == 10000 and 0 <= record["ensemble_test_accuracy"] <= 1
    # Refused before any member is scored, in one line: one run, a results folder that is a
    # file, a member whose model is damaged.
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    shutil.copytree(runs[1], tmp_path / "damaged_run")
    with open(tmp_path / "damaged_run" / "model.keras", "r+b") as f:
        f.truncate(1000)
    bad, into_file, damaged = run_tool_cases("haet.ensemble", [
        [f"--runs={runs[0]}"], [f"--runs={','.join(runs)}", f"--results_dir={a_file}"],
        [f"--runs={runs[0]},{tmp_path / 'damaged_run'}", f"--results_dir={tmp_path / 'ens2'}"]], cwd=REPO)
    assert bad.returncode == 2 and "at least two run folders" in bad.stderr
    assert into_file.returncode == 2 and "is a file, not a folder" in into_file.stderr
    assert "Traceback" not in into_file.stderr
    assert damaged.returncode == 2 and "model.keras cannot be loaded" in damaged.stderr
    assert "Traceback" not in damaged.stderr and not (tmp_path / "ens2").exists()


def test_an_ensemble_refuses_a_run_twice_and_runs_that_did_not_complete(tmp_path):
    from haet import ensemble, results

    a = tmp_path / "a"
    a.mkdir()
    with pytest.raises(ValueError, match="the same run folder"):
        ensemble.check_members([str(a), str(tmp_path / "." / "a") + "/"])
    ensemble.check_members([str(a), str(tmp_path / "b")])
    # `--runs=A,B,` (was: "record.json does not exist", naming no entry)
    with pytest.raises(ValueError, match=r"--runs has an empty entry \(number 3 of 3: a stray comma\?\)"):
        ensemble.check_members([str(a), str(tmp_path / "b"), ""])
    results.write_record(str(a), {"status": "interrupted", "flags": {}})
    with pytest.raises(ValueError, match="did not complete \\(status 'interrupted'\\)"):
        ensemble.config_of_run(str(a))
