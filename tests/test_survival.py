"""Runs that survive: the record from the start, checkpoints and resume, signals,
divergence, failed writes, setup errors. Run under either backend."""

import csv
import errno
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from conftest import REPO, FakeClock, FakeEngine
from haet import budget as budget_lib, checkpoint, results
from haet.hooks import DivergenceGuard
from haet.loop import Training
from haet.training import SetupError, TrainConfig, train


def _tiny(data_dir, **changes):
    base = dict(budget_seconds=600.0, data_dir=data_dir, train_size=100, model="tiny_cnn", width_multiplier=1,
                batch_size=20, optimizer="sgd", lr_schedule="constant", learning_rate=0.05,
                lr_schedule_unit="steps", epochs=3, augmentation="none", eval_batch_size=250, save_model=False,
                steps_per_execution=3)
    base.update(changes)
    return TrainConfig(**base)


def _record(run_dir):
    with open(os.path.join(run_dir, "record.json")) as f:
        return json.loads(f.read(), parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))


def _history(run_dir):
    with open(os.path.join(run_dir, "history.csv")) as f:
        return list(csv.DictReader(f))


def _steps_of_one_second(monkeypatch):
    """A fake clock on which each training step of `haet.engine.Engine` costs 1 s."""
    from haet import engine as engine_lib

    clock = FakeClock()
    original = engine_lib.Engine.run

    def timed(self, steps):
        clock.t += steps
        return original(self, steps)

    monkeypatch.setattr(engine_lib.Engine, "run", timed)
    return clock


