"""The GPU campaign script (scripts/gpu_campaign.py) in its dry mode: the same stages
as on the GPU machine, here under JAX with budgets of seconds."""

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


@pytest.mark.e2e
def test_the_campaign_runs_dry(tmp_path, cifar10_slice_dir):
    if keras.backend.backend() != "jax":
        pytest.skip("the campaign runs under JAX (the GPU machine has no TensorFlow)")
    out = tmp_path / "out"
    script = os.path.join(REPO, "scripts", "gpu_campaign.py")
    env = dict(os.environ, PYTHONPATH=REPO)
    parts = tmp_path / "parts"
    # Full CIFAR-10 travels in parts; `full` refuses to start without all of them.
    split = subprocess.run([sys.executable, script, "prepare_full", f"--data_dir={cifar10_slice_dir}",
                            f"--parts_dir={parts}"], env=env, capture_output=True, text=True)
    assert split.returncode == 0, split.stderr[-3000:]
    assert sorted(p.name for p in parts.iterdir()) == ["part1.npz", "part2.npz", "part3.npz"]
    (parts / "part2.npz").rename(tmp_path / "part2.npz")
    missing = subprocess.run([sys.executable, script, "full", "--dry", f"--out={tmp_path / 'missing'}",
                              f"--data_dir={cifar10_slice_dir}", f"--parts_dir={parts}"], env=env,
                             capture_output=True, text=True)
    assert missing.returncode == 1 and "missing [2]" in missing.stdout
    (tmp_path / "part2.npz").rename(parts / "part2.npz")
    for stage in ("call1", "start600", "collect600", "recipes", "ensembles", "receive", "full"):
        result = subprocess.run([sys.executable, script, stage, "--dry", f"--out={out}",
                                 f"--data_dir={cifar10_slice_dir}", f"--parts_dir={parts}"], env=env,
                                capture_output=True, text=True)
        assert result.returncode == 0, (stage, result.stdout[-3000:], result.stderr[-3000:])
        assert "failures: none" in result.stdout
    joined = np.load(out / "runs" / "cifar10_full" / "train.npz")
    with np.load(os.path.join(cifar10_slice_dir, "train.npz")) as original:
        np.testing.assert_array_equal(joined["x"], original["x"])
        np.testing.assert_array_equal(joined["y"], original["y"])
    rows = json.loads((out / "files" / "bench_resnet9.json").read_text())
    assert rows and rows[0]["images_per_second"] > 0
    records = [json.loads(open(p).read()) for p in glob.glob(str(out / "files" / "*_record.json"))]
    assert len(records) == 6 and {r["status"] for r in records} == {"completed"}
    assert {r["model"] for r in records} == {"resnet9", "tiny_cnn", "airbench", "airbench_ensemble_of_2"}
    assert sum(r["flags"]["train_size"] == 1000 and r["flags"]["epochs"] in (9.9, 10.0) for r in records) == 2
    mechanisms = json.loads((out / "files" / "bench_ensembles.json").read_text())
    assert {(r["members"], r["variant"]) for r in mechanisms} == {
        (2, "separate"), (2, "branches"), (2, "sgd_separate"), (2, "sgd_branches"), (2, "sgd_vmap")}
    # What comes back from the device: one archive a stage (it returns at most 8 files).
    archives = sorted(p.name for p in out.glob("*.tar.gz"))
    assert archives == ["call1.tar.gz", "default600_seed0.tar.gz", "ensembles_seed0.tar.gz", "full_cifar10.tar.gz",
                        "recipes_seed0.tar.gz"]
    with tarfile.open(out / "recipes_seed0.tar.gz") as archive:
        assert any(name.endswith("airbench_haet_15s_seed0.log") for name in archive.getnames())
    command = subprocess.run([sys.executable, script, "command", "call1"], capture_output=True, text=True)
    assert "--no-index" in command.stdout and "KERAS_BACKEND=jax" in command.stdout and "call1 --out=$OUT" in command.stdout
