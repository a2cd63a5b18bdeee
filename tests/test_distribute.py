import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from conftest import REPO

HELPER = os.path.join(REPO, "tests", "data_parallel_step.py")


def _env():
    env = dict(os.environ, PYTHONPATH=REPO, KERAS_BACKEND=keras.backend.backend())
    if keras.backend.backend() == "jax":
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    return env


def _run(*args):
    result = subprocess.run([sys.executable, *args], env=_env(), capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_device_data_parallel_steps_equal_one_device_steps(tmp_path):
    """Two devices with one execution across the epoch end (each replica restarts its
    share of the metrics) against one device with one execution an epoch: the same
    per-epoch losses, weights and averages."""
    one, two = tmp_path / "one.npz", tmp_path / "two.npz"
    _run(HELPER, "1", str(one), "nospan")
    out = _run(HELPER, "2", str(two))
    assert "devices 2 replicas 2" in out.stdout
    a, b = np.load(one), np.load(two)
    assert sorted(a.files) == sorted(b.files) and len(a.files) == 9  # loss, 4 weights, their 4 averages
    for name in a.files:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # Two steps moved the weights and their averages: the comparison is not of initial values.
    assert a["loss"][1] < a["loss"][0]
    assert not np.allclose(a["arr_4"], a["arr_0"])  # the conv kernel's average lags the kernel


def test_two_device_ensemble_steps_equal_one_device_steps(tmp_path):
    """Each replica takes its share of every member's batch (TensorFlow), or the sharded
    program the whole (JAX): the members' weights and averages as on one device."""
    one, two = tmp_path / "one.npz", tmp_path / "two.npz"
    _run(HELPER, "1", str(one), "ensemble")
    out = _run(HELPER, "2", str(two), "ensemble")
    assert "devices 2 replicas 2" in out.stdout
    a, b = np.load(one), np.load(two)
    assert len(a.files) == 17  # loss, 2 x 4 weights, their 8 averages
    for name in a.files:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert a["loss"][1] < a["loss"][0]
    assert not np.allclose(a["arr_0"][..., :1], a["arr_4"][..., :1], atol=1e-3)  # the members differ


def test_batch_norm_statistics_per_replica_on_tensorflow_global_on_jax(tmp_path):
    one, two = tmp_path / "one.npz", tmp_path / "two.npz"
    _run(HELPER, "1", str(one), "batchnorm")
    _run(HELPER, "2", str(two), "batchnorm")
    a, b = np.load(one), np.load(two)
    same = all(np.allclose(a[n], b[n], rtol=1e-5, atol=1e-6) for n in a.files)
    # MirroredStrategy normalizes each replica's half batch; JAX's sharded program the whole batch.
    assert same == (keras.backend.backend() == "jax")


@pytest.mark.e2e
def test_train_data_parallel_end_to_end_on_two_devices(tmp_path, cifar10_slice_dir):
    code = (
        "import os, sys\n"
        "if os.environ['KERAS_BACKEND'] == 'tensorflow':\n"
        "    import tensorflow as tf\n"
        "    cpu = tf.config.list_physical_devices('CPU')[0]\n"
        "    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)\n"
        "from haet.training import TrainConfig, train\n"
        f"config = TrainConfig(budget_seconds=600, data_dir={str(cifar10_slice_dir)!r}, train_size=100, "
        "model='resnet9', width_multiplier=0.125, ghost_batch_splits=2, batch_size=20, optimizer='sgd', "
        "lr_schedule='linear', lr_schedule_unit='steps', learning_rate=0.05, warmup=0.2, "
        "lr_scaling_reference_batch=10, epochs=2, augmentation='crop_flip_cutout', "
        "input_normalization='channel_standardize', eval_batch_size=250, save_model=False, data_parallel=True)\n"
        f"record, _ = train(config, results_dir={str(tmp_path)!r})\n"
        "print('RECORD', __import__('json').dumps(record['data_parallel']), record['steps'], record['test_accuracy'])\n"
    )
    out = _run("-c", code)
    line = next(l for l in out.stdout.splitlines() if l.startswith("RECORD"))
    parallel = json.loads(line.split(" ", 1)[1].rsplit(" ", 2)[0])
    assert parallel["replicas"] == 2
    assert int(line.rsplit(" ", 2)[1]) == 10  # 2 epochs of 100 / 20 steps


def test_data_parallel_refuses_one_device_or_uneven_batches():
    from haet import distribute

    devices = distribute.local_devices()
    if len(devices) >= 2:
        pytest.skip("this process has several devices")
    with pytest.raises(ValueError, match="needs at least 2 devices"):
        with distribute.data_parallel(16):
            pass
