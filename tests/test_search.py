import csv
import dataclasses
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
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
])
def test_bad_space_entries(entry, message):
    with pytest.raises(ValueError, match=message):
        search.parse_space([entry])


def test_random_trials_are_log_uniform_in_range_and_reproducible():
    space = search.parse_space(["learning_rate=loguniform:1e-4:1e-0", "batch_size=int:8:10"])
    trials = search.make_trials(space, "random", 400, seed=3)
    assert trials == search.make_trials(space, "random", 400, seed=3)
    rates = [t["learning_rate"] for t in trials]
    assert all(1e-4 <= r <= 1.0 for r in rates)
    # Log-uniform: each decade gets about a quarter of the draws.
    per_decade = [sum(10.0 ** -(d + 1) <= r < 10.0 ** -d for r in rates) for d in range(4)]
    assert all(60 <= n <= 140 for n in per_decade), per_decade
    assert {t["batch_size"] for t in trials} == {8, 9, 10}


def test_grid_is_the_cartesian_product():
    space = search.parse_space(["learning_rate=loguniform:0.01:1", "optimizer=choice:adam|sgd"])
    trials = search.make_trials(space, "grid", trials=0, seed=0, grid_points=3)
    assert len(trials) == 6
    assert sorted({round(t["learning_rate"], 6) for t in trials}) == [0.01, 0.1, 1.0]


def _fake_train(calls, fail_at=None):
    def train(config, results_dir):
        calls.append(config)
        if len(calls) == fail_at:
            raise KeyboardInterrupt  # the search is interrupted mid-way
        assert config.evaluate_test is False and config.save_model is False
        run_dir = os.path.join(results_dir, f"lr{config.learning_rate}")
        os.makedirs(run_dir)
        # A made-up score peaking at learning rate 0.1.
        score = 1.0 - abs(config.learning_rate - 0.1)
        return {"validation_accuracy": score, "validation_loss": 1 - score, "epochs": 1, "steps": 2,
                "train_seconds": 1.0}, run_dir
    return train


def test_search_resumes_after_interruption_and_refuses_another_spec(tmp_path):
    base = TrainConfig(validation_size=500, budget_seconds=5)
    space = search.parse_space(["learning_rate=loguniform:0.01:1"])
    calls = []
    with pytest.raises(KeyboardInterrupt):
        search.run_search(base, space, "random", 5, 0, str(tmp_path), train=_fake_train(calls, fail_at=3))
    with open(tmp_path / "trials.csv") as f:
        assert [r["trial"] for r in csv.DictReader(f)] == ["0", "1"]
    resumed = []
    rows = search.run_search(base, space, "random", 5, 0, str(tmp_path), train=_fake_train(resumed))
    assert len(resumed) == 3  # trials 2, 3, 4 only
    planned = search.make_trials(space, "random", 5, 0)
    assert [c.learning_rate for c in resumed] == [t["learning_rate"] for t in planned[2:]]
    accuracies = [float(r["validation_accuracy"]) for r in rows]
    assert len(rows) == 5 and accuracies == sorted(accuracies, reverse=True)
    spec = json.loads((tmp_path / "search.json").read_text())
    assert spec["trials"] == 5 and spec["git_commit"] == results.git_commit()
    assert {"versions", "backend", "device", "created_utc"} <= set(spec)
    assert {r["git_commit"] for r in rows} == {results.git_commit()}
    with pytest.raises(ValueError, match="holds a different search .*trials"):
        search.run_search(base, space, "random", 6, 0, str(tmp_path), train=_fake_train([]))
    with pytest.raises(ValueError, match="set --validation_size"):
        search.run_search(dataclasses.replace(base, validation_size=0), space, "random", 5, 0,
                          str(tmp_path / "other"), train=_fake_train([]))
    path = search.plot_search(rows, space, str(tmp_path / "search.png"), "t")
    assert os.path.getsize(path) > 0
    table = search.format_table(rows, ["learning_rate"])
    assert table.splitlines()[1].split()[0] == rows[0]["trial"]


@pytest.mark.e2e
def test_search_command_on_real_data(tmp_path, cifar10_slice_dir):
    env = dict(os.environ, PYTHONPATH=REPO)
    result = subprocess.run(
        [sys.executable, "-m", "haet.search", f"--data_dir={cifar10_slice_dir}", "--train_size=200",
         "--validation_size=50", "--model=tiny_cnn", "--width_multiplier=1", "--batch_size=25",
         "--optimizer=sgd", "--augmentation=none", "--input_normalization=channel_standardize",
         "--lr_schedule=cosine", "--lr_schedule_unit=steps", "--epochs=1", "--eval_batch_size=250",
         "--method=grid", "--space=learning_rate=choice:0.01|0.1", f"--search_dir={tmp_path / 's'}"],
        env=env, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "s" / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["ok", "ok"] and {r["learning_rate"] for r in rows} == {"0.01", "0.1"}
    records = [json.loads(open(tmp_path / "s" / r["run_dir"] / "record.json").read()) for r in rows]
    assert all(r["test_accuracy"] is None and r["validation_examples"] == 50 for r in records)
    assert "best: --learning_rate=" in result.stdout and (tmp_path / "s" / "search.png").exists()


def test_resuming_a_folder_written_before_trials_had_a_commit_column(tmp_path):
    base = TrainConfig(validation_size=500, budget_seconds=5)
    space = search.parse_space(["learning_rate=loguniform:0.01:1"])
    with pytest.raises(KeyboardInterrupt):
        search.run_search(base, space, "random", 3, 0, str(tmp_path), train=_fake_train([], fail_at=2))
    # Rewrite the folder as an older version left it: no commit column, no provenance.
    with open(tmp_path / "trials.csv") as f:
        old = [{k: v for k, v in r.items() if k != "git_commit"} for r in csv.DictReader(f)]
    with open(tmp_path / "trials.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(old[0]))
        w.writeheader()
        w.writerows(old)
    spec = json.loads((tmp_path / "search.json").read_text())
    (tmp_path / "search.json").write_text(json.dumps({k: spec[k] for k in search.SPEC_KEYS}))
    rows = search.run_search(base, space, "random", 3, 0, str(tmp_path), train=_fake_train([]))
    assert sorted(r["trial"] for r in rows) == ["0", "1", "2"]
    with open(tmp_path / "trials.csv") as f:
        assert next(csv.reader(f)) == list(old[0])  # the file keeps its header
