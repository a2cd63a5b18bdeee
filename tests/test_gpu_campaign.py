"""The GPU campaign script (scripts/gpu_campaign.py) in its dry mode: the same stages
as on the GPU machine, here under JAX with budgets of seconds.

The stages fall into groups that need nothing of each other (each group its own
test, so that the two CI workers share them): the first call and the 600 s run, the
recipes, the ensembles, and full CIFAR-10 in parts."""

import glob
import json
import os
import subprocess
import sys
import tarfile

import keras
import numpy as np
import pytest

from conftest import REPO

SCRIPT = os.path.join(REPO, "scripts", "gpu_campaign.py")


@pytest.fixture
def campaign(tmp_path, cifar10_slice_dir):
    """Runs dry stages of the campaign into `tmp_path/out`: `campaign(stage, ...)` -> the
    finished process; the fixture's `out` and `parts` are the folders it uses."""
    if keras.backend.backend() != "jax":
        pytest.skip("the campaign runs under JAX (the GPU machine has no TensorFlow)")
    env = dict(os.environ, PYTHONPATH=REPO)

    def run(stage, *extra, out=tmp_path / "out", dry=True):
        return subprocess.run([sys.executable, SCRIPT, stage, *(["--dry"] if dry else []), f"--out={out}",
                               f"--data_dir={cifar10_slice_dir}", f"--parts_dir={tmp_path / 'parts'}", *extra],
                              env=env, capture_output=True, text=True)

    run.out, run.parts, run.data_dir = tmp_path / "out", tmp_path / "parts", cifar10_slice_dir
    return run


def run_stages(campaign, *stages):
    for stage in stages:
        result = campaign(stage)
        assert result.returncode == 0, (stage, result.stdout[-3000:], result.stderr[-3000:])
        assert "failures: none" in result.stdout


def records(out):
    return [json.loads(open(p).read()) for p in glob.glob(str(out / "files" / "*_record.json"))]


def archives(out):
    """What comes back from the device: one archive a stage (it returns at most 8 files)."""
    return sorted(p.name for p in out.glob("*.tar.gz"))


@pytest.mark.e2e
def test_the_first_call_and_the_600s_run_dry(campaign):
    run_stages(campaign, "call1", "start600", "collect600")
    rows = json.loads((campaign.out / "files" / "bench_resnet9.json").read_text())
    assert rows and rows[0]["images_per_second"] > 0
    (boundary,) = json.loads((campaign.out / "files" / "bench_epoch_boundary.json").read_text())
    assert boundary["model"] == "airbench" and boundary["boundaries_timed"] == 14 and boundary["median_ms"] > 0
    runs = records(campaign.out)
    assert len(runs) == 2 and {r["status"] for r in runs} == {"completed"}
    assert {r["model"] for r in runs} == {"resnet9", "tiny_cnn"}
    assert archives(campaign.out) == ["call1.tar.gz", "default_600s_seed0.tar.gz"]
    command = subprocess.run([sys.executable, SCRIPT, "command", "call1"], capture_output=True, text=True)
    assert "--no-index" in command.stdout and "KERAS_BACKEND=jax" in command.stdout and "call1 --out=$OUT" in command.stdout


@pytest.mark.e2e
def test_the_recipes_stage_and_a_fast_recipe_at_600s_dry(campaign):
    run_stages(campaign, "recipes")
    for stage in ("start600", "collect600"):
        result = campaign(stage, "--recipe=bag_of_tricks_haet", "--seed=1")
        assert result.returncode == 0 and "failures: none" in result.stdout, (stage, result.stdout[-3000:])
    runs = sorted(records(campaign.out), key=lambda r: r["flags"]["seed"])
    assert [(r["model"], r["flags"]["seed"], r["status"]) for r in runs] == [
        ("airbench", 0, "completed"), ("resnet9", 1, "completed")]
    assert runs[1]["flags"]["prep"] == "whitening" and runs[1]["flags"]["one_cycle_knot_unit"] == "fraction"
    assert archives(campaign.out) == ["bag_of_tricks_haet_600s_seed1.tar.gz", "recipes_seed0.tar.gz"]
    with tarfile.open(campaign.out / "bag_of_tricks_haet_600s_seed1.tar.gz") as archive:
        assert any(name.endswith("bag_of_tricks_haet_600s_seed1.log") for name in archive.getnames())
    command = subprocess.run([sys.executable, SCRIPT, "command", "collect600", "--recipe=airbench_haet_ensemble4",
                              "--seed=2"], capture_output=True, text=True)
    assert command.stdout.rstrip().endswith("collect600 --out=$OUT --seed=2 --recipe=airbench_haet_ensemble4")
    with tarfile.open(campaign.out / "recipes_seed0.tar.gz") as archive:
        assert any(name.endswith("airbench_haet_15s_seed0.log") for name in archive.getnames())


