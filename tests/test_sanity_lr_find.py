import dataclasses
import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, run_tool_cases
from haet import lr_find, models, sanity, training
from haet.training import TrainConfig


def _tiny(cifar10_slice_dir, **changes):
    base = dict(data_dir=cifar10_slice_dir, train_size=100, model="resnet9", width_multiplier=0.125,
                batch_size=10, input_normalization="channel_standardize", augmentation="crop_flip_cutout")
    base.update(changes)
    config = TrainConfig(**base)
    data = training.prepare_data(config)
    return config, data


def test_initial_loss_check_passes_near_ln_k_and_catches_large_logits(cifar10_slice_dir):
    config, data = _tiny(cifar10_slice_dir)
    x, y = sanity.sample(config, data.x_fit, data.y_fit, batches=3)
    assert len(y) == 30
    good = sanity.check_initial_loss(config, data, x, y)
    assert good["passed"] and good["expected"] == pytest.approx(math.log(10))
    bad = sanity.check_initial_loss(dataclasses.replace(config, logit_scale=200.0), data, x, y)
    assert not bad["passed"] and bad["loss"] > 1.25 * math.log(10)


def test_overfit_check_memorizes_a_small_sample(cifar10_slice_dir):
    config, data = _tiny(cifar10_slice_dir, model="tiny_cnn", width_multiplier=2.0, dropout_rate=0.5,
                         label_smoothing=0.3)
    x, y = sanity.sample(config, data.x_fit, data.y_fit, batches=2)
    result = sanity.check_overfit(config, data, x, y, max_steps=400, target_accuracy=0.99)
    assert result["passed"] and result["accuracy"] >= 0.99 and 0 < result["steps"] <= 400
    too_few = sanity.check_overfit(config, data, x, y, max_steps=2, target_accuracy=0.99)
    assert not too_few["passed"] and too_few["steps"] == 2


def test_the_checks_build_from_a_source_model_loaded_once(cifar10_slice_dir, tmp_path, monkeypatch):
    """The command lines load --init_from once, before the data, and hand it on: the
    checks and the range test build from that model and do not load the file again."""
    config, data = _tiny(cifar10_slice_dir, model="tiny_cnn", augmentation="none")
    path = tmp_path / "source.keras"
    models.with_input_pipeline(models.tiny_cnn(width_multiplier=0.125), np.zeros((3,), np.float32)).save(path)
    config = dataclasses.replace(config, init_from=str(path))
    source = training.load_init_from(config)
    loads = []
    monkeypatch.setattr(models, "load_saved_model", lambda *args, **kwargs: loads.append(args))
    x, y = sanity.sample(config, data.x_fit, data.y_fit, batches=1)
    assert sanity.check_initial_loss(config, data, x, y, source=source)["loss"] > 0
    assert sanity.check_overfit(config, data, x, y, max_steps=1, source=source)["steps"] == 1
    rows = []
    try:
        lr_find.range_test(config, data, 1e-4, 1.0, 3, rows, source=source)
    except training.SetupError:
        raise
    except ValueError:  # three steps may give no suggestion (the loss lowest at the first): the rows count
        pass
    assert len(rows) == 3 and not loads


def test_unregularized_turns_every_regularizer_off():
    config = sanity.unregularized(TrainConfig(label_smoothing=0.2, augmentation="crop_flip_cutout",
                                              precomputed_augmentation_epochs=3))
    assert (config.weight_decay, config.dropout_rate, config.augmentation, config.label_smoothing,
            config.precomputed_augmentation_epochs) == (0.0, 0.0, "none", 0.0, 0)


def test_range_test_loss_rises_at_large_learning_rates(cifar10_slice_dir):
    config, data = _tiny(cifar10_slice_dir, optimizer="sgd")
    rows, (suggested, at_minimum, steepest) = lr_find.range_test(config, data, 1e-4, 100.0, 60)
    lrs = [r["learning_rate"] for r in rows]
    assert 2 <= len(rows) <= 60
    assert lrs[0] == pytest.approx(1e-4) and all(b > a for a, b in zip(lrs, lrs[1:]))
    smoothed = [r["smoothed_loss"] for r in rows]
    best = np.nanmin(smoothed)
    # It diverged (stopped early at 4x the minimum, or ran into non-finite losses) at large rates.
    assert len(rows) < 60 or not math.isfinite(rows[-1]["loss"]) or smoothed[-1] > 2 * best
    assert 1e-4 <= at_minimum <= 100.0 and suggested == pytest.approx(at_minimum / 10)
    assert 1e-4 <= steepest <= at_minimum
    with pytest.raises(ValueError, match="min_learning_rate < --max_learning_rate"):
        lr_find.range_test(config, data, 1.0, 0.1, 10)


