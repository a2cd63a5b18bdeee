import csv
import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import types

import pytest

from conftest import REPO, run_tool_cases
from haet import results, search
from haet.training import TrainConfig


def test_parse_space_casts_to_the_flag_types():
    space = search.parse_space(["learning_rate=loguniform:1e-4:1e-1", "optimizer=choice:adam|sgd",
                                "batch_size=int:16:32", "label_smoothing=uniform:0:0.3",
                                "horizontal_flip=choice:true|false"])
    assert space["learning_rate"] == ("loguniform", (1e-4, 1e-1))
    assert space["optimizer"] == ("choice", ("adam", "sgd"))
    assert space["batch_size"] == ("int", (16, 32))
    assert space["horizontal_flip"] == ("choice", (True, False))


@pytest.mark.parametrize("entry, message", [
    ("learning_rate", "must look like name=kind:args"),
    ("learnin_rate=uniform:0:1", "not a training flag"),
    ("validation_size=int:1:2", "the search fixes it"),
    ("learning_rate=normal:0:1", "unknown kind 'normal'"),
    ("learning_rate=loguniform:0:1", "LOW > 0"),
    ("learning_rate=uniform:1:0", "LOW < HIGH"),
    ("horizontal_flip=choice:maybe", "--horizontal_flip takes true or false"),
    # A range of another type than the flag's: every trial but the ends failed (batch size 42.34).
    ("batch_size=uniform:16:64", "--batch_size takes integers: use int:LOW:HIGH or choice"),
    ("learning_rate=int:1:3", "--learning_rate takes numbers: use uniform:LOW:HIGH or loguniform"),
    ("optimizer=int:1:2", "--optimizer takes values, not a range: use choice:A|B"),
    ("batch_size=int:1.5:3.7", r"int takes whole LOW:HIGH \(they were cut to 1:3\)"),
    ("optimizer=choice:adam|adam", "a choice is listed twice"),
    # The task and the validation images: a 2-class trial's 50% beat the 10-class ones'.
    ("classes=choice:3;5|0;1;2;3;4;5;6;7;8;9", "cannot search 'classes': the search fixes it for every trial"),
    ("train_size=int:300:500", "cannot search 'train_size'"),
    ("subset_seed=int:0:3", "cannot search 'subset_seed'"),
])
def test_bad_space_entries(entry, message):
    with pytest.raises(ValueError, match=message):
        search.parse_space([entry])


def test_a_flag_named_twice_is_refused():
    with pytest.raises(ValueError, match="--space names learning_rate twice"):  # (the last one was kept)
        search.parse_space(["learning_rate=uniform:0.01:0.1", "learning_rate=uniform:0.2:0.3"])


def _no_data(config):
    """Stands in for `prepare_data` beside a fake `train` (which reads no data)."""


def _fake_train(calls, fail_at=None, curve=None, slow=0.0):
    """A stand-in for `haet.training.train`: scores peak at learning rate 0.1; with
    `curve`, it reports validation accuracies at epoch ends to the hooks first."""
    def train(config, results_dir, hooks=(), resume_hint=None):
        calls.append(config)
        time.sleep(slow)  # lets two workers' trials overlap
        if len(calls) == fail_at:
            raise KeyboardInterrupt  # the search is interrupted mid-way
        assert config.evaluate_test is False and config.save_model is False
        os.makedirs(results_dir, exist_ok=True)
        run_dir = tempfile.mkdtemp(dir=results_dir)
        score = 1.0 - abs(config.learning_rate - 0.1)
        run = _FakeRun()
        for epoch, fraction in enumerate(curve or []):
            run.budget.t = (epoch + 1) * config.budget_seconds / len(curve)
            for hook in hooks:
                hook.on_epoch_end(run, epoch, {"val_accuracy": score * fraction})
            if run.stopped_by:
                break
        return {"status": "completed", "validation_accuracy": score, "validation_loss": 1 - score, "epochs": 1,
                "steps": 2, "train_seconds": run.budget.t or 1.0, "stopped_by": run.stopped_by or "budget"}, run_dir
    return train


class _FakeRun:
    def __init__(self):
        self.stopped_by = None
        self.budget = types.SimpleNamespace(t=0.0)
        self.budget.elapsed = lambda: self.budget.t

    def stop(self, reason):
        self.stopped_by = self.stopped_by or reason


def _states(study):
    return [t.state.name for t in sorted(study.trials, key=lambda t: t.number)]


def test_tpe_search_resumes_after_interruption_and_refuses_another_spec(tmp_path):
    base = TrainConfig(validation_size=500, budget_seconds=5, lr_schedule="constant")
    space = search.parse_space(["learning_rate=loguniform:0.01:1", "optimizer=choice:adam|sgd"])
    calls = []
    with pytest.raises(search.SearchInterrupted) as interrupted:
        search.run_search(base, space, str(tmp_path), 6, load_data=_no_data, train=_fake_train(calls, fail_at=3))
    assert _states(interrupted.value.study) == ["COMPLETE", "COMPLETE", "FAIL"]  # for the table and trials.csv
    resumed = []
    study = search.run_search(base, space, str(tmp_path), 6, load_data=_no_data, train=_fake_train(resumed))
    # Two finished before the interruption; the interrupted one failed; four more ran, the first
    # with the interrupted one's values (afresh: the stand-in wrote no run folder before it stopped).
    assert _states(study) == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE", "COMPLETE", "COMPLETE", "COMPLETE"]
    assert len(resumed) == 4 and all(c.validation_size == 500 for c in resumed)
    assert study.trials[3].params == study.trials[2].params
    assert (resumed[0].learning_rate, resumed[0].optimizer) == (study.trials[2].params["learning_rate"],
                                                                study.trials[2].params["optimizer"])
    rows = search.trial_rows(study, space)
    assert [r["retry_of"] for r in rows] == [None, None, None, 2, None, None, None]
    states = {line.split()[0]: line.split(None, 4)[-1] for line in search.format_table(rows, []).splitlines()[1:]}
    assert states["2"] == "fail (interrupted)" and states["3"] == "complete, trial 2 again"
    assert [r["trial"] for r in rows] == list(range(7))
    assert all(0.01 <= r["learning_rate"] <= 1 and r["optimizer"] in ("adam", "sgd") for r in rows)
    best = max((r for r in rows if r["validation_accuracy"] is not None), key=lambda r: r["validation_accuracy"])
    assert best["validation_accuracy"] == pytest.approx(1 - abs(best["learning_rate"] - 0.1))
    spec = json.loads((tmp_path / "search.json").read_text())
    assert spec["sampler"] == "tpe" and spec["git_commit"] == results.git_commit()
    assert {r["git_commit"] for r in rows if r["state"] == "complete"} == {results.git_commit()}
    with pytest.raises(ValueError, match="holds another search .*pruner"):
        search.run_search(base, space, str(tmp_path), 6, pruner="hyperband", load_data=_no_data, train=_fake_train([]))
    with pytest.raises(ValueError, match=r"holds another search \(different base flags: budget\)"):
        search.run_search(dataclasses.replace(base, budget_seconds=9), space, str(tmp_path), 6, load_data=_no_data,
                          train=_fake_train([]))
    # The same data folder written with a trailing "/" is the same search (it was refused).
    again = search.run_search(dataclasses.replace(base, data_dir=str(tmp_path / "data") + "/"), space,
                              str(tmp_path / "d"), 1, load_data=_no_data, train=_fake_train([]))
    search.run_search(dataclasses.replace(base, data_dir=str(tmp_path / "data")), space, str(tmp_path / "d"), 1,
                      load_data=_no_data, train=_fake_train([]))
    assert len(again.trials) == 1
    with pytest.raises(ValueError, match="set --validation_size"):
        search.run_search(dataclasses.replace(base, validation_size=0), space, str(tmp_path / "other"), 5,
                          load_data=_no_data, train=_fake_train([]))
    table = search.format_table(rows, list(space)).splitlines()
    assert table[1].split()[0] == str(best["trial"])  # best first, numbered as Optuna numbers trials
    search.write_trials_csv(rows, str(tmp_path / "trials.csv"))
    with open(tmp_path / "trials.csv") as f:
        assert [int(r["trial"]) for r in csv.DictReader(f)] == list(range(7))