def test_sigterm_checkpoints_and_the_resumed_run_matches_an_uninterrupted_one(tmp_path, cifar10_slice_dir,
                                                                               sigterm_after):
    # Augmentation, EMA and a step-based schedule: their random and optimizer state must come back.
    config = _tiny(cifar10_slice_dir, augmentation="crop_flip_cutout", crop_padding=2, cutout_size=4,
                   lr_schedule="one_cycle", ema_decay=0.8, validation_size=20)
    reference, _ = train(config, results_dir=str(tmp_path / "whole"))

    sent = sigterm_after(6)  # inside the second epoch (4 steps an epoch, executions of up to 3)
    stopped, run_dir = train(config, results_dir=str(tmp_path / "parts"))
    assert len(sent) == 1 and 6 <= sent[0] <= 8
    record = _record(run_dir)
    assert record == json.loads(json.dumps(results.json_safe(stopped)))
    assert record["status"] == "interrupted" and record["interrupted_by"] == "SIGTERM"
    assert record["steps"] == sent[0] and record["checkpoint"] == "checkpoint.npz" and record["test_accuracy"] is None
    assert checkpoint.exit_code(record) == 128 + signal.SIGTERM and checkpoint.ending_signal(record) == "SIGTERM"
    assert [int(r["epoch"]) for r in _history(run_dir)] == [1]  # the second epoch was not ended
    assert sorted(os.listdir(run_dir)) == ["checkpoint.npz", "history.csv", "record.json"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers put back

    resumed, same_dir = train(config, resume=run_dir)
    assert same_dir == run_dir
    assert resumed["status"] == "completed" and resumed["resumes"] == 1 and resumed["checkpoint"] is None
    assert len(resumed["resume_history"]) == 1
    # The host's CPUs: the interrupted process's measure and the resumed one's, added.
    assert record["host_cpu"]["processes"] == 1 and resumed["host_cpu"]["processes"] == 2
    assert resumed["host_cpu"]["seconds"] > record["host_cpu"]["seconds"]
    assert resumed["steps"] == reference["steps"] == 12 and resumed["epochs"] == 3
    for key in ("test_accuracy", "test_loss", "validation_accuracy"):
        assert resumed[key] == pytest.approx(reference[key], abs=1e-6), key
    assert resumed["test_loss_variants"]["raw"] == pytest.approx(reference["test_loss_variants"]["raw"], abs=1e-6)
    rows, whole = _history(run_dir), _history(reference["run_dir"])
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert [float(r["loss"]) for r in rows] == pytest.approx([float(r["loss"]) for r in whole], abs=1e-6)
    assert not os.path.exists(os.path.join(run_dir, "checkpoint.npz"))
    with pytest.raises(SetupError, match="has completed"):
        train(config, resume=run_dir)


def test_a_fine_tuning_run_resumes_from_its_checkpoint_alone(tmp_path, cifar10_slice_dir, sigterm_after):
    """A resumed fine-tuning run read its `init_from` file again, for the input
    normalization (a constant of the model, in no checkpoint): a file replaced by
    another model gave the resumed run that model's statistics, and a file moved away
    refused the resume (`--resume` takes no `--init_from`)."""
    from haet import config as config_lib, models

    source = tmp_path / "source.keras"  # (its weights need not be trained)
    models.with_input_pipeline(models.tiny_cnn(input_shape=(32, 32, 3)), np.full(3, 0.45, np.float32),
                               variance=np.full(3, 0.06, np.float32)).save(source)
    config = _tiny(cifar10_slice_dir, input_normalization="channel_standardize", init_from=str(source),
                   freeze_stages=1, learning_rate=0.02)
    reference, _ = train(config, results_dir=str(tmp_path / "whole"))
    assert reference["transfer"]["input_normalization_transferred"] is True
    assert reference["transfer"]["layers_frozen"] == 4  # block1: conv, batch norm, activation, pooling

    sigterm_after(6)
    stopped, run_dir = train(config, results_dir=str(tmp_path / "parts"))
    assert stopped["status"] == "interrupted"
    # Another model at the same path, normalizing with other statistics (zero mean, unit variance).
    models.with_input_pipeline(models.tiny_cnn(input_shape=(32, 32, 3)), np.zeros(3, np.float32),
                               variance=np.ones(3, np.float32)).save(source)
    sent = sigterm_after(9)
    again, _ = train(config, resume=run_dir)
    assert sent and again["status"] == "interrupted" and again["resumes"] == 1
    os.remove(source)  # then the file is gone
    # A checkpoint written before checkpoints kept the statistics needs the file: the message says so.
    older = tmp_path / "older"
    shutil.copytree(run_dir, older)
    snapshot, paths, state = checkpoint.load(str(older / "checkpoint.npz"))
    del state["input_statistics"]
    checkpoint.save(str(older / "checkpoint.npz"), snapshot, paths, state)
    kept = sorted((p.name, p.read_bytes()) for p in older.iterdir())
    with pytest.raises(SetupError, match=r"written before checkpoints kept the input normalization: the resume "
                                         r"takes it from --init_from='.*source\.keras', which is not a file"):
        train(config, resume=str(older))
    assert sorted((p.name, p.read_bytes()) for p in older.iterdir()) == kept
    flags = _record(run_dir)["flags"]
    assert config_lib.config_from_record(flags) == config  # (it was refused: "is not a file")
    resumed, _ = train(config_lib.config_from_record(flags), resume=run_dir)
    assert resumed["status"] == "completed" and resumed["resumes"] == 2 and resumed["steps"] == reference["steps"]
    assert resumed["transfer"] == reference["transfer"]
    for key in ("test_accuracy", "test_loss"):
        assert resumed[key] == pytest.approx(reference[key], abs=1e-6), key
    # A fresh run from the missing file is still refused before anything is written.
    with pytest.raises(SetupError, match=r"--init_from='.*source\.keras' is not a file"):
        train(config, results_dir=str(tmp_path / "refused"))
    assert not (tmp_path / "refused").exists()


def test_a_checkpoint_written_before_plans_had_an_offset_resumes(tmp_path, cifar10_slice_dir, sigterm_after,
                                                                 monkeypatch):
    config = _tiny(cifar10_slice_dir, lr_schedule="one_cycle")
    reference, _ = train(config, results_dir=str(tmp_path / "whole"))
    sigterm_after(6)
    _, run_dir = train(config, results_dir=str(tmp_path / "parts"))
    # The checkpoint as the code before plan offsets wrote it: no plan_offset variable.
    path = os.path.join(run_dir, "checkpoint.npz")
    snapshot, paths, state = checkpoint.load(path)
    (i,) = [i for i, p in enumerate(paths) if p.endswith("/plan_offset")]
    checkpoint.save(path, snapshot[:i] + snapshot[i + 1:], paths[:i] + paths[i + 1:], state)
    # A checkpoint of other variables (code changed since) is refused naming the commit that wrote it,
    # and stays, to resume with that code.
    written = checkpoint.load(path)
    assert state["git_commit"] == _record(run_dir)["git_commit"]  # the checkpoint names the code that wrote it
    checkpoint.save(path, snapshot[1:], paths[1:], {**state, "git_commit": "0123abc"})
    interrupted = _record(run_dir)
    with pytest.raises(SetupError, match="holds other variables than this model") as refused:
        train(config, resume=run_dir)
    assert "written by haet at commit 0123abc, and this is " in str(refused.value)
    assert "(git checkout 0123abc), or start the run again" in str(refused.value)
    # Nothing was trained: the record is as the interrupted run left it (not "failed",
    # its signal kept, no resume counted), and the checkpoint stays.
    assert _record(run_dir) == interrupted and interrupted["status"] == "interrupted"
    assert interrupted["interrupted_by"] == "SIGTERM" and "resumes" not in interrupted
    # The same variables, other hooks (e.g. a lookahead checkpoint from before the lookahead
    # got its end-of-training hook): refused alike, before any step (it was an error of the
    # loop's once training began, "resume with the run's own settings", and a "failed" record).
    hooks = {f"{i + 1}:{key.split(':', 1)[1]}" if i else "0:OldHook": value
             for i, (key, value) in enumerate(written[2]["hooks"].items())}
    checkpoint.save(path, written[0], written[1], {**written[2], "hooks": hooks, "git_commit": "0123abc"})
    with pytest.raises(SetupError, match="was written by a run with other hooks") as refused:
        train(config, resume=run_dir)
    assert "['0:OldHook', '2:" in str(refused.value) and "(git checkout 0123abc)" in str(refused.value)
    assert _record(run_dir) == interrupted
    # Written by this code (a clean checkout's commit): the caller's hooks differ (a search's trial
    # resumed by haet.train), not a bug of haet's.
    with monkeypatch.context() as clean:
        clean.setattr(results, "git_commit", lambda: "4567def")
        checkpoint.save(path, written[0], written[1], {**written[2], "hooks": hooks, "git_commit": "4567def"})
        with pytest.raises(SetupError, match="resume it as it was run") as refused:
            train(config, resume=run_dir)
    assert "git checkout" not in str(refused.value) and "bug" not in str(refused.value)
    assert _record(run_dir) == interrupted
    checkpoint.save(path, *written)
    resumed, _ = train(config, resume=run_dir)
    assert resumed["status"] == "completed" and resumed["steps"] == reference["steps"] == 15
    assert resumed["test_loss"] == pytest.approx(reference["test_loss"], abs=1e-6)
    assert resumed["resumes"] == len(resumed["resume_history"]) == 1


def test_a_checkpoint_of_other_variables_names_the_code_that_wrote_it():
    from haet.training import _UNKNOWN, _written_by

    resumed_twice = {"git_commit": "aaa", "resume_history": [{"git_commit": "bbb"}, {"git_commit": "bbb"}]}
    assert "at commit aaa, and this is bbb" in _written_by("aaa", resumed_twice, "bbb")
    assert "(git checkout aaa)" in _written_by("aaa-dirty", resumed_twice, "bbb")
    assert "this is a bug of haet's" in _written_by("bbb", resumed_twice, "bbb")
    assert "at commit bbb-dirty, and this is bbb-dirty" in _written_by("bbb-dirty", resumed_twice, "bbb-dirty")
    assert "not known" in _written_by(None, resumed_twice, "bbb") and "not known" in _written_by("aaa", {}, None)
    # A checkpoint written before checkpoints named their commit: the run's commits, each once.
    assert "the run's processes ran aaa, bbb; this is ccc" in _written_by(_UNKNOWN, resumed_twice, "ccc")
    assert checkpoint.process_commit(resumed_twice) == "bbb" and checkpoint.process_commit({"git_commit": "a"}) == "a"


def test_an_interrupted_record_counts_the_epochs_the_device_ended_and_the_resume_writes_them(
        tmp_path, cifar10_slice_dir, sigterm_after):
    """Executions across epoch ends: SIGTERM after an execution that ended two epochs
    on the device stops the run before the host ends them. The record counts them
    (`epochs_pending`), the history has no row of them yet, and the resumed run
    writes both rows and matches an uninterrupted run."""
    # 5 steps an epoch; the first execution is 1 step, the second 12: steps 5 and 10 end epochs.
    config = _tiny(cifar10_slice_dir, steps_per_execution=12)
    reference, _ = train(config, results_dir=str(tmp_path / "whole"))
    assert reference["executions_span_epochs"] and reference["epochs_pending"] == 0

    sent = sigterm_after(13)
    stopped, run_dir = train(config, results_dir=str(tmp_path / "parts"))
    assert sent == [13] and stopped["status"] == "interrupted" and stopped["steps"] == 13
    assert stopped["epochs"] == stopped["epochs_completed"] == stopped["epochs_pending"] == 2
    assert not os.path.exists(os.path.join(run_dir, "history.csv")) or _history(run_dir) == []

    resumed, _ = train(config, resume=run_dir)
    assert resumed["status"] == "completed" and resumed["steps"] == 15
    assert resumed["epochs"] == resumed["epochs_completed"] == 3 and resumed["epochs_pending"] == 0
    rows, whole = _history(run_dir), _history(reference["run_dir"])
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert [float(r["loss"]) for r in rows] == pytest.approx([float(r["loss"]) for r in whole], abs=1e-6)
    assert resumed["test_accuracy"] == pytest.approx(reference["test_accuracy"], abs=1e-6)


def test_a_resumed_run_spends_only_the_remaining_budget(tmp_path, cifar10_slice_dir, sigterm_after, monkeypatch):
    clock = _steps_of_one_second(monkeypatch)
    config = _tiny(cifar10_slice_dir, epochs=0, budget_seconds=10.0, checkpoint_every=4.0,
                   lr_schedule_unit="budget")
    sigterm_after(6)
    record, run_dir = train(config, results_dir=str(tmp_path), clock=clock)
    # A periodic checkpoint after 4 s, the signal's once 6 steps have run.
    assert record["status"] == "interrupted" and record["checkpoints"] == 2
    assert 6 <= record["steps"] < 10 and record["train_seconds"] == pytest.approx(record["steps"])
    # As if it was interrupted on a GPU under the other backend: the record names both machines.
    path = os.path.join(run_dir, "record.json")
    with open(path) as f:
        saved = json.load(f)
    here, cpu = keras.backend.backend(), saved["device"]["name"]
    other = "jax" if here == "tensorflow" else "tensorflow"
    saved.update(backend=other, device={**saved["device"], "name": "NVIDIA H100 80GB HBM3", "platform": "gpu"})
    with open(path, "w") as f:
        json.dump(saved, f)
    resumed, _ = train(config, resume=run_dir, clock=clock)
    assert resumed["status"] == "completed" and resumed["stopped_by"] == "budget"
    assert resumed["steps"] == 10 and resumed["train_seconds"] == pytest.approx(10.0)
    assert resumed["over_budget_seconds"] == 0 and not resumed["over_budget"]
    assert resumed["backend"] == f"{other}+{here}" and resumed["precision"] == record["precision"]
    assert resumed["device"]["name"] == f"NVIDIA H100 80GB HBM3 + {cpu}" and resumed["device"]["platform"] == "gpu+cpu"
    assert [(h["backend"], h["device"]["name"]) for h in resumed["resume_history"]] == [(here, cpu)]


def test_a_run_interrupted_as_its_budget_ran_out_resumes_to_its_evaluation_alone(tmp_path, cifar10_slice_dir,
                                                                                   sigterm_after, monkeypatch):
    """The signal came with the execution that spent the budget: the resume compiled
    and trained one more execution past the budget (seen in a search: 4.4 s over an
    8 s budget). It now evaluates what was trained, as the run uninterrupted does."""
    clock = _steps_of_one_second(monkeypatch)
    config = _tiny(cifar10_slice_dir, epochs=0, budget_seconds=6.0, lr_schedule_unit="budget")
    whole, whole_dir = train(config, results_dir=str(tmp_path / "whole"), clock=clock)
    assert whole["status"] == "completed" and whole["steps"] == 6 and whole["stopped_by"] == "budget"
    sent = sigterm_after(6)
    record, run_dir = train(config, results_dir=str(tmp_path / "parts"), clock=clock)
    assert record["status"] == "interrupted" and sent == [6] and record["train_seconds"] == pytest.approx(6.0)
    resumed, _ = train(config, resume=run_dir, clock=clock)
    assert resumed["status"] == "completed" and resumed["stopped_by"] == "budget" and resumed["resumes"] == 1
    assert resumed["steps"] == 6 and resumed["train_seconds"] == pytest.approx(6.0) and not resumed["over_budget"]
    assert resumed["epochs"] == whole["epochs"]
    assert resumed["test_accuracy"] == pytest.approx(whole["test_accuracy"], abs=1e-6)
    assert resumed["test_loss"] == pytest.approx(whole["test_loss"], abs=1e-6)
    # The same epochs in the history, the last one cut short at the same step.
    assert [(row["epoch"], row["steps"]) for row in _history(run_dir)] == \
        [(row["epoch"], row["steps"]) for row in _history(whole_dir)]


@pytest.mark.parametrize("changes, last_step, stopped_by", [
    # A plan of 3 steps (less than an epoch): the resume asked for an execution of 0 steps.
    (dict(epochs=0, budget_seconds=7.5, lr_schedule="one_cycle", planner_probe_steps=3), 3, "planned"),
    # A planned whole epoch, interrupted in its last step.
    (dict(epochs=0, budget_seconds=9.5, lr_schedule="one_cycle", planner_probe_steps=3), 5, "planned"),
    # The last epoch's last step spent the budget: the resume said "budget".
    (dict(epochs=1, budget_seconds=4.5), 5, "epochs"),
])
def test_a_run_interrupted_in_its_last_step_resumes_complete(tmp_path, cifar10_slice_dir, sigterm_after,
                                                             monkeypatch, changes, last_step, stopped_by):
    """Interrupted by the execution that did the run's last step, the resume failed
    ("A hook limited the next execution to 0 steps") or said why it stopped otherwise
    than the run uninterrupted."""
    clock = _steps_of_one_second(monkeypatch)
    config = _tiny(cifar10_slice_dir, steps_per_execution=1, checkpoint_every=0.0, **changes)
    whole, _ = train(config, results_dir=str(tmp_path / "whole"), clock=clock)
    assert whole["stopped_by"] == stopped_by and whole["steps"] == last_step
    sent = sigterm_after(last_step)
    record, run_dir = train(config, results_dir=str(tmp_path / "parts"), clock=clock)
    assert record["status"] == "interrupted" and sent == [last_step] and record["steps"] == last_step
    resumed, _ = train(config, resume=run_dir, clock=clock)
    assert resumed["status"] == "completed" and resumed["stopped_by"] == stopped_by
    assert resumed["steps"] == last_step and resumed["over_budget"] == whole["over_budget"]
    assert resumed["test_accuracy"] == pytest.approx(whole["test_accuracy"], abs=1e-6)


def test_a_run_that_slows_down_replans_without_a_step_in_its_learning_rate(tmp_path, cifar10_slice_dir,
                                                                           monkeypatch):
    from haet import engine as engine_lib

    clock, ran = FakeClock(), []
    original = engine_lib.Engine.run

    def timed(self, steps):  # 1 s a step, 3 s from the 40th step on (the probe's 4 included)
        for _ in range(steps):
            clock.t += 1.0 if len(ran) < 40 else 3.0
            ran.append(1)
        return original(self, steps)

    monkeypatch.setattr(engine_lib.Engine, "run", timed)
    config = _tiny(cifar10_slice_dir, epochs=0, budget_seconds=104.5, lr_schedule="one_cycle", steps_per_execution=5,
                   planner_probe_steps=3, checkpoint_every=0.0)
    record, run_dir = train(config, results_dir=str(tmp_path), clock=clock)
    assert record["status"] == "completed" and record["stopped_by"] == "planned"
    assert record["replanned_from_epochs"] == 20 and record["replans"][0]["reason"] == "pace"
    assert all(r["plan_offset"] < 0 for r in record["replans"])
    rates = [float(r["learning_rate"]) for r in _history(run_dir)]
    peak = rates.index(max(rates))
    drops = [a - b for a, b in zip(rates[peak:], rates[peak + 1:])]
    # The decay steepens at each re-plan but never steps down: no epoch falls more than the last.
    assert all(d > 0 for d in drops) and max(drops) == pytest.approx(drops[-1], rel=1e-4)


def test_a_run_where_not_one_epoch_fits_runs_its_schedule_over_the_steps_that_do(tmp_path, cifar10_slice_dir,
                                                                                   monkeypatch):
    """5 steps an epoch, 3.5 s left after the probe at 1 s a step: it planned the whole
    epoch, the budget cut it at step 3 with the one-cycle learning rate still near its
    peak. Now 3 steps are planned, and the learning rate has decayed at their end."""
    clock = _steps_of_one_second(monkeypatch)
    config = _tiny(cifar10_slice_dir, epochs=0, budget_seconds=7.5, lr_schedule="one_cycle", steps_per_execution=1,
                   planner_probe_steps=3, checkpoint_every=0.0)
    record, run_dir = train(config, results_dir=str(tmp_path), clock=clock)
    assert record["status"] == "completed" and record["stopped_by"] == "planned" and not record["over_budget"]
    assert record["planned_steps"] == record["steps"] == 3 and record["planned_epochs"] == 1
    (row,) = _history(run_dir)
    assert int(row["steps"]) == 3 and row["complete"] in ("0", "False")
    # (0.1 when the budget cut the whole epoch; the one-cycle ends at 0)
    assert float(row["learning_rate"]) < 0.01 * max(config.one_cycle_learning_rates)


def test_divergence_stops_the_run_with_an_honest_record(tmp_path, cifar10_slice_dir):
    config = _tiny(cifar10_slice_dir, learning_rate=1e8, epochs=10, steps_per_execution=2)
    record, run_dir = train(config, results_dir=str(tmp_path))
    on_disk = _record(run_dir)
    assert on_disk["status"] == "diverged" and record["status"] == "diverged"
    assert on_disk["test_accuracy"] is None and "test_accuracy_variants" not in on_disk
    assert 1 <= on_disk["diverged_at_step"] <= on_disk["steps"] < 50  # 10 epochs of 5 steps
    assert on_disk["stopped_by"] == "diverged" and checkpoint.exit_code(on_disk) == 3
    assert "model.keras" not in os.listdir(run_dir)
    with pytest.raises(SetupError, match="diverged"):
        train(config, resume=run_dir)


def test_a_diverged_run_keeps_the_rows_of_the_epochs_before_its_diverged_step(tmp_path, cifar10_slice_dir):
    """Executions of 8 steps that span epochs of 5; the learning rate jumps from 0.01
    to 1e12 after epoch 2, so the run diverges in the execution in which epoch 2
    ended (step 10). Before, that epoch had no history row, and the epochs that ended
    after the diverged step were counted as completed."""
    config = _tiny(cifar10_slice_dir, lr_schedule="one_cycle", one_cycle_knot_unit="epochs",
                   one_cycle_knots=(0, 2, 2.2, 10), one_cycle_learning_rates=(0.01, 0.01, 1e12, 1e12), epochs=10,
                   steps_per_execution=8, span_epochs=True, checkpoint_every=0.0)
    record, run_dir = train(config, results_dir=str(tmp_path))
    on_disk, rows = _record(run_dir), _history(run_dir)
    assert on_disk["status"] == "diverged" and on_disk["executions_span_epochs"]
    step = on_disk["diverged_at_step"]
    assert 10 < step <= on_disk["steps"]
    before = (step - 1) // 5  # the epochs that ended before the diverged step
    assert [int(row["epoch"]) for row in rows] == list(range(1, before + 1))
    assert all(row["complete"] == "True" and np.isfinite(float(row["loss"])) for row in rows)
    assert on_disk["epochs"] == on_disk["epochs_completed"] == before and on_disk["epochs_pending"] == 0


def test_a_stop_signal_in_the_execution_that_diverged_leaves_a_diverged_run(tmp_path, cifar10_slice_dir,
                                                                             monkeypatch):
    """SIGTERM during the execution whose loss was not finite: the signal stopped the
    run first, which was checkpointed with non-finite weights, recorded "interrupted"
    and could be resumed."""
    original = budget_lib.WallClockBudget.execute

    def execute(self, engine, steps, probe=False):
        losses = original(self, engine, steps, probe)
        if not np.isfinite(losses).all():
            os.kill(os.getpid(), signal.SIGTERM)
        return losses

    monkeypatch.setattr(budget_lib.WallClockBudget, "execute", execute)
    config = _tiny(cifar10_slice_dir, learning_rate=1e8, epochs=10, steps_per_execution=2)
    record, run_dir = train(config, results_dir=str(tmp_path))
    assert record["status"] == _record(run_dir)["status"] == "diverged" and record["stopped_by"] == "diverged"
    assert record["signal_after_training"] == "SIGTERM" and record.get("checkpoint") is None
    assert "checkpoint.npz" not in os.listdir(run_dir)
    with pytest.raises(SetupError, match="diverged"):
        train(config, resume=run_dir)


@pytest.mark.parametrize("chunks,epoch_size", [((4, 2), 40), ((6,), 16), ((3, 3), 16)])
def test_the_divergence_guard_recovers_the_last_finite_step_loss(chunks, epoch_size):
    """Step losses 2, 4, 6, 1, 3, inf in executions of `chunks` steps: in one epoch (10
    steps), or across an epoch end after the 4th step (executions that span epochs;
    the running means start again there)."""
    clock = FakeClock()
    engine = FakeEngine(clock, size=epoch_size, batch_size=4, steps_per_execution=8, spans_epochs=True)
    budget = budget_lib.WallClockBudget(100.0, clock=clock)
    guard = DivergenceGuard()
    run = Training(engine, budget, [budget, guard])
    step_losses = np.array([2.0, 4.0, 6.0, 1.0, 3.0, np.inf])
    engine.start_epoch(0)
    spe = engine.steps_per_epoch
    positions = np.arange(6) % spe + 1
    means = np.array([step_losses[i - p + 1:i + 1].mean() for i, p in enumerate(positions)])
    done = 0
    for steps in chunks:
        engine.run(steps)
        np.testing.assert_array_equal(engine.step_positions, positions[done:done + steps])
        budget.steps += steps
        guard.after_execution(run, steps, means[done:done + steps].astype(np.float32))
        done += steps
    assert run.stopped_by == "diverged" and run.stopped_at_once
    assert guard.step == 6 and guard.last_finite_loss == pytest.approx(3.0)


def test_the_record_exists_before_the_model_and_a_failed_run_says_why(tmp_path, cifar10_slice_dir, monkeypatch):
    from haet import training

    seen = {}

    def broken(config, model, optimizer, settings):
        (run_dir,) = os.listdir(tmp_path)
        seen.update(_record(tmp_path / run_dir))
        raise RuntimeError("the compiler is on fire")

    monkeypatch.setattr(training, "compile_model", broken)
    with pytest.raises(RuntimeError, match="on fire"):
        train(_tiny(cifar10_slice_dir), results_dir=str(tmp_path))
    assert seen["status"] == "running" and seen["flags"]["model"] == "tiny_cnn" and seen["git_commit"] is not None
    assert seen["subset_sha256"] and seen["process"]["pid"] == os.getpid()
    (run_dir,) = os.listdir(tmp_path)
    record = _record(tmp_path / run_dir)
    assert record["status"] == "failed" and record["error"] == "RuntimeError: the compiler is on fire"
    assert checkpoint.exit_code(record) == 1


def test_files_that_cannot_be_written_are_reported_and_the_accuracy_kept(tmp_path, cifar10_slice_dir,
                                                                         monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    def cut_short(*args, **kwargs):  # writes part of the file, then the disk is full
        path = [a for a in args if isinstance(a, str) and a.endswith((".keras", ".png"))][0]
        with open(path, "wb") as f:
            f.write(b"partial")
        full_disk()

    monkeypatch.setattr(keras.Model, "save", cut_short)
    monkeypatch.setattr("haet.plots.plot_learning_curves", cut_short)
    record, run_dir = train(_tiny(cifar10_slice_dir, save_model=True), results_dir=str(tmp_path))
    on_disk = _record(run_dir)
    assert on_disk["status"] == "completed" and 0 <= on_disk["test_accuracy"] <= 1
    assert set(on_disk["artifact_errors"]) == {"model.keras", "learning_curves.png"}
    assert "No space left on device" in on_disk["artifact_errors"]["model.keras"]
    # No truncated model.keras or figure is left (nor their temporaries).
    assert sorted(os.listdir(run_dir)) == ["confusion_matrix.csv", "history.csv", "record.json"]
    assert checkpoint.exit_code(on_disk) == 4

    # A record that cannot be written at the end: the run still returns its accuracy.
    monkeypatch.setattr(results, "write_json_atomic", full_disk)
    record, run_dir = train(_tiny(cifar10_slice_dir), results_dir=str(tmp_path / "second"))
    assert record["status"] == "completed" and record["test_accuracy"] is not None
    assert "record.json" in record["artifact_errors"]


def test_a_stop_signal_while_the_files_are_written_leaves_the_run_completed(tmp_path, cifar10_slice_dir,
                                                                            monkeypatch):
    """A second stop signal while model.keras was written made a completed run
    "interrupted" with its checkpoint; a resume trained it again from an older
    checkpoint, over its accuracy. A checkpoint that could not be removed (a read-only
    folder) crashed the completed run before its accuracy was said."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt("second stop signal (SIGINT)")

    monkeypatch.setattr(keras.Model, "save", interrupted)
    config = _tiny(cifar10_slice_dir, save_model=True, checkpoint_every=0.0)
    record, run_dir = train(config, results_dir=str(tmp_path))
    on_disk = _record(run_dir)
    assert on_disk["status"] == "completed" and on_disk["test_accuracy"] == record["test_accuracy"] is not None
    assert on_disk["files_interrupted_by"] == "KeyboardInterrupt" and on_disk["checkpoint"] is None
    assert on_disk["artifact_errors"] == {"model.keras": "KeyboardInterrupt: second stop signal (SIGINT)"}
    assert not os.path.exists(os.path.join(run_dir, "checkpoint.npz")) and checkpoint.exit_code(on_disk) == 4
    with pytest.raises(SetupError, match="has completed .*; nothing to resume"):
        train(config, resume=run_dir)

    def read_only(self):
        raise PermissionError(errno.EPERM, "Operation not permitted", self.path)

    monkeypatch.setattr(checkpoint.Checkpointer, "remove", read_only)
    record, run_dir = train(_tiny(cifar10_slice_dir), results_dir=str(tmp_path / "second"))
    assert record["status"] == "completed" and _record(run_dir)["test_accuracy"] == record["test_accuracy"]


def test_setup_errors_come_before_any_run_folder(tmp_path, cifar10_slice_dir):
    a_file = tmp_path / "results_file"
    a_file.write_text("not a folder")
    with pytest.raises(SetupError, match="is a file, not a folder"):
        train(_tiny(cifar10_slice_dir), results_dir=str(a_file / "runs"))
    broken = tmp_path / "broken"
    broken.mkdir()
    with open(os.path.join(cifar10_slice_dir, "train.npz"), "rb") as f:
        (broken / "train.npz").write_bytes(f.read()[:5000])
    (broken / "test.npz").write_bytes(b"")
    with pytest.raises(SetupError, match=r"broken/train.npz is not a readable npz file"):
        train(_tiny(str(broken)), results_dir=str(tmp_path / "runs"))
    empty_test = tmp_path / "empty_test"
    empty_test.mkdir()
    shutil.copy(os.path.join(cifar10_slice_dir, "train.npz"), empty_test / "train.npz")
    np.savez(empty_test / "test.npz", x=np.zeros((0, 32, 32, 3), np.uint8), y=np.zeros(0, np.int64))
    with pytest.raises(SetupError, match="test split from .* holds no images"):
        train(_tiny(str(empty_test)), results_dir=str(tmp_path / "runs"))
    # An execution that would reach more epochs than the device keeps permutations for (a billion steps
    # asked for 60 GB of memory under TensorFlow, and hung under JAX).
    with pytest.raises(SetupError, match=r"steps_per_execution=1000000000 would let one execution reach"):
        train(_tiny(cifar10_slice_dir, steps_per_execution=10**9), results_dir=str(tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(SetupError, match="no write permission"):
            train(_tiny(cifar10_slice_dir), results_dir=str(locked / "runs"))


def test_resume_refuses_what_it_cannot_continue(tmp_path, cifar10_slice_dir):
    config = _tiny(cifar10_slice_dir)
    with pytest.raises(SetupError, match="is not a folder"):
        train(config, resume=str(tmp_path / "nothing"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    results.write_record(str(run_dir), {"status": "interrupted", "flags": results.json_safe(
        __import__("dataclasses").asdict(config))})
    with pytest.raises(SetupError, match="has no checkpoint.npz"):
        train(config, resume=str(run_dir))
    (run_dir / "checkpoint.npz").write_bytes(b"x")
    with pytest.raises(SetupError, match="checkpoint.npz is not a readable checkpoint.*start it again"):
        train(config, resume=str(run_dir))


def test_resume_refuses_other_settings_other_data_and_a_corrupt_checkpoint_and_touches_nothing(
        tmp_path, cifar10_slice_dir, sigterm_after):
    config = _tiny(cifar10_slice_dir)
    sigterm_after(6)
    _, run_dir = train(config, results_dir=str(tmp_path / "runs"))
    before = _record(run_dir)
    assert before["status"] == "interrupted"
    with pytest.raises(SetupError, match="other settings \\(learning_rate\\)"):
        train(_tiny(cifar10_slice_dir, learning_rate=0.1), resume=run_dir)
    # Other images at --data_dir: another training subset.
    other = tmp_path / "other_data"
    other.mkdir()
    with np.load(os.path.join(cifar10_slice_dir, "train.npz")) as f:
        np.savez(other / "train.npz", x=f["x"][::-1], y=f["y"][::-1])
    shutil.copy(os.path.join(cifar10_slice_dir, "test.npz"), other / "test.npz")
    with pytest.raises(SetupError, match="differ from those .* trained on \\(subset_sha256"):
        train(_tiny(str(other)), resume=run_dir)
    # A truncated checkpoint (a full disk, a copy cut short).
    path = os.path.join(run_dir, "checkpoint.npz")
    with open(path, "rb") as f:
        whole = f.read()
    with open(path, "wb") as f:
        f.write(whole[:len(whole) // 2])
    with pytest.raises(SetupError, match="not a readable checkpoint \\(BadZipFile"):
        train(config, resume=run_dir)
    with open(path, "wb") as f:
        f.write(whole)
    # Another process holds the folder (a resume of it going on): a second resume stops first.
    with checkpoint.run_lock(run_dir):
        with pytest.raises(SetupError, match="is in use by another process"):
            train(config, resume=run_dir)
    assert _record(run_dir) == before  # nothing touched
    resumed, _ = train(config, resume=run_dir)
    assert resumed["status"] == "completed" and resumed["resumes"] == 1


def test_a_history_append_that_fails_leaves_no_partial_row_and_the_next_one_rewrites_it_whole(tmp_path,
                                                                                              monkeypatch):
    """A full disk mid-row left its part in history.csv: the next append glued its row
    onto it (19 columns, epoch 50's accuracy read from another field) and the rows in
    between were lost. A history.csv deleted mid-run came back without its header."""
    folder = results.RunFolder(str(tmp_path), {})
    rows = [{"epoch": e, "loss": 1.0 / e, "accuracy": 0.1 * e} for e in range(1, 6)]
    folder.start_history()
    folder.append_history(rows[0], rows[:1])
    folder.append_history(rows[1], rows[:2])
    writer = csv.DictWriter

    class DiskFull(writer):
        def writerow(self, row):
            self.writer.writerow(["3", "0.33"])  # part of the row reaches the file
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(results.csv, "DictWriter", DiskFull)
    folder.append_history(rows[2], rows[:3])
    assert "No space left" in folder.artifact_errors["history.csv"]
    assert [r["epoch"] for r in _history(str(tmp_path))] == ["1", "2"]  # no partial row
    monkeypatch.setattr(results.csv, "DictWriter", writer)
    folder.append_history(rows[3], rows[:4])  # space again: rewritten whole, epoch 3 back
    assert [r["epoch"] for r in _history(str(tmp_path))] == ["1", "2", "3", "4"]
    assert "history.csv" not in folder.artifact_errors
    os.remove(tmp_path / "history.csv")
    folder.append_history(rows[4], rows)
    assert [r["accuracy"] for r in _history(str(tmp_path))] == [str(r["accuracy"]) for r in rows]


def test_an_interrupted_run_whose_checkpoint_cannot_be_written_keeps_the_earlier_one(
        tmp_path, cifar10_slice_dir, sigterm_after, monkeypatch, caplog):
    """The signal's checkpoint could not be written (a full disk): the run said "no
    checkpoint (nothing was trained yet)" and its record had none, though the periodic
    one was there and a resume went on from it."""
    clock = _steps_of_one_second(monkeypatch)
    written, original = [], checkpoint.save

    def first_only(*args, **kwargs):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", first_only)
    config = _tiny(cifar10_slice_dir, epochs=0, budget_seconds=10.0, checkpoint_every=4.0, lr_schedule_unit="budget",
                   steps_per_execution=2)
    sigterm_after(6)
    with caplog.at_level(logging.WARNING):
        record, run_dir = train(config, results_dir=str(tmp_path), clock=clock)
    assert record["status"] == "interrupted" and record["checkpoint"] == "checkpoint.npz" and record["steps"] >= 6
    assert "No space left" in record["artifact_errors"]["checkpoint.npz"]
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("interrupted by SIGTERM")]
    kept = re.search(r"its checkpoint could not be written \(OSError: \[Errno 28\] No space left on device\); the "
                     r"earlier one, of step (\d+), is kept, and a resume goes on from it: resume with: python -m "
                     r"haet.train --resume=", line)
    assert kept and 4 <= int(kept.group(1)) < record["steps"], line
    monkeypatch.setattr(checkpoint, "save", original)
    resumed, _ = train(config, resume=run_dir, clock=clock)
    assert resumed["status"] == "completed" and resumed["steps"] == 10 and resumed["resumes"] == 1


def test_a_stop_signal_during_setup_writes_nothing(tmp_path, cifar10_slice_dir, monkeypatch):
    """One SIGTERM while the data loaded: the run folder was made after it, its record
    "interrupted" at step 0 with no checkpoint, which a resume refused."""
    from haet import training
    from haet.training import SetupInterrupted

    load = training.prepare_data

    def signalled(config):
        os.kill(os.getpid(), signal.SIGTERM)
        return load(config)

    monkeypatch.setattr(training, "prepare_data", signalled)
    with pytest.raises(SetupInterrupted, match="during setup, before anything was written") as stopped:
        train(_tiny(cifar10_slice_dir), results_dir=str(tmp_path / "runs"))
    assert stopped.value.signal_name == "SIGTERM" and not (tmp_path / "runs").exists()


def test_a_stop_signal_after_training_lets_the_run_complete_and_says_so(tmp_path, cifar10_slice_dir, monkeypatch,
                                                                        caplog):
    """SIGTERM during the final evaluation: the run completes, and `python -m haet.train`
    then ends by the signal (it exited 0: a shell loop of runs went on to the next). The
    warning said it would stop at the next execution boundary and write a checkpoint."""
    from haet import training

    evaluate = training.evaluate

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(training, "evaluate", signalled)
    with caplog.at_level("WARNING"):
        record, run_dir = train(_tiny(cifar10_slice_dir, epochs=1), results_dir=str(tmp_path))
    assert record["status"] == "completed" and record["test_accuracy"] is not None
    assert record["signal_after_training"] == _record(run_dir)["signal_after_training"] == "SIGTERM"
    assert checkpoint.exit_code(_record(run_dir)) == 0 and checkpoint.ending_signal(_record(run_dir)) == "SIGTERM"
    (said,) = [r.getMessage() for r in caplog.records if "SIGTERM" in r.getMessage()]
    assert said.startswith("SIGTERM received after training ended: going on to the run's end")


@pytest.mark.parametrize("fault", ["second_signal", "error"])
def test_a_fault_during_the_evaluation_keeps_the_training_and_the_resume_only_evaluates(
        tmp_path, cifar10_slice_dir, monkeypatch, caplog, fault):
    """A second stop signal (or an error: out of memory) during the final evaluation
    left the run with its last periodic checkpoint, 6 s of its 11: a resume trained
    the last 5 s again. The checkpoint written as training ended (before the
    averaged weights replace the raw ones) keeps all of it: the resume runs no step,
    writes no history row twice, and scores what the uninterrupted run scores. On a
    loaded host, the process that trained says so; the resume, which trains
    nothing, does not (it said its training's timings were not an idle machine's)."""
    from haet import device as device_lib, engine as engine_lib, training

    loaded = {"cpus": 2, "seconds": 10.0, "own_cpu_seconds": 10.0, "other_cpu_seconds": 15.0, "steal_seconds": 0.0,
              "other_load": 1.5, "steal_load": 0.0, "loaded": True, "processes": 1}
    monkeypatch.setattr(device_lib.HostCpu, "fields", lambda self, previous=None, resumed=False: loaded)

    clock = _steps_of_one_second(monkeypatch)
    config = _tiny(cifar10_slice_dir, epochs=0, budget_seconds=11.0, lr_schedule_unit="budget", ema_decay=0.8,
                   checkpoint_every=5.0)
    whole, whole_dir = train(config, results_dir=str(tmp_path / "whole"), clock=clock)
    assert whole["status"] == "completed" and whole["steps"] == 11 and whole["stopped_by"] == "budget"
    # A periodic one after 6 s (executions of 3 steps), and the last one.
    assert whole["checkpoints"] == 2 and not os.path.exists(os.path.join(whole_dir, "checkpoint.npz"))

    evaluate = training.evaluate

    def faulty(*args, **kwargs):
        if fault == "error":
            raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")
        os.kill(os.getpid(), signal.SIGINT)  # goes on to the run's end
        os.kill(os.getpid(), signal.SIGINT)  # (raises here)
        pytest.fail("the second signal raised nothing")

    monkeypatch.setattr(training, "evaluate", faulty)
    caplog.clear()
    with pytest.raises(KeyboardInterrupt if fault == "second_signal" else RuntimeError), caplog.at_level(
            logging.WARNING):
        train(config, results_dir=str(tmp_path / "parts"), clock=clock)
    warned = [r for r in caplog.records if "not those of an idle machine" in r.getMessage()]
    assert len(warned) == 1
    caplog.clear()
    (run_dir,) = [str(p) for p in (tmp_path / "parts").iterdir()]
    record = _record(run_dir)
    assert record["status"] == ("interrupted" if fault == "second_signal" else "failed")
    assert record["checkpoint"] == "checkpoint.npz" and record["checkpoints"] == 2
    assert record["steps"] == 11 and record["train_seconds"] == pytest.approx(11.0)
    assert record["stopped_by"] == "budget" and record["test_accuracy"] is None
    _, _, state = checkpoint.load(os.path.join(run_dir, "checkpoint.npz"))
    assert state["training_ended_by"] == "budget"
    rows = [(r["epoch"], r["steps"]) for r in _history(whole_dir)]
    assert [(r["epoch"], r["steps"]) for r in _history(run_dir)] == rows  # the last one cut short at 3 steps

    monkeypatch.setattr(training, "evaluate", evaluate)
    executions = []
    run = engine_lib.Engine.run
    monkeypatch.setattr(engine_lib.Engine, "run", lambda self, steps: executions.append(steps) or run(self, steps))
    with caplog.at_level(logging.WARNING):
        resumed, _ = train(config, resume=run_dir, clock=clock)
    assert not [r for r in caplog.records if "not those of an idle machine" in r.getMessage()]
    assert executions == [] and resumed["status"] == "completed" and resumed["resumes"] == 1
    assert resumed["steps"] == 11 and resumed["stopped_by"] == "budget" and resumed["epochs"] == whole["epochs"]
    assert [(r["epoch"], r["steps"]) for r in _history(run_dir)] == rows
    for key in ("test_accuracy", "test_loss"):
        assert resumed[key] == pytest.approx(whole[key], abs=1e-6), key
    assert resumed["test_loss_variants"] == pytest.approx(whole["test_loss_variants"], abs=1e-6)
    assert not os.path.exists(os.path.join(run_dir, "checkpoint.npz"))


def test_a_stop_signal_while_a_resume_of_an_ended_training_builds_its_run_says_it_goes_on(
        tmp_path, cifar10_slice_dir, monkeypatch, caplog):
    """Its warning said "stopping at the next execution boundary and writing a
    checkpoint"; the run then evaluated and completed, as after a signal after training."""
    from haet import training

    clock = _steps_of_one_second(monkeypatch)
    config = _tiny(cifar10_slice_dir, epochs=1, checkpoint_every=1.0)
    evaluate, build_run = training.evaluate, training.build_run

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return build_run(*args, **kwargs)

    monkeypatch.setattr(training, "evaluate", out_of_memory)
    with pytest.raises(RuntimeError):
        train(config, results_dir=str(tmp_path), clock=clock)
    (run_dir,) = [str(p) for p in tmp_path.iterdir()]
    monkeypatch.setattr(training, "evaluate", evaluate)
    monkeypatch.setattr(training, "build_run", signalled)
    with caplog.at_level("WARNING"):
        resumed, _ = train(config, resume=run_dir, clock=clock)
    assert resumed["status"] == "completed" and resumed["signal_after_training"] == "SIGTERM"
    assert resumed["steps"] == 5 and resumed["resumes"] == 1
    assert any(r.getMessage() == "SIGTERM: this run resumes a checkpoint written once its training had ended: going "
               "on to the run's end (its evaluation, record and files)" for r in caplog.records)


def test_a_second_stop_signal_while_the_checkpoint_is_written_keeps_the_training_in_the_record(
        tmp_path, cifar10_slice_dir, sigterm_after, monkeypatch):
    """SIGTERM after step 6, then SIGINT while the checkpoint was written: the record
    said "interrupted" and nothing of the training (steps, seconds, epochs)."""
    sent = sigterm_after(6)

    def second(self, run):
        os.kill(os.getpid(), signal.SIGINT)  # (the handler raises here)
        pytest.fail("the second signal raised nothing")

    monkeypatch.setattr(checkpoint.Checkpointer, "save", second)
    with pytest.raises(KeyboardInterrupt, match="second stop signal"):
        train(_tiny(cifar10_slice_dir, checkpoint_every=0.0), results_dir=str(tmp_path))
    (run_dir,) = [str(p) for p in tmp_path.iterdir()]
    record = _record(run_dir)
    assert record["status"] == "interrupted" and record["interrupted_by"] == "SIGTERM"
    assert record["error"] == "SecondStopSignal: second stop signal (SIGINT)" and record["checkpoint"] is None
    assert record["steps"] == sent[0] and record["train_seconds"] > 0 and record["stopped_by"] == "interrupted"
    # Epoch 1 ended on the device at step 5, in the execution the first signal stopped: no
    # row, and no checkpoint keeps it. (The count of checkpoints said 1.)
    assert record["epochs"] == record["epochs_pending"] == 0 and _history(run_dir) == []
    assert record["checkpoints"] == 0 and sorted(os.listdir(run_dir)) == ["history.csv", "record.json"]
    assert checkpoint.exit_code(record) == 128 + signal.SIGTERM


def test_a_second_stop_signal_after_a_checkpoint_keeps_the_record_of_the_checkpoint(tmp_path, cifar10_slice_dir,
                                                                                  monkeypatch):
    """A checkpoint after 5 s (1 s a step), then two signals after step 8: the record's
    steps, seconds and epochs are what a resume goes on from, and
    `steps_when_interrupted` how far the host had counted."""
    clock = _steps_of_one_second(monkeypatch)
    original = budget_lib.WallClockBudget.execute
    sent = []

    def execute(self, engine, steps, probe=False):
        losses = original(self, engine, steps, probe)
        if self.steps >= 8 and not sent:
            sent.append(self.steps)
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # (raises here)
        return losses

    monkeypatch.setattr(budget_lib.WallClockBudget, "execute", execute)
    config = _tiny(cifar10_slice_dir, checkpoint_every=5.0, steps_per_execution=2, epochs=4)
    with pytest.raises(KeyboardInterrupt, match="second stop signal"):
        train(config, results_dir=str(tmp_path), clock=clock)
    (run_dir,) = [str(p) for p in tmp_path.iterdir()]
    record = _record(run_dir)
    _, _, state = checkpoint.load(os.path.join(run_dir, "checkpoint.npz"))
    assert record["status"] == "interrupted" and record["checkpoint"] == "checkpoint.npz"
    assert 5 <= record["steps"] == state["hooks"]["2:WallClockBudget"]["steps"] < sent[0]
    assert record["checkpoints"] == 1 and record["steps_when_interrupted"] == sent[0]
    assert record["epochs"] == len(state["hooks"]["2:WallClockBudget"]["history"]) + len(state["ended_epochs"]) == 1
    resumed, _ = train(config, resume=run_dir, clock=clock)
    assert resumed["status"] == "completed" and resumed["steps"] == 20


def test_a_second_stop_signal_exits_with_the_first_signals_status():
    """A second SIGTERM exited 130, as if it were SIGINT; the record names the first."""
    from haet import cli
    from haet.training import SetupInterrupted

    signals = checkpoint.StopSignals()
    signals._handle(signal.SIGTERM, None)
    with pytest.raises(KeyboardInterrupt) as second:
        signals._handle(signal.SIGINT, None)
    assert str(second.value) == "second stop signal (SIGINT)" and second.value.signal_name == "SIGTERM"
    # (what haet.train exits with)
    assert cli.signal_exit_status(second.value.signal_name) == 128 + signal.SIGTERM
    assert cli.signal_exit_status(SetupInterrupted("during setup", "SIGTERM").signal_name) == 143


def test_records_are_strict_json():
    data = {"a": float("nan"), "b": [np.float32(np.inf), np.int64(3)], "c": (1.5, -np.inf), "d": np.arange(2)}
    assert results.json_safe(data) == {"a": None, "b": [None, 3], "c": [1.5, None], "d": [0, 1]}


def test_checkpoint_writing_pauses_the_budget():
    clock = FakeClock()
    budget = budget_lib.WallClockBudget(10.0, clock=clock)
    budget.begin()
    clock.t = 4.0
    with budget.pause():
        clock.t = 7.0
    assert budget.elapsed() == pytest.approx(4.0) and budget.paused_seconds == pytest.approx(3.0)


def _cli(*args, **kwargs):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.Popen([sys.executable, "-m", "haet.train", *args], env=env, cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


@pytest.mark.e2e
def test_cli_sigterm_then_a_resume_that_finishes(tmp_path, cifar10_slice_dir):
    out = tmp_path / "runs"
    flags = [f"--data_dir={cifar10_slice_dir}", "--train_size=200", "--model=tiny_cnn", "--width_multiplier=1",
             "--batch_size=20", "--optimizer=sgd", "--lr_schedule=constant", "--learning_rate=0.05",
             "--lr_schedule_unit=steps", "--epochs=60", "--augmentation=none", "--eval_batch_size=250",
             "--save_model=false", "--steps_per_execution=2", "--deterministic", f"--results_dir={out}"]
    process = _cli(*flags)
    run_dir = None
    for _ in range(12000):  # until two epochs have ended (a hang guard of 10 minutes, not a timing assertion)
        runs = list(out.iterdir()) if out.exists() else []
        if runs and (runs[0] / "history.csv").exists() and len(_history(runs[0])) >= 2:
            run_dir = runs[0]
            break
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.05)
    assert run_dir is not None
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    # Ended by the signal itself (a shell reports 143, and a shell loop of runs stops; it exited 143, and
    # a loop went on with its next run).
    assert process.returncode == -signal.SIGTERM, stderr[-3000:]
    record = _record(run_dir)
    assert record["status"] == "interrupted" and record["interrupted_by"] == "SIGTERM"
    assert record["deterministic"] and record["steps"] < 600
    assert f"--resume={run_dir}" in stdout and os.path.exists(run_dir / "checkpoint.npz")

    for bad, message in (("--learning_rate=1", "do not pass --learning_rate with it"),
                         (f"--results_dir={tmp_path / 'elsewhere'}", "do not pass --results_dir with it")):
        refused = _cli(f"--resume={run_dir}", bad)
        _, stderr = refused.communicate(timeout=300)
        assert refused.returncode == 2 and message in stderr, stderr[-3000:]
        assert _record(run_dir) == record and not (tmp_path / "elsewhere").exists()  # nothing touched

    resumed = _cli(f"--resume={run_dir}")
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr[-3000:]
    final = _record(run_dir)
    assert final["status"] == "completed" and final["resumes"] == 1 and final["steps"] == 600
    assert final["epochs"] == 60 and len(_history(run_dir)) == 60 and 0 <= final["test_accuracy"] <= 1
    assert "completed: test accuracy" in stdout and not os.path.exists(run_dir / "checkpoint.npz")


@pytest.mark.e2e
def test_cli_exit_status_of_a_diverged_run(tmp_path, cifar10_slice_dir):
    out = tmp_path / "runs"
    diverging = _cli(f"--data_dir={cifar10_slice_dir}", "--train_size=100", "--model=tiny_cnn",
                     "--width_multiplier=1", "--batch_size=20", "--optimizer=sgd", "--lr_schedule=constant",
                     "--learning_rate=1e8", "--lr_schedule_unit=steps", "--epochs=10", "--augmentation=none",
                     "--eval_batch_size=250", f"--results_dir={out}")
    stdout, stderr = diverging.communicate(timeout=300)
    assert diverging.returncode == 3, stderr[-3000:]
    (run_dir,) = list(out.iterdir())
    assert _record(run_dir)["status"] == "diverged" and "diverged" in stdout


def test_a_folder_that_cannot_be_locked_is_used_unlocked(tmp_path, monkeypatch):
    def no_locks(descriptor, operation):
        raise OSError(errno.ENOLCK, "No locks available")  # some network file systems

    monkeypatch.setattr(checkpoint.fcntl, "flock", no_locks)
    with checkpoint.run_lock(str(tmp_path)):
        with checkpoint.run_lock(str(tmp_path)):  # no lock held: nothing refused
            pass
