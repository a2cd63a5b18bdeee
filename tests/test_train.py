import csv
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from conftest import REPO, run_tool_cases
from haet import results
from haet.training import TrainConfig, train

REQUIRED_KEYS = {
    "status", "test_accuracy", "test_loss", "test_examples", "train_examples", "epochs", "steps", "stopped_by",
    "steps_per_execution", "executions", "budget_seconds", "train_seconds", "setup_seconds", "compile_seconds",
    "eval_seconds", "probe_seconds", "images_per_second", "backend", "device", "precision", "versions",
    "git_commit", "flags", "subset_sha256", "published",
}


def _tiny(data_dir, **changes):
    base = dict(budget_seconds=600.0, data_dir=data_dir, train_size=100, model="tiny_cnn", width_multiplier=1,
                batch_size=20, optimizer="sgd", lr_schedule="constant", learning_rate=0.05,
                lr_schedule_unit="steps", epochs=2, augmentation="none", eval_batch_size=250, save_model=False)
    base.update(changes)
    return TrainConfig(**base)


def test_a_tiny_run_writes_a_complete_record(tmp_path, cifar10_slice_dir):
    config = _tiny(cifar10_slice_dir, validation_size=20, save_model=True, steps_per_execution=3)
    record, run_dir = train(config, results_dir=str(tmp_path))
    assert sorted(os.listdir(run_dir)) == ["confusion_matrix.csv", "history.csv", "learning_curves.png",
                                           "model.keras", "record.json"]
    assert REQUIRED_KEYS <= set(record)
    assert json.loads(open(os.path.join(run_dir, "record.json")).read()) == json.loads(json.dumps(record))
    assert record["status"] == "completed" and record["stopped_by"] == "epochs"
    # 80 training images / 20 = 4 steps an epoch, run as executions of 3 and 1.
    assert record["steps"] == 8 and record["executions"] == 4 and record["epochs_completed"] == 2
    assert record["train_examples"] == 80 and record["validation_examples"] == 20 and record["test_examples"] == 500
    assert record["precision"] == "float32" and record["xla"] is True and record["probe_steps"] == 0
    assert record["flags"]["steps_per_execution"] == 3 and record["published"] is None
    assert set(record["test_accuracy_variants"]) == {"final"} and 0 <= record["test_accuracy"] <= 1
    assert record["validation_accuracy"] == record["validation_accuracy_variants"]["final"]
    # The host's CPUs while it trained (real readings, computed in tests/test_device.py: here, that
    # a run records them).
    host = record["host_cpu"]
    assert host["processes"] == 1 and host["cpus"] >= 1 and host["seconds"] > 0 and host["own_cpu_seconds"] > 0
    assert isinstance(host["loaded"], bool) and host["other_load"] >= 0 and host["steal_load"] >= 0
    with open(os.path.join(run_dir, "history.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["steps"]) for r in rows] == [4, 4] and all(r["val_accuracy"] for r in rows)
    # The last epoch's validation score is the final model's.
    assert float(rows[-1]["val_accuracy"]) == pytest.approx(record["validation_accuracy"])
    assert keras.mixed_precision.global_policy().name == "float32"


def test_record_compares_with_umbc_only_in_its_setting():
    same = results.published_comparison(TrainConfig(), 0.861)
    assert same["test_accuracy"] == 0.851 and same["difference"] == pytest.approx(0.01)
    assert "1,000-image test subset" in same["protocol"]
    shorter = results.published_comparison(TrainConfig(budget_seconds=60), 0.5)
    assert "budget 60 s, theirs 600 s" in " ".join(shorter["protocol_differences"])
    assert results.published_comparison(TrainConfig(train_size=1000), 0.5) is None


def test_run_folders_and_records_are_never_overwritten(tmp_path):
    a = results.make_run_dir(str(tmp_path), "x")
    b = results.make_run_dir(str(tmp_path), "x")
    assert a != b and os.path.isdir(a) and os.path.isdir(b)
    results.write_record(a, {"test_accuracy": 0.5})
    with pytest.raises(FileExistsError):
        results.write_record(a, {"test_accuracy": 0.9})
    assert json.loads(open(os.path.join(a, "record.json")).read())["test_accuracy"] == 0.5


def test_bad_data_fails_before_any_run_folder(tmp_path):
    np.savez(tmp_path / "train.npz", x=np.zeros((100, 32, 32), np.uint8), y=np.zeros(100, np.uint8))
    np.savez(tmp_path / "test.npz", x=np.zeros((10, 32, 32, 3), np.uint8), y=np.zeros(10, np.uint8))
    config = TrainConfig(data_dir=str(tmp_path), train_size=100)
    with pytest.raises(ValueError, match=r"images must have shape \(N, 32, 32, 3\)"):
        train(config, results_dir=str(tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()


def test_precomputed_augmentation_counts_toward_the_budget(tmp_path, cifar10_slice_dir):
    config = _tiny(cifar10_slice_dir, epochs=3, augmentation="crop_flip_cutout", precomputed_augmentation_epochs=2,
                   input_normalization="channel_standardize")
    record, _ = train(config, results_dir=str(tmp_path))
    assert record["precompute_seconds"] > 0 and record["epochs"] == 3 and record["steps"] == 15
    assert record["train_seconds"] >= record["precompute_seconds"]
    assert record["setup_seconds"] >= 0


@pytest.mark.parametrize("precision, statistics", [("mixed_bfloat16", "average"), ("mixed_float16", "recompute")])
def test_mixed_precision_with_a_planned_schedule_and_ema(tmp_path, cifar10_slice_dir, precision, statistics):
    config = _tiny(cifar10_slice_dir, lr_schedule="one_cycle", ema_decay=0.5, precision=precision,
                   ema_statistics=statistics)
    record, _ = train(config, results_dir=str(tmp_path))
    assert record["precision"] == precision and record["steps"] == 10
    assert (record["ema_statistics_seconds"] is not None) == (statistics == "recompute")
    assert np.isfinite(record["test_loss"]) and set(record["test_accuracy_variants"]) == {"ema", "raw"}
    assert record["test_accuracy_variants"]["ema"] != record["test_accuracy_variants"]["raw"] or \
        record["test_loss_variants"]["ema"] != record["test_loss_variants"]["raw"]
    assert keras.mixed_precision.global_policy().name == "float32"  # restored after the run


def _run_cli(*args, results_dir):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "haet.train", f"--results_dir={results_dir}", *args],
                          env=env, capture_output=True, text=True, cwd=REPO)


@pytest.mark.e2e
def test_the_default_recipe_end_to_end_on_real_cifar10(tmp_path, cifar10_slice_dir):
    out = tmp_path / "runs"
    # (--momentum: Adam does not read it; the run is warned and goes on, its record says so.)
    result = _run_cli("--budget=4", f"--data_dir={cifar10_slice_dir}", "--train_size=200", "--width_multiplier=1",
                      "--batch_size=20", "--eval_batch_size=250", "--momentum=0.5", results_dir=out)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = list(out.iterdir())
    record = json.loads((run_dir / "record.json").read_text())
    assert "--momentum=0.5 (--optimizer=adam does not use it): this setting changes nothing" in result.stderr
    assert record["ignored_settings"] == {"momentum": "optimizer"}
    assert REQUIRED_KEYS <= set(record) and record["model"] == "resnet20x1"
    assert record["test_examples"] == 500 and record["train_examples"] == 200
    assert 0.0 <= record["test_accuracy"] <= 1.0 and np.isfinite(record["test_loss"])
    # Stopped at the first execution boundary after 4 s (compilation included).
    assert record["stopped_by"] == "budget" and record["train_seconds"] >= 4.0 and record["steps"] >= 1
    # The record rounds images/s to 0.01 and train_seconds to the millisecond (1e-4 of a 4 s run: 0.0104 images/s
    # at 94 was once more than an absolute 0.01; a loaded machine's 1.38 against 1.3815, more than a relative 1e-3).
    assert record["images_per_second"] == pytest.approx(record["steps"] * 20 / record["train_seconds"], rel=1e-3,
                                                        abs=0.005)
    assert record["flags"]["width_multiplier"] == 1 and record["budget_seconds"] == 4.0
    with open(run_dir / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == record["epochs"] and sum(int(r["steps"]) for r in rows) == record["steps"]
    assert {r["fill_mode"] for r in rows} <= {"nearest", "constant", "wrap", "reflect"}
    assert "epoch 1" in result.stderr and "test accuracy" in result.stderr
    # TensorFlow's native start-up lines are filtered (haet.console); the progress and epoch lines remain.
    assert "absl::InitializeLog" not in result.stderr and "cuInit" not in result.stderr
    assert "completed: test accuracy" in result.stdout


@pytest.mark.e2e
def test_cli_reports_bad_input_and_writes_nothing(tmp_path):
    cases = [["--budget=-1"], ["--ghost_batch_splits=3", "--model=resnet9", "--batch_size=64"],
             ["--data_dir=/no/such/folder"]]
    budget, ghost, data_dir = run_tool_cases("haet.train", [[f"--results_dir={tmp_path / 'runs'}", *args]
                                                            for args in cases], cwd=REPO)
    assert budget.returncode == 2 and "Traceback" not in budget.stderr
    assert "budget must be a positive number of seconds. Received: budget=-1.0" in budget.stderr
    assert ghost.returncode == 2 and "ghost_batch_splits" in ghost.stderr and "Traceback" not in ghost.stderr
    assert data_dir.returncode == 2 and "data_dir '/no/such/folder' is not a folder" in data_dir.stderr
    assert "Traceback" not in data_dir.stderr and not (tmp_path / "runs").exists()


@pytest.mark.e2e
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