def test_a_search_that_cannot_run_writes_nothing_and_a_trial_that_cannot_start_fails_alone(tmp_path,
                                                                                         cifar10_slice_dir):
    space = search.parse_space(["learning_rate=loguniform:0.01:1"])
    bad_data = tmp_path / "bad_data"
    bad_data.mkdir()
    (bad_data / "train.npz").write_bytes(b"not an npz file")
    (bad_data / "test.npz").write_bytes(b"not an npz file")
    base = TrainConfig(validation_size=500, budget_seconds=5, lr_schedule="constant", data_dir=str(bad_data))
    calls = []
    with pytest.raises(ValueError, match="train.npz"):  # the real loader, before anything is written
        search.run_search(base, space, str(tmp_path / "s"), 2, train=_fake_train(calls))
    assert calls == [] and not (tmp_path / "s").exists()
    run_folder = tmp_path / "run"
    run_folder.mkdir()
    (run_folder / "record.json").write_text("{}")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    good = dataclasses.replace(base, data_dir=cifar10_slice_dir, train_size=1000)
    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("mine")
    for folder, message in ((run_folder, "is a training run's folder"), (a_file, "is a file, not a folder"),
                            (a_file / "s", "is a file, not a folder"), (unrelated, "holds other files and no search")):
        with pytest.raises(ValueError, match=message):
            search.run_search(good, space, str(folder), 2, train=_fake_train(calls))
    with pytest.raises(ValueError, match="--storage='nosuchdb://x' cannot be opened"):
        search.run_search(good, space, str(tmp_path / "s"), 2, storage="nosuchdb://x", train=_fake_train(calls))
    with pytest.raises(ValueError, match="--min_resource_seconds must be a positive number of seconds below"):
        search.run_search(good, space, str(tmp_path / "s"), 2, pruner="hyperband", min_resource_seconds=-1,
                          train=_fake_train(calls))
    # (Every trial would have failed on it.)
    with pytest.raises(ValueError, match=r"--init_from='.*missing\.keras' is not a file"):
        search.run_search(dataclasses.replace(good, init_from=str(tmp_path / "missing.keras")), space,
                          str(tmp_path / "s"), 2, train=_fake_train(calls))
    assert not (tmp_path / "s").exists() and os.listdir(unrelated) == ["notes.txt"]
    assert calls == [] and sorted(os.listdir(run_folder)) == ["record.json"] and a_file.read_text() == ""

    def cannot_start(config, results_dir, hooks=(), resume_hint=None):  # e.g. a searched precision the machine lacks
        from haet.training import SetupError
        calls.append(config)
        raise SetupError("precision 'mixed_float16' needs a GPU")

    study = search.run_search(good, space, str(tmp_path / "s"), 2, train=cannot_start)
    assert len(calls) == 2 and _states(study) == ["FAIL", "FAIL"]
    assert [r["status"] for r in search.trial_rows(study, space)] == ["could not start"] * 2


def test_a_search_of_settings_that_change_nothing_is_refused_before_any_trial(tmp_path):
    wall_clock = TrainConfig(validation_size=500, budget_seconds=5)  # reads --learning_rates, not --learning_rate
    calls = []
    with pytest.raises(ValueError, match="--space searches learning_rate, which changes nothing: "
                                         "--lr_schedule=wall_clock does not use it"):
        search.run_search(wall_clock, search.parse_space(["learning_rate=loguniform:0.01:1"]), str(tmp_path / "a"),
                          2, load_data=_no_data, train=_fake_train(calls))
    with pytest.raises(ValueError, match="--space searches momentum, which changes nothing: --optimizer=adam"):
        search.check_space_counts(wall_clock, search.parse_space(["momentum=uniform:0.5:0.95"]))
    assert calls == [] and not (tmp_path / "a").exists()
    # Searching the choice as well: the trials that choose a kind reading the setting use it.
    search.check_space_counts(wall_clock, search.parse_space(["learning_rate=loguniform:0.01:1",
                                                              "lr_schedule=choice:wall_clock|cosine"]))
    search.check_space_counts(wall_clock, search.parse_space(["momentum=uniform:0.5:0.95", "optimizer=choice:adam|sgd"]))
    # A base setting that changes nothing is the command line's warning, not a refusal.
    search.check_space_counts(dataclasses.replace(wall_clock, momentum=0.5),
                              search.parse_space(["weight_decay=loguniform:1e-5:1e-3"]))


def test_grid_sampler_visits_every_combination_once(tmp_path):
    base = TrainConfig(validation_size=500, budget_seconds=5, lr_schedule="constant")
    space = search.parse_space(["learning_rate=loguniform:0.01:1", "optimizer=choice:adam|sgd"])
    calls = []
    study = search.run_search(base, space, str(tmp_path), 100, sampler="grid", grid_points=3,
                              load_data=_no_data, train=_fake_train(calls))
    seen = sorted((round(c.learning_rate, 6), c.optimizer) for c in calls)
    assert seen == sorted((lr, o) for lr in (0.01, 0.1, 1.0) for o in ("adam", "sgd"))
    assert _states(study) == ["COMPLETE"] * 6


def test_pruning_stops_trailing_trials_on_budget_seconds(tmp_path):
    base = TrainConfig(validation_size=500, budget_seconds=90, lr_schedule="constant")
    space = search.parse_space(["learning_rate=uniform:0.05:1"])
    calls = []
    study = search.run_search(base, space, str(tmp_path), 12, sampler="random", pruner="successive_halving",
                              load_data=_no_data, train=_fake_train(calls, curve=[0.3, 0.6, 0.8, 0.9, 1.0]))
    states = _states(study)
    assert states.count("PRUNED") >= 3 and states.count("COMPLETE") >= 1 and len(states) == 12
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    # Reported at elapsed seconds of the budget; pruned runs stopped short of it.
    assert all(set(t.intermediate_values) <= {18, 36, 54, 72, 90} for t in study.trials)
    assert all(t.user_attrs["stopped_by"] == "pruned" and t.user_attrs["train_seconds"] < 90 for t in pruned)


def test_the_settings_of_the_sampler_and_pruner_count_in_the_search_only_where_they_act(tmp_path):
    """`grid_points` was part of every search (a TPE search run again with another
    value was refused, though it changes nothing) and `min_resource_seconds` of none
    (a pruned search run again with another value pruned its new trials another way)."""
    base = TrainConfig(validation_size=500, budget_seconds=90, lr_schedule="constant")
    space = search.parse_space(["learning_rate=uniform:0.05:1"])
    calls = []
    search.run_search(base, space, str(tmp_path / "tpe"), 1, grid_points=3, load_data=_no_data,
                      train=_fake_train(calls))
    again = search.run_search(base, space, str(tmp_path / "tpe"), 2, grid_points=5, load_data=_no_data,
                              train=_fake_train(calls))
    assert len(again.trials) == 2 and len(calls) == 2
    # A search.json written before (grid_points kept for every sampler, no min_resource_seconds) is the same search.
    saved = json.loads((tmp_path / "tpe" / "search.json").read_text())
    assert saved["grid_points"] is None and saved["min_resource_seconds"] is None
    del saved["min_resource_seconds"]
    (tmp_path / "tpe" / "search.json").write_text(json.dumps({**saved, "grid_points": 3}))
    assert len(search.run_search(base, space, str(tmp_path / "tpe"), 3, load_data=_no_data,
                                 train=_fake_train(calls)).trials) == 3
    search.run_search(base, space, str(tmp_path / "grid"), 1, sampler="grid", grid_points=3, load_data=_no_data,
                      train=_fake_train(calls))
    with pytest.raises(ValueError, match=r"holds another search \(different grid_points\)"):
        search.run_search(base, space, str(tmp_path / "grid"), 2, sampler="grid", grid_points=4, load_data=_no_data,
                          train=_fake_train(calls))
    pruned = dict(sampler="random", pruner="successive_halving", load_data=_no_data, train=_fake_train(calls))
    search.run_search(base, space, str(tmp_path / "sh"), 1, min_resource_seconds=10, **pruned)
    search.run_search(base, space, str(tmp_path / "sh"), 2, min_resource_seconds=10.0, **pruned)  # (the same)
    for other in (20, None):
        with pytest.raises(ValueError, match=r"holds another search \(different min_resource_seconds\)"):
            search.run_search(base, space, str(tmp_path / "sh"), 3, min_resource_seconds=other, **pruned)
    with pytest.raises(ValueError, match="--min_resource_seconds=10 changes nothing with --pruner=none"):
        search.run_search(base, space, str(tmp_path / "none"), 1, min_resource_seconds=10, load_data=_no_data,
                          train=_fake_train(calls))
    assert len(calls) == 6 and not (tmp_path / "none").exists()