def test_suggest_on_a_known_curve():
    lrs = np.logspace(-5, 1, 7)
    losses = [2.3, 2.2, 1.5, 0.9, 0.8, 3.0, 9.0]
    rows = [{"step": i + 1, "learning_rate": lr, "loss": l, "smoothed_loss": l} for i, (lr, l) in enumerate(zip(lrs, losses))]
    suggested, at_minimum, steepest = lr_find.suggest(rows)
    assert at_minimum == pytest.approx(1e-1) and suggested == pytest.approx(1e-2)
    assert steepest == pytest.approx(1e-3)  # the largest drop per decade: 2.2 -> 1.5 -> 0.9
    with pytest.raises(ValueError, match="No finite loss"):
        lr_find.suggest([{"step": 1, "learning_rate": 1.0, "loss": math.nan, "smoothed_loss": math.nan}])
    # A range that starts too high: lowest at the first step, then infinite (was "suggested 1e+29").
    with pytest.raises(ValueError, match="The loss never fell: it was lowest at the first step"):
        lr_find.suggest([{"step": 1, "learning_rate": 1e30, "loss": 2.3, "smoothed_loss": 2.3},
                         {"step": 2, "learning_rate": 1e31, "loss": math.inf, "smoothed_loss": math.nan}])


def test_an_interrupted_range_test_keeps_the_steps_it_measured(cifar10_slice_dir, monkeypatch):
    config, data = _tiny(cifar10_slice_dir, optimizer="sgd")
    record = lr_find._LossPerStep._record

    def interrupted_after_five(self, mean):
        if len(self.rows) == 5:
            raise KeyboardInterrupt  # Ctrl-C
        return record(self, mean)

    monkeypatch.setattr(lr_find._LossPerStep, "_record", interrupted_after_five)
    rows = []
    with pytest.raises(KeyboardInterrupt):
        lr_find.range_test(config, data, 1e-4, 1.0, 60, rows)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and all(math.isfinite(r["loss"]) for r in rows)