@pytest.mark.e2e
def test_the_ensembles_stage_dry(campaign):
    run_stages(campaign, "ensembles")
    runs = records(campaign.out)
    assert len(runs) == 1 and runs[0]["status"] == "completed" and runs[0]["model"] == "airbench_ensemble_of_2"
    mechanisms = json.loads((campaign.out / "files" / "bench_ensembles.json").read_text())
    assert {(r["members"], r["variant"]) for r in mechanisms} == {
        (2, "separate"), (2, "branches"), (2, "sgd_separate"), (2, "sgd_branches"), (2, "sgd_vmap")}
    assert archives(campaign.out) == ["ensembles_seed0.tar.gz"]


@pytest.mark.e2e
def test_full_cifar10_travels_in_parts_dry(campaign, tmp_path):
    # As few parts as fit beside the working tree: one for these 1,000 images.
    split = campaign("prepare_full", dry=False)
    assert split.returncode == 0, split.stderr[-3000:]
    assert sorted(p.name for p in campaign.parts.iterdir()) == ["part1.npz"] and "in 1 parts" in split.stdout
    for path in campaign.parts.iterdir():
        path.unlink()
    refused = campaign("prepare_full", "--parts=0", dry=False)
    assert refused.returncode == 2 and "--parts must be at least 1. Received: 0" in refused.stderr
    assert not list(campaign.parts.iterdir())
    split = campaign("prepare_full", "--parts=3", dry=False)
    assert split.returncode == 0, split.stderr[-3000:]
    parts = campaign.parts
    assert sorted(p.name for p in parts.iterdir()) == ["part1.npz", "part2.npz", "part3.npz"]
    # `full` refuses to start without all of them, naming what is missing.
    (parts / "part2.npz").rename(tmp_path / "part2.npz")
    missing = campaign("full", out=tmp_path / "missing")
    assert missing.returncode == 1 and "missing [2]" in missing.stdout
    (tmp_path / "part2.npz").rename(parts / "part2.npz")
    run_stages(campaign, "receive", "full")
    joined = np.load(campaign.out / "runs" / "cifar10_full" / "train.npz")
    with np.load(os.path.join(campaign.data_dir, "train.npz")) as original:
        np.testing.assert_array_equal(joined["x"], original["x"])
        np.testing.assert_array_equal(joined["y"], original["y"])
    runs = records(campaign.out)
    assert len(runs) == 2 and {r["status"] for r in runs} == {"completed"}
    assert {r["model"] for r in runs} == {"resnet9", "airbench"}
    assert all(r["flags"]["train_size"] == 1000 and r["flags"]["epochs"] in (9.9, 10.0) for r in runs)
    assert archives(campaign.out) == ["full_cifar10.tar.gz"]


def _script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_campaign", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_full_cifar10_is_cut_into_as_few_parts_as_fit_beside_the_tree():
    script = _script()
    mib = 2**20
    full = 50000 * 3072 + 50000  # CIFAR-10's training images and labels
    # 64 MiB a call, 2 MiB of margin: a tree of 8.2 MiB leaves 53.8 MiB a part.
    assert script.parts_needed(full, int(8.2 * mib)) == 3
    assert script.parts_needed(full, 20 * mib) == 4
    assert script.parts_needed(1000, 0) == 1
    with pytest.raises(ValueError, match=r"working tree \(62.5 MiB\) leaves no room"):
        script.parts_needed(full, int(62.5 * mib))
    # The tree that travels: git's tracked and not-ignored files, not .device or .device_full.
    tree = script.travelling_bytes()
    assert 0 < tree < script.CALL_LIMIT


def test_prepare_full_refuses_too_few_parts_and_writes_nothing(tmp_path, monkeypatch, cifar10_slice_dir):
    script = _script()
    # A working tree of 60 MiB leaves 2 MiB a call: the slice's 3.07 MB need 2 parts.
    monkeypatch.setattr(script, "travelling_bytes", lambda: 60 * 2**20)
    with pytest.raises(ValueError, match=r"--parts=1 leaves parts too large .* at least 2 are needed"):
        script.prepare_full(cifar10_slice_dir, str(tmp_path / "parts"), parts=1)
    assert not (tmp_path / "parts").exists()
    assert script.prepare_full(cifar10_slice_dir, str(tmp_path / "parts")) == 0
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == ["part1.npz", "part2.npz"]