def test_the_best_flags_of_a_list_choice_paste_into_a_shell(tmp_path):
    """A list value was printed joined by ";" (as Optuna keeps it): a shell ended the
    command there."""
    import shlex

    base = TrainConfig(validation_size=500, budget_seconds=5)
    space = search.parse_space(["learning_rates=choice:0.2;0.02;0.002|0.1;0.01;0.001"])
    study = search.run_search(base, space, str(tmp_path), 2, sampler="grid", load_data=_no_data,
                              train=_fake_train([]))
    line = search.best_summary(study, space, 10).splitlines()[0]
    flags_part = line.split(": ", 2)[2].split("  (")[0]  # best: trial N: FLAGS  (validation ...
    assert shlex.split(flags_part)[0] in ("--learning_rates=0.2,0.02,0.002", "--learning_rates=0.1,0.01,0.001")


def test_a_best_at_chance_level_is_flagged(tmp_path):
    base = TrainConfig(validation_size=500, budget_seconds=5, lr_schedule="constant")
    space = search.parse_space(["learning_rate=loguniform:10:100"])
    study = search.run_search(base, space, str(tmp_path), 2, load_data=_no_data, train=_fake_train([]))  # scores far below 0.15
    assert "WARNING: the best validation accuracy is near chance (10%)" in search.best_summary(study, space, 10)


def test_an_interrupted_grid_point_is_trained_again(tmp_path):
    """The grid sampler counts every ended trial's point as visited: an interrupted
    trial's point was never trained again, and the search ended without it."""
    base = TrainConfig(validation_size=500, budget_seconds=5, lr_schedule="constant")
    space = search.parse_space(["learning_rate=choice:0.01|0.1|0.5"])
    with pytest.raises(search.SearchInterrupted) as interrupted:
        search.run_search(base, space, str(tmp_path), 3, sampler="grid", load_data=_no_data,
                          train=_fake_train([], fail_at=2))
    (lost,) = [t for t in interrupted.value.study.trials if t.state.name == "FAIL"]
    calls = []
    study = search.run_search(base, space, str(tmp_path), 3, sampler="grid", load_data=_no_data,
                              train=_fake_train(calls))
    assert [c.learning_rate for c in calls][:1] == [lost.params["learning_rate"]]  # taken up first
    assert {t.params["learning_rate"] for t in study.trials if t.state.name == "COMPLETE"} == {0.01, 0.1, 0.5}
    assert search.finished_trials(study) == 3 and len(calls) == 2
    # Once taken up, it is not taken up again.
    search.run_search(base, space, str(tmp_path), 3, sampler="grid", load_data=_no_data, train=_fake_train(calls))
    assert len(calls) == 2 and [r["retry_of"] for r in search.trial_rows(study, space)] == [None, None, 1, None]


def test_a_stop_signal_after_a_trials_training_stops_the_search_after_that_trial(tmp_path):
    """SIGTERM during trial 1's evaluation: its run completes (its record names the
    signal), and the search went on with trial 2 as if nothing had come."""
    base = TrainConfig(validation_size=500, budget_seconds=5, lr_schedule="constant")
    space = search.parse_space(["learning_rate=choice:0.01|0.1|0.5"])
    calls, train = [], _fake_train([])

    def signalled_in_the_second(config, results_dir, hooks=(), resume_hint=None):
        calls.append(config)
        record, run_dir = train(config, results_dir, hooks, resume_hint)
        return {**record, "signal_after_training": "SIGTERM" if len(calls) == 2 else None}, run_dir

    with pytest.raises(search.SearchInterrupted) as interrupted:
        search.run_search(base, space, str(tmp_path), 3, sampler="grid", load_data=_no_data,
                          train=signalled_in_the_second)
    assert len(calls) == 2 and _states(interrupted.value.study) == ["COMPLETE", "COMPLETE"]
    assert interrupted.value.interruption.signal_name == "SIGTERM"  # (the exit status: 143)
    assert "SIGTERM after trial 1's training ended: the search stops after it" in str(interrupted.value)
    # The same command goes on with the last point.
    study = search.run_search(base, space, str(tmp_path), 3, sampler="grid", load_data=_no_data,
                              train=signalled_in_the_second)
    assert len(calls) == 3 and _states(study) == ["COMPLETE"] * 3


def test_the_data_are_named_by_their_hash_not_the_path_to_them(tmp_path):
    """Workers of a shared storage whose data folder was spelled otherwise (another
    machine's path) ran separate studies of the same search, training the same values;
    in one folder, the other spelling was refused as "another search"."""
    base = TrainConfig(validation_size=500, budget_seconds=5, lr_schedule="constant")
    space = search.parse_space(["learning_rate=loguniform:0.01:1"])
    url = f"sqlite:///{tmp_path / 'shared.db'}"

    def data_of(sha):
        return lambda config: types.SimpleNamespace(subset_sha256=sha)

    def run(folder, data_dir, sha="a" * 64, trials=1, **kwargs):
        return search.run_search(dataclasses.replace(base, data_dir=data_dir), space, str(tmp_path / folder), trials,
                                 load_data=data_of(sha), train=_fake_train([]), **kwargs)

    first = run("w1", "/machine1/data/cifar10", storage=url)
    second = run("w2", "/home/someone/cifar10", trials=2, storage=url)
    assert second.study_name == first.study_name and len(second.trials) == 2  # one study, its trials shared
    assert run("w1", "../other/spelling", storage=url).study_name == first.study_name
    with pytest.raises(ValueError, match=r"holds another search \(different data_sha256\)"):
        run("w1", "/machine1/data/cifar10", sha="b" * 64, storage=url)
    # A search.json from before the hash was kept names the folder: the same folder resumes it.
    run("old", "/data/cifar10")
    written = json.loads((tmp_path / "old" / "search.json").read_text())
    assert written["data_sha256"] == "a" * 64 and written["base_flags"]["data_dir"] is None
    del written["data_sha256"]
    written["base_flags"]["data_dir"] = "/data/cifar10"
    (tmp_path / "old" / "search.json").write_text(json.dumps(written))
    assert len(run("old", "/data/cifar10/", trials=2).trials) == 2
    with pytest.raises(ValueError, match=r"holds another search \(different base flags: data_dir\)"):
        run("old", "/elsewhere/cifar10", trials=2)