@pytest.mark.e2e
def test_sanity_and_lr_find_command_lines(tmp_path, cifar10_slice_dir):
    env = dict(os.environ, PYTHONPATH=REPO)
    common = [f"--data_dir={cifar10_slice_dir}", "--train_size=100", "--model=resnet9", "--width_multiplier=0.125",
              "--batch_size=10", "--input_normalization=channel_standardize"]
    result = subprocess.run([sys.executable, "-m", "haet.sanity", *common, "--sanity_batches=2", "--max_steps=300"],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert "PASS initial loss" in result.stdout and "PASS overfit 20 images" in result.stdout
    failing = subprocess.run([sys.executable, "-m", "haet.sanity", *common, "--logit_scale=200", "--max_steps=2"],
                             env=env, capture_output=True, text=True)
    assert failing.returncode == 1 and "FAIL initial loss" in failing.stdout and "FAIL overfit" in failing.stdout
    # Impossible settings are refused by the flags, before any work (a negative count sliced the subset),
    # as is a damaged model to fine-tune from (a traceback before).
    junk = tmp_path.parent / f"{tmp_path.name}_junk.keras"
    junk.write_text("not a model")
    bads = ("--sanity_batches=-2", "--target_accuracy=1.5", "--target_accuracy=nan", "--sanity_batches=11",
            f"--init_from={junk}", "--steps_per_execution=1000000000",  # (the last: checked with the data)
            "--resume=/nonexistent/run", f"--results_dir={tmp_path}")  # (haet.train's: they did nothing)
    for bad, refused in zip(bads, run_tool_cases("haet.sanity", [[*common, bad] for bad in bads], cwd=REPO)):
        assert refused.returncode == 2 and bad.split("=")[0][2:] in refused.stderr, refused.stderr[-2000:]
        assert "haet.sanity: error: " in refused.stderr and "PASS" not in refused.stdout
    result = subprocess.run([sys.executable, "-m", "haet.lr_find", *common, "--optimizer=sgd", "--range_steps=30",
                             "--min_learning_rate=1e-3", "--max_learning_rate=10", f"--results_dir={tmp_path}"],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = list(tmp_path.iterdir())
    assert sorted(os.listdir(run_dir)) == ["lr_find.csv", "lr_find.png", "record.json"]
    record = json.loads((run_dir / "record.json").read_text())
    assert "suggested learning rate" in result.stdout and record["suggested_learning_rate"] > 0
    # A results folder that cannot be made, an empty range, a damaged model to fine-tune from, or one
    # that fits nothing of the network, is refused before any result is written (the last two wrote a
    # folder with status "no suggestion").
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    other = tmp_path.parent / f"{tmp_path.name}_tiny_cnn.keras"
    models.with_input_pipeline(models.tiny_cnn(input_shape=(32, 32, 3)), np.zeros((32, 32, 3), np.float32)).save(other)
    bads = ((f"--results_dir={a_file}", "is a file, not a folder"),
            ("--max_learning_rate=1e-4", "Need 0 < --min_learning_rate < --max_learning_rate"),
            (f"--init_from={junk}", "cannot be loaded as a Keras model (not a zip archive"),
            (f"--init_from={other}", "No layer of tiny_cnn matches"),
            (f"--resume={tmp_path}", "--resume does nothing in haet.lr_find: a range test is not resumed"))
    cases = [[*common, "--min_learning_rate=1e-3", f"--results_dir={tmp_path}", bad] for bad, _ in bads]
    for (bad, message), refused in zip(bads, run_tool_cases("haet.lr_find", cases)):
        assert refused.returncode == 2 and "haet.lr_find: error: " in refused.stderr, refused.stderr[-2000:]
        assert message in refused.stderr and "Traceback" not in refused.stderr
    assert sorted(os.listdir(tmp_path)) == sorted([run_dir.name, "a_file"])  # no second run folder


_SIGTERM_AFTER_5_STEPS = """
import os, runpy, signal, sys
from haet import budget

execute = budget.WallClockBudget.execute


def signalled(self, engine, steps, probe=False):
    losses = execute(self, engine, steps, probe)
    if self.steps >= 5:
        os.kill(os.getpid(), signal.SIGTERM)
    return losses


budget.WallClockBudget.execute = signalled
sys.argv = ["lr_find", *sys.argv[1:]]
runpy.run_module("haet.lr_find", run_name="__main__")
"""


@pytest.mark.e2e
def test_sigterm_writes_the_range_test_so_far(tmp_path, cifar10_slice_dir):
    """SIGTERM killed the range test with nothing written, where Ctrl-C wrote its steps."""
    result = subprocess.run(
        [sys.executable, "-c", _SIGTERM_AFTER_5_STEPS, f"--data_dir={cifar10_slice_dir}", "--train_size=100",
         "--model=tiny_cnn", "--batch_size=10", "--optimizer=sgd", "--range_steps=60", "--steps_per_execution=1",
         f"--results_dir={tmp_path}"], env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True)
    assert result.returncode == -signal.SIGTERM, result.stderr[-2000:]  # (ended by it: a shell's 143)
    (run_dir,) = list(tmp_path.iterdir())
    record = json.loads((run_dir / "record.json").read_text())
    # (the steps of the execution the signal came in are not recorded: it raised before the hooks saw them)
    assert record["status"] == "interrupted" and record["interrupted_by"] == "SIGTERM" and 1 <= record["steps"] <= 5
    assert f"interrupted by SIGTERM after {record['steps']} steps (no suggestion)" in result.stderr
    assert sorted(os.listdir(run_dir)) == ["lr_find.csv", "lr_find.png", "record.json"]


def test_per_step_loss_is_recovered_from_the_running_means():
    class Run:
        stopped_by = None

        def stop(self, reason):
            self.stopped_by = reason

    recorder = lr_find._LossPerStep(lambda step: 0.1 * 2.0**step, steps=10)
    losses = [3.0, 1.0, 2.0, 5.0]
    recorder.on_epoch_begin(None, 0)
    recorder.after_execution(Run(), 2, np.array([sum(losses[:k]) / k for k in (1, 2)]))
    recorder.on_epoch_begin(None, 1)
    run = Run()
    recorder.after_execution(run, 2, np.array([sum(losses[2:2 + k]) / k for k in (1, 2)]))
    assert [r["loss"] for r in recorder.rows] == pytest.approx(losses)
    assert [r["learning_rate"] for r in recorder.rows] == pytest.approx([0.1, 0.2, 0.4, 0.8])
    assert run.stopped_by is None
    # A loss 4x above the smoothed minimum stops the test at that step.
    recorder.after_execution(run, 2, np.array([sum(losses[2:] + [400.0]) / 3, 0.0]))
    assert run.stopped_by == "diverged" and len(recorder.rows) == 5
