import csv
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import flags as absl_flags

from conftest import REPO
from haet import results
from haet.training import TrainConfig, train

REQUIRED_KEYS = {
    "test_accuracy", "test_loss", "test_examples", "train_examples", "epochs", "steps",
    "budget_seconds", "train_seconds", "setup_seconds", "compile_seconds", "eval_seconds",
    "images_per_second", "backend", "device", "precision", "versions", "git_commit", "flags",
    "subset_sha256", "published",
}


def _run_cli(*args, results_dir):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run(
        [sys.executable, "-m", "haet.train", f"--results_dir={results_dir}", *args],
        env=env, capture_output=True, text=True, cwd=REPO,
    )


def test_end_to_end_on_real_cifar10_writes_a_complete_record(tmp_path, cifar10_slice_dir):
    out = tmp_path / "runs"
    result = _run_cli(
        "--budget=4", f"--data_dir={cifar10_slice_dir}", "--train_size=200", "--width_multiplier=1",
        "--batch_size=20", "--eval_batch_size=250", results_dir=out,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = list(out.iterdir())
    assert sorted(os.listdir(run_dir)) == ["confusion_matrix.csv", "history.csv", "learning_curves.png", "model.keras",
                                         "record.json"]
    record = json.loads((run_dir / "record.json").read_text())
    assert REQUIRED_KEYS <= set(record)
    assert record["test_examples"] == 500 and record["train_examples"] == 200
    assert 0.0 <= record["test_accuracy"] <= 1.0 and np.isfinite(record["test_loss"])
    # Stopped at the first step boundary after 4 s (compilation included).
    assert record["train_seconds"] >= 4.0 and record["steps"] >= 1
    assert record["images_per_second"] == pytest.approx(record["steps"] * 20 / record["train_seconds"], abs=0.01)
    assert record["precision"] == "float32" and record["xla"] is True
    assert record["flags"]["width_multiplier"] == 1 and record["budget_seconds"] == 4.0
    assert record["published"] is None  # 200 images: not the UMBC setting
    with open(run_dir / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == record["epochs"] and sum(int(r["steps"]) for r in rows) == record["steps"]
    assert "epoch 1" in result.stderr and "test accuracy" in result.stderr


def test_record_compares_with_umbc_only_in_its_setting():
    from haet.training import _published_comparison

    same = _published_comparison(TrainConfig(), 0.861)
    assert same["test_accuracy"] == 0.851 and same["difference"] == pytest.approx(0.01)
    assert "1,000-image test subset" in same["protocol"]
    shorter = _published_comparison(TrainConfig(budget_seconds=60), 0.5)
    assert "budget 60 s, theirs 600 s" in " ".join(shorter["protocol_differences"])
    assert _published_comparison(TrainConfig(train_size=1000), 0.5) is None


def test_run_folders_and_records_are_never_overwritten(tmp_path):
    a = results.make_run_dir(str(tmp_path), "x")
    b = results.make_run_dir(str(tmp_path), "x")
    assert a != b and os.path.isdir(a) and os.path.isdir(b)
    results.write_record(a, {"test_accuracy": 0.5})
    with pytest.raises(FileExistsError):
        results.write_record(a, {"test_accuracy": 0.9})
    assert json.loads(open(os.path.join(a, "record.json")).read())["test_accuracy"] == 0.5


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"dataset": "imagenet"}, "Unknown dataset 'imagenet'"),
        ({"model": "vgg"}, "Unknown model 'vgg'. Allowed: resnet20"),
        ({"precision": "half"}, "Unknown precision 'half'. Allowed: auto, float32"),
        ({"fill_modes": ("nearest", "mirror")}, "Unknown fill mode 'mirror'"),
        ({"budget_seconds": 0}, "budget must be a positive number of seconds. Received: budget=0"),
        ({"budget_seconds": -5.0}, "Received: budget=-5.0"),
        ({"train_size": 5005}, "train_size=5005 is not a multiple of the 10 classes"),
        ({"train_size": 60000}, "train_size=60000 is larger than the 50000 training images"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"batch_size": 64, "train_size": 50}, "batch_size=64 is larger than train_size=50"),
        ({"learning_rates": (1e-3,)}, "learning rate schedule needs one more value"),
        ({"augment_strengths": (1.0, 0.5, 2.0, 0, 0, 0, 0)}, r"strength schedule values must be in \[0.0, 1.0\]"),
        ({"rotation_range": 400.0}, "rotation_range must be a number in"),
    ],
)
def test_bad_settings_fail_before_training(tmp_path, changes, message):
    config = dataclasses.replace(TrainConfig(), **changes)
    with pytest.raises(ValueError, match=message):
        train(config, results_dir=str(tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()


def test_bad_data_fails_before_training(tmp_path):
    np.savez(tmp_path / "train.npz", x=np.zeros((100, 32, 32), np.uint8), y=np.zeros(100, np.uint8))
    np.savez(tmp_path / "test.npz", x=np.zeros((10, 32, 32, 3), np.uint8), y=np.zeros(10, np.uint8))
    config = TrainConfig(data_dir=str(tmp_path), train_size=100)
    with pytest.raises(ValueError, match=r"images must have shape \(N, 32, 32, 3\)"):
        train(config, results_dir=str(tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()


def test_cli_reports_bad_input_and_writes_nothing(tmp_path):
    result = _run_cli("--budget=-1", results_dir=tmp_path / "runs")
    assert result.returncode != 0
    assert "budget must be a positive number of seconds. Received: budget=-1.0" in result.stderr
    assert not (tmp_path / "runs").exists()


def _flagfile_values(path):
    values = {}
    for line in open(path):
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.lstrip("-").partition("=")
            values[name] = value if value else "true"
    return values


def test_default_flags_are_the_umbc_flagfile():
    import haet.train  # noqa: F401 -- defines the flags

    recipe = _flagfile_values(os.path.join(REPO, "flags", "umbc_resnet20x6.flags"))
    assert {"budget", "width_multiplier", "learning_rates", "augment_strengths"} <= set(recipe)
    def normalized(value):
        if isinstance(value, list):
            try:
                return [float(v) for v in value]
            except ValueError:
                return value
        return value

    for name, text in recipe.items():
        flag = absl_flags.FLAGS[name]
        assert normalized(flag.parser.parse(text)) == normalized(flag.default), name


def test_resnet9_one_cycle_planned_with_ema_tta_and_label_smoothing(tmp_path, cifar10_slice_dir):
    config = TrainConfig(
        budget_seconds=25.0, data_dir=cifar10_slice_dir, train_size=100, model="resnet9",
        width_multiplier=0.125, ghost_batch_splits=2, input_normalization="channel_standardize",
        batch_size=20, optimizer="sgd", lr_schedule="one_cycle", one_cycle_knots=(0.0, 0.3, 1.0),
        one_cycle_learning_rates=(0.0, 0.2, 0.0), weight_decay=2.5e-4, label_smoothing=0.2,
        ema_decay=0.9, tta="flip", augmentation="crop_flip_cutout", planner_probe_steps=5,
        eval_batch_size=250, save_model=False,
    )
    record, run_dir = train(config, results_dir=str(tmp_path))
    assert set(record["test_accuracy_variants"]) == {"ema", "ema_tta_flip", "raw", "raw_tta_flip"}
    assert record["test_accuracy"] == record["test_accuracy_variants"]["ema_tta_flip"]
    losses = record["test_loss_variants"]
    assert len({round(v, 6) for v in losses.values()}) == 4  # EMA and TTA each change the predictions
    # The planner fitted whole epochs of 5 steps into the budget; training ran them all
    # unless the budget ran out first.
    assert record["planned_epochs"] >= 1
    assert record["epochs_completed"] == record["planned_epochs"] or record["train_seconds"] >= 25.0
    assert record["steps"] <= record["planned_epochs"] * 5
    assert not os.path.exists(os.path.join(run_dir, "model.keras"))


def test_mnist_end_to_end_with_fixed_epochs(tmp_path):
    from conftest import shared_dataset_dir

    config = TrainConfig(
        budget_seconds=600.0, dataset="mnist", data_dir=shared_dataset_dir("mnist"), train_size=100,
        model="resnet9", width_multiplier=0.125, batch_size=25, optimizer="sgd", lr_schedule="one_cycle",
        one_cycle_learning_rates=(0.0, 0.1, 0.0), epochs=2, augmentation="none", eval_batch_size=1000,
        input_normalization="channel_standardize", save_model=False,
    )
    record, run_dir = train(config, results_dir=str(tmp_path))
    assert record["epochs"] == 2 and record["steps"] == 8 and record["planned_epochs"] == 2
    assert record["test_examples"] == 10000 and record["dataset"] == "mnist"
    with open(os.path.join(run_dir, "confusion_matrix.csv")) as f:
        rows = list(csv.reader(f))
    assert rows[0][1:] == [str(d) for d in range(10)]
    assert sum(int(v) for row in rows[1:] for v in row[1:]) == 10000


@pytest.mark.parametrize("flagfiles", [
    ["umbc_resnet20x6.flags"],
    ["page_resnet9.flags"],
    ["page_resnet9.flags", "page_resnet9_full_cifar10.flags"],
    ["page_resnet9.flags", "resnet9_mnist.flags"],
])
def test_every_recipe_flagfile_parses_and_validates(flagfiles):
    import haet.train as entry

    argv = ["haet.train"] + [f"--flagfile={os.path.join(REPO, 'flags', f)}" for f in flagfiles]
    absl_flags.FLAGS.unparse_flags()
    try:
        absl_flags.FLAGS(argv)
        config = entry.config_from_flags()
    finally:
        absl_flags.FLAGS.unparse_flags()
    config.validate()
    first_line = open(os.path.join(REPO, "flags", flagfiles[-1])).readline()
    assert first_line.startswith("# python -m haet.train --flagfile=flags/")


def test_precomputed_augmentation_counts_toward_the_budget(tmp_path, cifar10_slice_dir):
    config = TrainConfig(
        budget_seconds=600.0, data_dir=cifar10_slice_dir, train_size=100, model="resnet9",
        width_multiplier=0.125, batch_size=25, optimizer="sgd", lr_schedule="one_cycle", epochs=3,
        augmentation="crop_flip_cutout", precomputed_augmentation_epochs=2,
        input_normalization="channel_standardize", eval_batch_size=250, save_model=False,
    )
    record, _ = train(config, results_dir=str(tmp_path))
    assert record["precompute_seconds"] > 0 and record["epochs"] == 3 and record["steps"] == 12
    assert record["train_seconds"] >= record["precompute_seconds"]
    with pytest.raises(ValueError, match="needs --augmentation=crop_flip_cutout"):
        dataclasses.replace(config, augmentation="affine").validate()


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_with_planned_schedule_and_ema(tmp_path, cifar10_slice_dir, precision):
    config = TrainConfig(
        budget_seconds=600.0, data_dir=cifar10_slice_dir, train_size=100, model="resnet9",
        width_multiplier=0.125, batch_size=25, optimizer="sgd", lr_schedule="one_cycle", epochs=2,
        augmentation="crop_flip_cutout", ema_decay=0.5, precision=precision,
        input_normalization="channel_standardize", eval_batch_size=250, save_model=False,
    )
    record, _ = train(config, results_dir=str(tmp_path))
    assert record["precision"] == precision and record["steps"] == 8
    assert np.isfinite(record["test_loss"]) and set(record["test_accuracy_variants"]) == {"ema", "raw"}
    import keras
    assert keras.mixed_precision.global_policy().name == "float32"  # restored after the run