def test_a_new_worker_joins_a_shared_study_begun_before_the_data_were_named_by_their_hash(tmp_path):
    """Its study is named after the search with the data's path: a worker started after
    the change, in a new folder, began a second study of the same search."""
    import optuna

    base = TrainConfig(validation_size=500, budget_seconds=5, lr_schedule="constant", data_dir="/data/cifar10")
    space = search.parse_space(["learning_rate=loguniform:0.01:1"])
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    by_path = search._spec(dataclasses.replace(base, evaluate_test=False, save_model=False), space, "tpe", "none", 0,
                           3, url, None)
    earlier = optuna.create_study(study_name=search.study_name_of(by_path), storage=url, direction="maximize")
    earlier.add_trial(optuna.trial.create_trial(params={"learning_rate": 0.1}, value=0.9, distributions={
        "learning_rate": optuna.distributions.FloatDistribution(0.01, 1, log=True)}))
    study = search.run_search(base, space, str(tmp_path / "new_worker"), 2, storage=url,
                              load_data=lambda config: types.SimpleNamespace(subset_sha256="a" * 64),
                              train=_fake_train([]))
    assert study.study_name == earlier.study_name and len(study.trials) == 2


def test_a_stop_signal_as_a_trials_result_is_written_waits_for_it(tmp_path):
    """SIGINT after the trial's run returned, as its result was written: the finished
    trial was marked interrupted, not counted, and its run trained again."""
    import signal

    base = TrainConfig(validation_size=500, budget_seconds=5, lr_schedule="constant")
    space = search.parse_space(["learning_rate=choice:0.01|0.1|0.5"])
    train = _fake_train([])

    class Signalling(dict):
        def get(self, key, default=None):
            if key == "status" and not getattr(self, "sent", False):
                self.sent = True
                os.kill(os.getpid(), signal.SIGINT)  # (held: it raised here)
            return super().get(key, default)

    def signalled(config, results_dir, hooks=(), resume_hint=None):
        record, run_dir = train(config, results_dir, hooks, resume_hint)
        return Signalling(record), run_dir

    with pytest.raises(search.SearchInterrupted) as interrupted:
        search.run_search(base, space, str(tmp_path), 3, sampler="grid", load_data=_no_data, train=signalled)
    assert _states(interrupted.value.study) == ["COMPLETE"]
    assert search.finished_trials(interrupted.value.study) == 1


def test_a_trial_interrupted_before_its_run_began_is_not_counted(tmp_path, monkeypatch):
    """SIGTERM as trial 1 drew its values (between two trials' runs): it was counted
    as a finished trial, so the search ended a trial short."""
    base = TrainConfig(validation_size=500, budget_seconds=5, lr_schedule="constant")
    space = search.parse_space(["learning_rate=loguniform:0.01:1"])
    suggest, drawn = search.suggest, []

    def interrupted_in_the_second(trial, space):
        drawn.append(trial.number)
        if len(drawn) == 2:
            raise KeyboardInterrupt("SIGTERM")
        return suggest(trial, space)

    monkeypatch.setattr(search, "suggest", interrupted_in_the_second)
    calls = []
    with pytest.raises(search.SearchInterrupted):
        search.run_search(base, space, str(tmp_path), 3, load_data=_no_data, train=_fake_train(calls))
    study = search.run_search(base, space, str(tmp_path), 3, load_data=_no_data, train=_fake_train(calls))
    assert len(calls) == 3 and search.finished_trials(study) == 3
    assert _states(study).count("COMPLETE") == 3


def test_a_failed_or_interrupted_trial_is_logged_without_a_traceback_and_a_bug_with_one(tmp_path):
    """Optuna logged each failed trial with a traceback of haet's own frames, burying the
    one line that says why (a diverged run; a signal); a bug's traceback stays."""
    import logging

    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(logging.Formatter().format(record))
    logging.getLogger("optuna").addHandler(handler)  # (Optuna's loggers do not propagate to the root)
    base = TrainConfig(validation_size=500, budget_seconds=5, lr_schedule="constant")
    space = search.parse_space(["learning_rate=loguniform:0.01:1"])

    def diverges(config, results_dir, hooks=(), resume_hint=None):
        return {"status": "diverged", "diverged_at_step": 3}, tempfile.mkdtemp(dir=tmp_path)

    def bug(config, results_dir, hooks=(), resume_hint=None):
        raise ZeroDivisionError("a bug")

    try:
        search.run_search(base, space, str(tmp_path / "a"), 1, load_data=_no_data, train=diverges)
        with pytest.raises(search.SearchInterrupted):
            search.run_search(base, space, str(tmp_path / "b"), 1, load_data=_no_data,
                              train=_fake_train([], fail_at=1))
        with pytest.raises(ZeroDivisionError):
            search.run_search(base, space, str(tmp_path / "c"), 1, load_data=_no_data, train=bug)
    finally:
        logging.getLogger("optuna").removeHandler(handler)
    failed = [line for line in lines if " failed with parameters" in line]
    assert len(failed) == 3 and "TrialFailed('the run diverged: 3')" in failed[0] and "KeyboardInterrupt" in failed[1]
    assert ["Traceback" in line for line in failed] == [False, False, True]
    assert "ZeroDivisionError: a bug" in failed[2]
    assert logging.getLogger("optuna.study._optimize").filters == []  # (the filter is the search's alone)
    # No figure of nothing: no trial completed.
    assert search.write_figures(search.open_study(str(tmp_path / "a"), None, None), space, str(tmp_path / "a"),
                                "t") == []
    assert not list((tmp_path / "a").glob("*.png"))


def test_each_run_of_a_seeded_search_samples_new_values_and_one_run_is_reproducible(tmp_path):
    """Optuna seeds a sampler once per process: each run of the same command (and each
    worker of a shared study) drew the first run's values again, which were trained
    twice. Trial N now draws from (seed, N)."""
    base = TrainConfig(validation_size=500, budget_seconds=5, lr_schedule="constant")
    space = search.parse_space(["learning_rate=loguniform:0.01:1"])
    for sampler in ("tpe", "random"):
        def rates(folder, trials):
            calls = []
            search.run_search(base, space, str(tmp_path / sampler / folder), trials, sampler=sampler, seed=3,
                              load_data=_no_data, train=_fake_train(calls))
            return [c.learning_rate for c in calls]

        first, second = rates("a", 2), rates("a", 4)
        assert len(set(first + second)) == 4, (sampler, first, second)  # the second run drew new values
        assert rates("b", 4) == first + second  # and one run of 4 draws what the two runs drew
    with pytest.raises(ValueError, match=r"seed \(--search_seed\) must be an integer in \[0, 2\*\*32 - 1\]. Received: -1"):
        search.run_search(base, space, str(tmp_path / "bad"), 2, seed=-1, load_data=_no_data, train=_fake_train([]))
    assert not (tmp_path / "bad").exists()  # (before: the first trial failed, the folder written)


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_trials_running_at_once_each_draw_from_their_own_seed(sampler):
    """`study.optimize(n_jobs=2)` runs two trials at once: they shared one sampler, so a
    trial drew its values from the other's seed (and the run was not reproducible)."""
    import optuna

    space = search.parse_space(["learning_rate=loguniform:0.01:1", "weight_decay=uniform:0:0.01"])

    def drawn(order):
        study = optuna.create_study(direction="maximize", sampler=search.make_sampler(sampler, space, 3))
        trials = [study.ask(), study.ask()]
        values = {}
        for number, name in order:
            kind, args = space[name]
            values[number, name] = trials[number].suggest_float(name, *args, log=kind == "loguniform")
        return values

    names = list(space)
    one_after_the_other = drawn([(0, names[0]), (0, names[1]), (1, names[0]), (1, names[1])])
    interleaved = drawn([(1, names[0]), (0, names[0]), (0, names[1]), (1, names[1])])
    assert interleaved == one_after_the_other


def test_an_interrupted_trial_queued_twice_by_workers_in_two_folders_is_trained_once(tmp_path):
    """Workers in other folders of a shared storage hold other locks: two could queue
    the same interrupted trial, whose values were then trained, and counted, twice."""
    import optuna

    base = TrainConfig(validation_size=500, budget_seconds=5, lr_schedule="constant")
    space = search.parse_space(["learning_rate=loguniform:0.01:1"])
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    with pytest.raises(search.SearchInterrupted) as interrupted:
        search.run_search(base, space, str(tmp_path / "a"), 3, storage=url, load_data=_no_data,
                          train=_fake_train([], fail_at=2))
    study = interrupted.value.study
    search._take_up_interrupted(study, str(tmp_path / "a"), 3)
    waiting = study.trials[-1]
    assert waiting.state.name == "WAITING" and waiting.user_attrs["retry_of"] == 1
    study.add_trial(optuna.trial.create_trial(  # what a worker in folder b, reading the trials at once, added
        state=optuna.trial.TrialState.WAITING, params=waiting.params, distributions=waiting.distributions,
        user_attrs=waiting.user_attrs, system_attrs=waiting.system_attrs))
    calls = []
    study = search.run_search(base, space, str(tmp_path / "b"), 3, storage=url, load_data=_no_data,
                              train=_fake_train(calls))
    assert _states(study) == ["COMPLETE", "FAIL", "COMPLETE", "FAIL", "COMPLETE"]
    assert [c.learning_rate for c in calls][:1] == [study.trials[1].params["learning_rate"]] and len(calls) == 2
    rows = search.trial_rows(study, space)
    assert rows[3]["status"] == "trial 2 took it up" and search.finished_trials(study) == 3


def _fake_train_meanwhile(calls, meanwhile):
    """`_fake_train(calls)`, running `meanwhile()` (what another worker does while this
    one trains) at the start of its first call."""
    completes = _fake_train(calls)

    def train(config, results_dir, hooks=(), resume_hint=None):
        if not calls:
            meanwhile()
        return completes(config, results_dir, hooks)
    return train


def _interrupted_after(reports, calls):
    """A stand-in `train` whose first call reports `reports` (validation accuracies at
    epoch ends, at 1, 2... seconds) to the pruner, then is interrupted; later calls
    complete (as `_fake_train`)."""
    completes = _fake_train([], curve=[1.0])

    def train(config, results_dir, hooks=(), **resume):
        calls.append(dict(resume))
        if len(calls) > 1:
            return completes(config, results_dir, hooks)
        run = _FakeRun()
        for epoch, value in enumerate(reports):
            run.budget.t = epoch + 1.0
            for hook in hooks:
                hook.on_epoch_end(run, epoch, {"val_accuracy": value})
        raise KeyboardInterrupt
    return train


def test_a_trial_taken_up_again_does_not_carry_the_pruners_rungs(tmp_path):
    """The take-up copied every system attribute, the pruner's completed rungs too: the
    interrupted trial's value counted twice in its rung, or under Hyperband in another
    bracket's. The grid's point is kept."""
    base = TrainConfig(validation_size=500, budget_seconds=8, lr_schedule="constant")
    space = search.parse_space(["learning_rate=choice:0.01|0.1"])
    for sampler, pruner in (("grid", "successive_halving"), ("tpe", "hyperband")):
        folder = str(tmp_path / pruner)
        with pytest.raises(search.SearchInterrupted) as interrupted:
            search.run_search(base, space, folder, 2, sampler=sampler, pruner=pruner, min_resource_seconds=1,
                              load_data=_no_data, train=_interrupted_after([0.5, 0.6, 0.7], []))
        study = interrupted.value.study
        (stopped,) = study.trials
        assert any(k.startswith("completed_rung_") for k in stopped.system_attrs), stopped.system_attrs
        search._take_up_interrupted(study, folder, 2)
        again = study.trials[-1]
        assert again.state.name == "WAITING" and again.params == stopped.params
        assert not any(k.startswith("completed_rung_") for k in again.system_attrs), again.system_attrs
        assert ("grid_id" in again.system_attrs) == (sampler == "grid")
        if sampler == "grid":
            assert again.system_attrs["grid_id"] == stopped.system_attrs["grid_id"]


def test_the_values_reported_before_a_chain_of_interruptions():
    """A trial interrupted before its resumed run reported again holds none of the
    values: the next one takes them from the whole chain (it took them from the last)."""
    import optuna

    def trial(number, values, retry_of=None, resume_dir="runs/trial_0/run"):
        t = optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, intermediate_values=values,
                                      user_attrs={"retry_of": retry_of, "resume_dir": None if retry_of is None else resume_dir})
        t.number = number
        return t

    trials = [trial(0, {1: 0.1, 2: 0.2}), trial(1, {}, retry_of=0), trial(2, {2: 0.25, 3: 0.3}, retry_of=1),
              trial(3, {1: 0.9}), trial(4, {2: 0.5}, retry_of=2, resume_dir=None), trial(5, {}, retry_of=4)]
    assert search._reported_before(trials, 1) == {1: 0.1, 2: 0.2}
    assert search._reported_before(trials, 2) == {1: 0.1, 2: 0.25, 3: 0.3}
    assert search._reported_before(trials, 3) == {1: 0.9}
    # Trial 4 trained afresh (no checkpoint): its run began with it.
    assert search._reported_before(trials, 5) == search._reported_before(trials, 4) == {2: 0.5}


def test_a_worker_still_running_takes_up_another_workers_interrupted_trial(tmp_path):
    """Take-up ran only as a worker started: a worker still running filled the count
    with new trials, and the interrupted worker, run again, found nothing left to do."""
    import optuna

    base = TrainConfig(validation_size=500, budget_seconds=5, lr_schedule="constant")
    space = search.parse_space(["learning_rate=loguniform:0.01:1"])
    folder = str(tmp_path / "s")
    calls = []

    def interrupted_elsewhere():
        search.open_study(folder, None, None).add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState.FAIL, params={"learning_rate": 0.5},
            distributions={"learning_rate": optuna.distributions.FloatDistribution(0.01, 1, log=True)},
            user_attrs={"interrupted": True, "ended": True}))

    study = search.run_search(base, space, folder, 3, load_data=_no_data,
                              train=_fake_train_meanwhile(calls, interrupted_elsewhere))
    assert [c.learning_rate for c in calls][1] == 0.5 and len(calls) == 3
    assert [r["retry_of"] for r in search.trial_rows(study, space)] == [None, None, 1, None]


def test_a_worker_still_running_trains_a_grid_point_another_worker_was_interrupted_on(tmp_path):
    """The grid sampler stopped the study once every point had a trial, before the
    callback queued the interrupted one again: the worker ended, the point unscored."""
    import optuna

    base = TrainConfig(validation_size=500, budget_seconds=5, lr_schedule="constant")
    space = search.parse_space(["learning_rate=choice:0.01|0.1"])
    folder = str(tmp_path / "s")
    calls = []

    def interrupted_on_the_other_point():
        other = search.open_study(folder, search.make_sampler("grid", space, 0), None)
        stopped = other.ask()
        search.suggest(stopped, space)
        stopped.set_user_attr("interrupted", True)
        other.tell(stopped, state=optuna.trial.TrialState.FAIL)

    study = search.run_search(base, space, folder, 8, sampler="grid", load_data=_no_data,
                              train=_fake_train_meanwhile(calls, interrupted_on_the_other_point))
    assert sorted(c.learning_rate for c in calls) == [0.01, 0.1]
    assert _states(study) == ["COMPLETE", "FAIL", "COMPLETE"] and study.trials[2].user_attrs["retry_of"] == 1


def test_a_worker_still_running_takes_up_a_dead_workers_trial_after_its_own(tmp_path, monkeypatch):
    """Optuna fails a dead worker's trial as the next trial starts, which sampled new
    values first: it is failed and taken up as soon as the running worker's trial ends."""
    import socket

    monkeypatch.setattr(search, "HEARTBEAT_SECONDS", 1)
    monkeypatch.setattr(search, "GRACE_SECONDS", 1)  # (read as each call opens its storage)
    base = TrainConfig(validation_size=500, budget_seconds=5, lr_schedule="constant")
    space = search.parse_space(["learning_rate=loguniform:0.01:1"])
    folder = str(tmp_path / "s")
    calls, lost = [], []

    def killed_elsewhere():
        other = search.open_study(folder, None, None)
        orphan = other.ask()
        lost.append(orphan.suggest_float("learning_rate", 0.01, 1, log=True))
        orphan.set_user_attr("worker", f"{socket.gethostname()}:999999999")
        orphan.set_user_attr("ended", False)
        other._storage.record_heartbeat(orphan._trial_id)
        time.sleep(2.1)  # past the grace period, however slow the machine (SQLite keeps whole seconds)

    study = search.run_search(base, space, folder, 3, load_data=_no_data,
                              train=_fake_train_meanwhile(calls, killed_elsewhere))
    assert [c.learning_rate for c in calls][1] == lost[0] and len(calls) == 3
    rows = search.trial_rows(study, space)
    assert [r["retry_of"] for r in rows] == [None, None, 1, None] and rows[1]["status"] == "worker died"


def test_the_run_folder_of_a_trial_whose_worker_died(tmp_path):
    """A worker that died named no run folder in its trial: it is the one folder with a
    record in the trial's own runs/trial_N."""
    import optuna

    trial = optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, user_attrs={"ended": False})
    trial.number = 4
    assert search._trial_run_folder(str(tmp_path), trial) is None
    run = tmp_path / "runs" / "trial_4" / "20261124T000000Z_run"
    run.mkdir(parents=True)
    (tmp_path / "runs" / "trial_4" / "stray").mkdir()  # (no record: not a run folder)
    assert search._trial_run_folder(str(tmp_path), trial) is None
    (run / "record.json").write_text("{}")
    assert search._trial_run_folder(str(tmp_path), trial) == str(run)
    named = optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, user_attrs={"run_dir": "runs/x"})
    assert search._trial_run_folder(str(tmp_path), named) == str(tmp_path / "runs" / "x")


@pytest.mark.e2e
def test_an_interrupted_trial_resumes_its_run_when_the_search_runs_again(tmp_path, cifar10_slice_dir,
                                                                         sigterm_after, caplog):
    """An interrupted trial's run has a checkpoint: the same command again goes on from it
    (it trained a new trial from the start), and scores what an uninterrupted trial
    scores; the pruner sees the values reported before the interruption."""
    base = TrainConfig(data_dir=cifar10_slice_dir, train_size=200, validation_size=50, model="tiny_cnn",
                       width_multiplier=1, batch_size=25, optimizer="sgd", lr_schedule="constant",
                       lr_schedule_unit="steps", epochs=3, augmentation="none", eval_batch_size=250,
                       steps_per_execution=2, budget_seconds=600.0)
    space = search.parse_space(["learning_rate=choice:0.05|0.1"])
    kwargs = dict(pruner="successive_halving", trials=1)
    whole = search.run_search(base, space, str(tmp_path / "whole"), **kwargs)
    sent = sigterm_after(8)  # in the second epoch (6 steps an epoch)
    with pytest.raises(search.SearchInterrupted) as interrupted, caplog.at_level(logging.WARNING):
        search.run_search(base, space, str(tmp_path / "parts"), **kwargs)
    assert interrupted.value.interruption.signal_name == "SIGTERM" and sent == [8]
    # The run's own line says how to go on in a search (it said `python -m haet.train --resume`,
    # which trains the run outside it).
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("interrupted by SIGTERM")]
    assert line.endswith(search.RESUME_HINT) and "haet.train" not in line
    study = search.run_search(base, space, str(tmp_path / "parts"), **kwargs)
    assert _states(study) == ["FAIL", "COMPLETE"]
    stopped, resumed = study.trials
    reference = whole.trials[0]
    assert resumed.params == stopped.params == reference.params and resumed.user_attrs["retry_of"] == 0
    assert resumed.user_attrs["run_dir"] == stopped.user_attrs["run_dir"] == resumed.user_attrs["resume_dir"]
    record = results.read_record(str(tmp_path / "parts" / resumed.user_attrs["run_dir"]))
    assert record["resumes"] == 1 and record["steps"] == 18 and record["status"] == "completed"
    assert resumed.value == pytest.approx(reference.value, abs=1e-6)
    # Every epoch's value, the first from before the interruption.
    assert len(stopped.intermediate_values) == 1
    assert list(resumed.intermediate_values.values()) == pytest.approx(
        list(reference.intermediate_values.values()), abs=1e-6)
    assert min(resumed.intermediate_values) == min(stopped.intermediate_values)


@pytest.mark.e2e
def test_a_pruned_trial_interrupted_while_it_evaluates_stays_pruned(tmp_path, cifar10_slice_dir, monkeypatch):
    """The pruner stopped the trial's run after its second epoch; a second stop signal
    then came while the run evaluated. The search run again resumes it from the
    checkpoint written as training ended, which runs no epoch: the trial was scored
    COMPLETE with its validation accuracy (its `pruned` was not in the checkpoint)."""
    import signal

    import optuna

    from haet import training

    monkeypatch.setattr(optuna.trial.Trial, "should_prune",
                        lambda trial: len(trial._cached_frozen_trial.intermediate_values) >= 2)
    base = TrainConfig(data_dir=cifar10_slice_dir, train_size=200, validation_size=50, model="tiny_cnn",
                       width_multiplier=1, batch_size=25, optimizer="sgd", lr_schedule="constant",
                       lr_schedule_unit="steps", epochs=4, augmentation="none", eval_batch_size=250,
                       budget_seconds=600.0, checkpoint_every=1e-6)  # (a checkpoint as training ends)
    space = search.parse_space(["learning_rate=choice:0.05|0.1"])
    kwargs = dict(pruner="successive_halving", trials=1, sampler="grid")
    evaluate = training.evaluate

    def second_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # goes on to the run's end
        os.kill(os.getpid(), signal.SIGINT)  # (raises here)
        pytest.fail("the second signal raised nothing")

    monkeypatch.setattr(training, "evaluate", second_signal)
    with pytest.raises(search.SearchInterrupted):
        search.run_search(base, space, str(tmp_path), **kwargs)
    monkeypatch.setattr(training, "evaluate", evaluate)
    study = search.run_search(base, space, str(tmp_path), **kwargs)
    assert _states(study) == ["FAIL", "PRUNED"]
    stopped, resumed = study.trials
    record = results.read_record(str(tmp_path / resumed.user_attrs["run_dir"]))
    assert resumed.user_attrs["retry_of"] == stopped.number and resumed.user_attrs["resume_dir"]
    assert record["resumes"] == 1
    assert record["stopped_by"] == "pruned" and record["epochs"] == 2 and record["status"] == "completed"


def test_a_dead_workers_trial_is_failed_and_replaced_when_the_search_runs_again(tmp_path, monkeypatch):
    """A worker killed mid-trial leaves it "running": it filled the count, so the same
    command again exited at once, forever (Optuna fails stale trials inside optimize,
    which was never reached)."""
    import socket

    monkeypatch.setattr(search, "HEARTBEAT_SECONDS", 1)
    monkeypatch.setattr(search, "GRACE_SECONDS", 3600)  # (read as each call opens its storage)
    base = TrainConfig(validation_size=500, budget_seconds=5, lr_schedule="constant")
    space = search.parse_space(["learning_rate=loguniform:0.01:1"])
    search.run_search(base, space, str(tmp_path), 1, load_data=_no_data, train=_fake_train([]))
    study = search.open_study(str(tmp_path), None, None)
    orphan = study.ask()  # as the killed worker left it: running, its last heartbeat now
    lost = orphan.suggest_float("learning_rate", 0.01, 1, log=True)
    orphan.set_user_attr("worker", f"{socket.gethostname()}:999999999")
    orphan.set_user_attr("ended", False)
    study._storage.record_heartbeat(orphan._trial_id)
    calls = []
    search.run_search(base, space, str(tmp_path), 2, load_data=_no_data, train=_fake_train(calls))
    assert calls == [] and _states(study) == ["COMPLETE", "RUNNING"]  # within the grace period: it may be alive
    monkeypatch.setattr(search, "GRACE_SECONDS", 1)
    time.sleep(2.1)  # past that grace period, however slow the machine (SQLite keeps whole seconds)
    search.run_search(base, space, str(tmp_path), 2, load_data=_no_data, train=_fake_train(calls))
    assert len(calls) == 1 and _states(study) == ["COMPLETE", "FAIL", "COMPLETE"]
    assert calls[0].learning_rate == lost  # its values again (afresh: it left no run folder)
    rows = search.trial_rows(study, space)
    assert [r["status"] for r in rows] == ["completed", "worker died", "completed"]
    assert search.format_table(rows, []).splitlines()[-1].split(None, 4)[-1] == "fail (worker died)"
    assert search.finished_trials(study) == 2  # the dead worker's trial is not counted


def test_searches_sharing_a_storage_keep_their_own_studies(tmp_path):
    """Every study was named "haet": a second search in a shared database counted the
    first one's trials as its own and ended in a KeyError (its flag in none of them)."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    base = TrainConfig(validation_size=500, budget_seconds=5, lr_schedule="constant")
    rates, decays = (search.parse_space([entry]) for entry in ("learning_rate=loguniform:0.01:1",
                                                               "weight_decay=loguniform:1e-5:1e-3"))
    first = search.run_search(base, rates, str(tmp_path / "a"), 2, storage=url, load_data=_no_data,
                              train=_fake_train([]))
    calls = []
    second = search.run_search(base, decays, str(tmp_path / "b"), 2, storage=url, load_data=_no_data,
                               train=_fake_train(calls))
    assert len(calls) == 2 and first.study_name != second.study_name
    assert all("weight_decay" in t.params for t in second.trials) and len(first.trials) == 2
    assert search.best_summary(second, decays, 10).startswith("best: trial ")
    # The same folder with another database (or none) is another search: refused, not a new study.
    with pytest.raises(ValueError, match=r"holds another search \(different storage\)"):
        search.run_search(base, rates, str(tmp_path / "a"), 3, load_data=_no_data, train=_fake_train(calls))
    assert json.loads((tmp_path / "a" / "search.json").read_text())["storage"] == url
    with pytest.raises(ValueError, match="keeps the study in memory"):
        search.run_search(base, rates, str(tmp_path / "c"), 2, storage="sqlite:///:memory:", load_data=_no_data,
                          train=_fake_train(calls))
    with pytest.raises(ValueError, match="a file is sqlite:////absolute/path.db"):
        search.run_search(base, rates, str(tmp_path / "c"), 2, storage=str(tmp_path / "x.db"), load_data=_no_data,
                          train=_fake_train(calls))
    assert len(calls) == 2 and not (tmp_path / "c").exists()


def test_a_search_runs_again_on_its_own_study_in_a_shared_storage_after_its_spec_changed(tmp_path):
    """The study of a search in a shared `--storage` is named from a hash of its spec:
    when a new version of haet adds to the spec (min_resource_seconds), the hash of
    the same search changes, and it started a new, empty study. search.json now keeps
    the name; one written before is named as the code that wrote it named it."""
    import hashlib

    import optuna

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    base = TrainConfig(validation_size=500, budget_seconds=5, lr_schedule="constant")
    space = search.parse_space(["learning_rate=loguniform:0.01:1"])
    first = search.run_search(base, space, str(tmp_path / "a"), 1, storage=url, load_data=_no_data,
                              train=_fake_train([]))
    written = json.loads((tmp_path / "a" / "search.json").read_text())
    assert written["study_name"] == first.study_name != "haet"
    (tmp_path / "a" / "search.json").write_text(json.dumps({**written, "study_name": "haet-renamed"}))
    with pytest.raises(KeyError):  # (no such study: the name written is the one used)
        optuna.load_study(study_name="haet-renamed", storage=url)
    assert search.run_search(base, space, str(tmp_path / "a"), 1, storage=url, load_data=_no_data,
                             train=_fake_train([])).study_name == "haet-renamed"
    # A search.json from before: no study_name nor min_resource_seconds, grid_points for every sampler;
    # its study was named from the hash of these seven keys.
    legacy = {k: written[k] for k in ("space", "sampler", "pruner", "seed", "base_flags", "storage")}
    legacy["grid_points"] = 3
    name = "haet-" + hashlib.sha256(json.dumps(legacy, sort_keys=True).encode()).hexdigest()[:16]
    optuna.copy_study(from_study_name=first.study_name, from_storage=url, to_storage=url, to_study_name=name)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "search.json").write_text(json.dumps({**legacy, "git_commit": "f5b0213"}))
    calls = []
    study = search.run_search(base, space, str(tmp_path / "b"), 2, storage=url, load_data=_no_data,
                              train=_fake_train(calls))
    assert study.study_name == name and len(study.trials) == 2 and len(calls) == 1


def test_a_search_begun_before_a_setting_was_added_runs_again(tmp_path):
    """search.json keeps every training setting: a version of haet with one more made
    every search already begun "another search (different base flags: ...)", refused.
    A setting it lacks holds its default; one this version does not know is refused."""
    base = TrainConfig(validation_size=500, budget_seconds=5, lr_schedule="constant")
    space = search.parse_space(["learning_rate=loguniform:0.01:1"])
    folder = tmp_path / "s"
    search.run_search(base, space, str(folder), 1, load_data=_no_data, train=_fake_train([]))
    written = json.loads((folder / "search.json").read_text())
    flags_ = {k: v for k, v in written["base_flags"].items() if k not in ("ema_warmup", "label_smoothing")}
    (folder / "search.json").write_text(json.dumps({**written, "base_flags": flags_}))
    calls = []
    study = search.run_search(base, space, str(folder), 2, load_data=_no_data, train=_fake_train(calls))
    assert len(study.trials) == 2 and len(calls) == 1
    # A setting of a newer haet (or one since removed) would train the trials otherwise.
    newer = tmp_path / "newer"
    newer.mkdir()
    (newer / "search.json").write_text(json.dumps({**written, "base_flags": {**flags_, "a_newer_setting": 0.4}}))
    with pytest.raises(ValueError, match=r"holds a search with training settings this version of haet does not "
                                         r"know \(a_newer_setting; it was begun at commit "):
        search.run_search(base, space, str(newer), 1, load_data=_no_data, train=_fake_train(calls))
    # A value other than the default of a setting the search.json lacks is another search.
    with pytest.raises(ValueError, match=r"different base flags: label_smoothing\)"):
        search.run_search(dataclasses.replace(base, label_smoothing=0.1), space, str(folder), 3,
                          load_data=_no_data, train=_fake_train(calls))
    assert len(calls) == 1


def test_a_damaged_search_folder_is_refused_in_one_message(tmp_path):
    base = TrainConfig(validation_size=500, budget_seconds=5, lr_schedule="constant")
    space = search.parse_space(["learning_rate=loguniform:0.01:1"])
    for text in ("garbage", "[1, 2]"):
        folder = tmp_path / text[:3]
        folder.mkdir()
        (folder / "search.json").write_text(text)
        with pytest.raises(ValueError, match=r"search.json is not a search's description"):
            search.run_search(base, space, str(folder), 1, load_data=_no_data, train=_fake_train([]))
    search.run_search(base, space, str(tmp_path / "s"), 1, load_data=_no_data, train=_fake_train([]))
    (tmp_path / "s" / "study.db").write_bytes(b"not a database" * 100)
    with pytest.raises(ValueError, match="The search's study cannot be opened .*is damaged"):
        search.run_search(base, space, str(tmp_path / "s"), 2, load_data=_no_data, train=_fake_train([]))


def test_a_search_interruption_names_the_signal_it_ends_by():
    import signal

    from haet import cli

    # (the search's exit status, as haet.train's)
    assert cli.signal_exit_status(search.TrialInterrupted(3, "SIGTERM").signal_name) == 128 + signal.SIGTERM == 143
    assert cli.signal_exit_status(search.TrialInterrupted(3, "SIGINT").signal_name) == 130
    assert cli.signal_exit_status(getattr(KeyboardInterrupt(), "signal_name", None)) == 130
    assert cli.signal_exit_status("not a signal") == 130


_WORKER = """
import os, sys, time
sys.path.insert(0, {tests!r})
from test_search import _fake_train, _no_data
from haet import search
from haet.training import TrainConfig
space = search.parse_space(["learning_rate=loguniform:0.01:1"])
# Both workers start together (imports take seconds): a barrier of two files.
open(os.path.join({folder!r}, "ready_" + sys.argv[1]), "w").close()
deadline = time.time() + 300
while len([f for f in os.listdir({folder!r}) if f.startswith("ready_")]) < 2 and time.time() < deadline:
    time.sleep(0.05)
search.run_search(TrainConfig(validation_size=500, budget_seconds=5, lr_schedule="constant"), space,
                  os.path.join({folder!r}, "search"), 10, load_data=_no_data, train=_fake_train([], slow=0.3))
"""


def test_two_worker_processes_share_one_study(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO)
    script = _WORKER.format(tests=os.path.dirname(os.path.abspath(__file__)), folder=str(tmp_path))
    workers = [subprocess.Popen([sys.executable, "-c", script, str(k)], env=env, cwd=REPO, stderr=subprocess.PIPE,
                                text=True) for k in range(2)]
    for w in workers:
        _, stderr = w.communicate(timeout=600)
        assert w.returncode == 0, stderr[-3000:]
    study = search.open_study(str(tmp_path / "search"), None, None)
    numbers = [t.number for t in study.trials]
    assert sorted(numbers) == list(range(len(numbers))) and 10 <= len(numbers) <= 11
    assert set(_states(study)) == {"COMPLETE"}
    run_dirs = [t.user_attrs["run_dir"] for t in study.trials]
    assert len(set(run_dirs)) == len(run_dirs) == len(os.listdir(tmp_path / "search" / "runs"))  # each ran once
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2  # both workers took trials


@pytest.mark.e2e
def test_every_trial_trains_on_the_data_the_search_read_once(tmp_path, cifar10_slice_dir, monkeypatch):
    """The search reads its dataset before the first trial; its trials' runs train on
    those arrays (read-only) and read no file again (each trial's run read it anew)."""
    from haet import data
    reads = []
    read = data._load_npz
    monkeypatch.setattr(data, "_load_npz", lambda d: reads.append(d) or read(d))
    base = TrainConfig(data_dir=cifar10_slice_dir, train_size=200, validation_size=50, model="tiny_cnn",
                       width_multiplier=1, batch_size=25, optimizer="sgd", lr_schedule="constant",
                       lr_schedule_unit="steps", epochs=1, augmentation="crop_flip_cutout", eval_batch_size=250,
                       budget_seconds=600.0)
    study = search.run_search(base, search.parse_space(["learning_rate=choice:0.05|0.1"]), str(tmp_path / "s"),
                              trials=2, sampler="grid")
    assert _states(study) == ["COMPLETE", "COMPLETE"] and reads == [cifar10_slice_dir]
    records = [results.read_record(str(tmp_path / "s" / t.user_attrs["run_dir"])) for t in study.trials]
    assert len({r["subset_sha256"] for r in records}) == 1 and all(r["status"] == "completed" for r in records)
    # Outside the search, a load reads the files again.
    data.load_dataset("cifar10", cifar10_slice_dir)
    assert len(reads) == 2


@pytest.mark.e2e
def test_the_search_command_stopped_by_sigterm_writes_its_study_and_ends_by_the_signal(tmp_path, cifar10_slice_dir):
    """It exited 143: a shell reported the same status, but a shell loop of searches went on with the next."""
    import signal

    env = dict(os.environ, PYTHONPATH=REPO, MPLBACKEND="Agg")
    search_dir = tmp_path / "s"
    process = subprocess.Popen(
        [sys.executable, "-m", "haet.search", f"--data_dir={cifar10_slice_dir}", "--train_size=200",
         "--validation_size=50", "--model=tiny_cnn", "--width_multiplier=1", "--batch_size=25", "--optimizer=sgd",
         "--augmentation=none", "--lr_schedule=constant", "--lr_schedule_unit=steps", "--epochs=1000",
         "--eval_batch_size=250", "--sampler=grid", "--space=learning_rate=choice:0.01|0.1",
         f"--search_dir={search_dir}"], env=env, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for _ in range(12000):  # until the first trial's run has ended an epoch (a hang guard, not a timing assertion)
        if list(search_dir.glob("runs/trial_0/*/history.csv")):
            break
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == -signal.SIGTERM, stderr[-3000:]
    assert "interrupted (" in stderr and "run the same command again to go on" in stderr
    assert f"wrote {search_dir}" in stdout and (search_dir / "trials.csv").exists()


@pytest.mark.e2e
def test_search_command_on_real_data(tmp_path, cifar10_slice_dir):
    env = dict(os.environ, PYTHONPATH=REPO, MPLBACKEND="Agg")
    result = subprocess.run(
        [sys.executable, "-m", "haet.search", f"--data_dir={cifar10_slice_dir}", "--train_size=200",
         "--validation_size=50", "--model=tiny_cnn", "--width_multiplier=1", "--batch_size=25",
         "--optimizer=sgd", "--augmentation=none", "--input_normalization=channel_standardize",
         "--lr_schedule=cosine", "--lr_schedule_unit=steps", "--epochs=2", "--eval_batch_size=250",
         "--sampler=grid", "--pruner=successive_halving", "--space=learning_rate=choice:0.01|0.1",
         f"--search_dir={tmp_path / 's'}"],
        env=env, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "s" / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["trial"] for r in rows] == ["0", "1"] and {r["learning_rate"] for r in rows} == {"0.01", "0.1"}
    assert {r["state"] for r in rows} <= {"complete", "pruned"}
    records = [json.loads(open(tmp_path / "s" / r["run_dir"] / "record.json").read()) for r in rows]
    assert all(r["test_accuracy"] is None and r["validation_examples"] == 50 for r in records)
    assert "--learning_rate=" in result.stdout
    assert (tmp_path / "s" / "optimization_history.png").stat().st_size > 5000
    # A sampler's or pruner's setting that the chosen one does not read is refused before any work.
    common = [f"--data_dir={cifar10_slice_dir}", "--train_size=200", "--validation_size=50", "--model=tiny_cnn",
              "--lr_schedule=cosine", "--space=learning_rate=choice:0.01|0.1", f"--search_dir={tmp_path / 'refused'}"]
    bads = (("--grid_points=5", "--grid_points=5 changes nothing with --sampler=tpe"),
            ("--min_resource_seconds=5", "--min_resource_seconds=5 changes nothing with --pruner=none"),
            # haet.train's own flags, taken with the training flags: accepted, and they did nothing.
            ("--resume=/nowhere", "--resume does nothing in haet.search: run the same search command again"),
            (f"--results_dir={tmp_path / 'runs'}", "--results_dir does nothing in haet.search: the trials' runs go "
                                                   "under --search_dir/runs."))
    for (bad, message), refused in zip(bads, run_tool_cases("haet.search", [[*common, b] for b, _ in bads],
                                                            env=env, cwd=REPO)):
        assert refused.returncode == 2 and "haet.search: error: " + message in refused.stderr, refused.stderr[-2000:]
    assert not (tmp_path / "refused").exists()
