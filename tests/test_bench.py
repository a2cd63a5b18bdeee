"""The benchmark's arithmetic (FLOPs from the layers, peaks) and one small run of it."""

import pytest

from haet import bench, models, training
from haet.config import TrainConfig


def test_forward_flops_count_convolutions_and_dense_layers():
    # tiny_cnn on 32x32x3: conv 3x3x3->16 at 32x32, conv 3x3x16->32 at 16x16, dense 32->10.
    expected = 2 * (32 * 32 * 27 * 16 + 16 * 16 * 144 * 32 + 32 * 10)
    assert bench.forward_flops(models.tiny_cnn()) == expected == 3_244_672
    wrapped = models.with_input_pipeline(models.tiny_cnn(), [0.5, 0.5, 0.5], variance=[1.0, 1.0, 1.0])
    assert bench.forward_flops(wrapped) == expected  # the nested backbone is counted


def test_peaks_of_known_gpus_only():
    assert bench.peak_tflops({"platform": "gpu", "name": "NVIDIA H100 80GB HBM3"}) == 989.4
    assert bench.peak_tflops({"platform": "gpu", "name": "NVIDIA H100 PCIe"}) == 756.0
    assert bench.peak_tflops({"platform": "gpu", "name": "Tesla V100-SXM2-16GB"}) == 125.0
    assert bench.peak_tflops({"platform": "gpu", "name": "Some Future GPU"}) is None
    assert bench.peak_tflops({"platform": "cpu", "name": "NVIDIA H100"}) is None


@pytest.mark.e2e
def test_bench_rows_of_a_tiny_recipe():
    config = TrainConfig(model="tiny_cnn", width_multiplier=0.5, train_size=200, augmentation="none",
                         optimizer="sgd", lr_schedule="constant", learning_rate=0.05,
                         input_normalization="channel_standardize")
    rows = bench.bench(config, [8], [1, 4], bench_steps=3, end_to_end_budget=3.0, keras_fit=True, test_images=20)
    assert [(r["batch_size"], r["steps_per_execution"]) for r in rows] == [(8, 1), (8, 4)]
    for r in rows:
        assert r["images_per_second"] == pytest.approx(8 / (r["step_ms"] / 1e3), rel=1e-3)
        assert r["end_to_end_ratio"] == pytest.approx(r["images_per_second"] / r["end_to_end_images_per_second"],
                                                      rel=1e-3)
        assert r["flops_per_image"] == bench.forward_flops(models.tiny_cnn(width_multiplier=0.5))
        assert r["peak_fraction"] is None and r["keras_fit_images_per_second"] > 0
        assert r["execution_loop"] in ("dispatch", "fused", "tf.function") and r["end_to_end_steps"] >= 1
    assert "end_to_end_ratio" in bench.format_table(rows)


def test_unusable_data_is_a_setup_error_before_any_work(tmp_path):
    config = TrainConfig(model="tiny_cnn", train_size=200, data_dir=str(tmp_path / "missing"))
    with pytest.raises(training.SetupError, match="is not a folder"):
        bench.bench(config, [8], [1], bench_steps=3, end_to_end_budget=0)


def test_a_steps_per_execution_too_large_for_a_batch_size_is_refused_before_any_measurement(monkeypatch):
    """200 images are 25 steps an epoch at batch 8 and 12 at batch 16: 20,000 steps an
    execution stay within the engine's 1024 epochs at batch 8, not at batch 16. Before,
    batch 8 was measured first and batch 16's end-to-end run refused it."""
    def measured(*args, **kwargs):
        raise AssertionError("a model was compiled before the settings were checked")

    monkeypatch.setattr(bench, "compiled_model", measured)
    config = TrainConfig(model="tiny_cnn", train_size=200)
    with pytest.raises(training.SetupError, match=r"steps_per_execution=20000 would let one execution reach "
                                                  r"\d+ epochs of 12 steps.*steps_per_execution <= 12277"):
        bench.bench(config, [8, 16], [1, 20000], bench_steps=3, end_to_end_budget=3.0, test_images=20)


def test_the_epoch_boundary_benchmark_times_each_boundary_and_leaves_the_engine_going():
    """scripts/bench_epoch_boundary.py on a tiny engine: one time per boundary after the
    first eighth, each positive; the engine went through every epoch, with the metrics
    of each reset (a 1-step epoch's running mean is that step's loss)."""
    import importlib.util
    import os

    import keras
    import numpy as np

    from conftest import REPO
    from haet.engine import make_engine

    spec = importlib.util.spec_from_file_location("bench_epoch_boundary",
                                                  os.path.join(REPO, "scripts", "bench_epoch_boundary.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (32, 32, 32, 3)).astype("uint8"), rng.integers(0, 10, 32).astype("int32")
    model = models.with_input_pipeline(models.tiny_cnn(width_multiplier=0.25), [0.5] * 3, variance=[0.06] * 3)
    model.compile(keras.optimizers.SGD(0.0), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=True)
    engine = make_engine(model, x, y, 8)
    ms = module.epoch_boundary_milliseconds(engine, 16)
    assert ms.shape == (14,) and np.all(ms > 0)
    assert engine.epoch == 16 and engine.step_in_epoch == 0 and engine.epoch_metrics() == {}
    # A learning rate of 0: epoch 16 started again gives its first step's loss alone,
    # not averaged with the steps before the restart.
    losses = [float(engine.run(1)[0]) for _ in range(2)]
    engine.start_epoch(16)
    assert float(engine.run(1)[0]) == pytest.approx(losses[0], rel=1e-5) and losses[1] != losses[0]


@pytest.mark.e2e
def test_the_command_line_checks_the_batch_sizes_it_measures(tmp_path):
    """`--batch_sizes` replaces `--batch_size`: a flagfile's batch 512 was checked against
    200 images and refused, though only batch 8 was to be measured. The measured ones are
    checked, each before any work."""
    from conftest import run_tool_cases

    common = ["--model=tiny_cnn", "--width_multiplier=0.5", "--train_size=200", "--batch_size=512"]
    bads = ((["--batch_sizes=8", f"--init_from={tmp_path / 'missing.keras'}"], "missing.keras' is not a file"),
            (["--batch_sizes=8,300"], "--batch_sizes=8,300 has batch sizes larger than --train_size=200: measure "
                                      "batch sizes of at most 200"),
            (["--batch_sizes=8,0"], "--batch_sizes takes positive integers"))
    for (args, message), refused in zip(bads, run_tool_cases("haet.bench", [[*common, *a] for a, _ in bads])):
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
        assert "haet.bench: error: " in refused.stderr and message in refused.stderr, refused.stderr[-3000:]
        assert "batch_size=512" not in refused.stderr


def test_an_end_to_end_run_that_diverged_or_was_stopped_is_not_measured(monkeypatch):
    """The end-to-end records were read whatever their status: a diverged run's 2 steps
    gave a throughput, and a run a signal interrupted gave a row of a cut-short run, after
    which the benchmark went on to the next setting."""
    def fake_train(statuses):
        def train(config, results_dir, resume_hint=None):
            assert resume_hint == "the benchmark stops (its runs are not kept)"
            status, signal_name = statuses.pop(0)
            return {"status": status, "interrupted_by": signal_name if status == "interrupted" else None,
                    "signal_after_training": signal_name if status != "interrupted" else None,
                    "images_per_second_after_compile": 100.0, "execution_loop": "dispatch", "steps": 2}, results_dir
        return train

    config = TrainConfig(model="tiny_cnn", width_multiplier=0.5, train_size=200, augmentation="none",
                         optimizer="sgd", lr_schedule="constant", learning_rate=0.05)
    monkeypatch.setattr(training, "train", fake_train([("completed", None), ("diverged", None), ("completed", None)]))
    rows = bench.bench(config, [8], [1, 2, 4], bench_steps=3, end_to_end_budget=3.0, test_images=20)
    assert [r["end_to_end_status"] for r in rows] == ["completed", "diverged", "completed"]
    assert [r["end_to_end_images_per_second"] for r in rows] == [100.0, None, 100.0]
    assert rows[1]["end_to_end_ratio"] is None and rows[1]["host_overhead_us_per_step"] is None

    monkeypatch.setattr(training, "train", fake_train([("completed", None), ("interrupted", "SIGTERM")]))
    with pytest.raises(bench.BenchInterrupted, match="stopped by SIGTERM after 1 measured settings") as stopped:
        bench.bench(config, [8], [1, 2, 4], bench_steps=3, end_to_end_budget=3.0, test_images=20)
    assert [r["steps_per_execution"] for r in stopped.value.rows] == [1]
    # A signal after a run's training ended: its setting is measured, then the benchmark stops.
    monkeypatch.setattr(training, "train", fake_train([("completed", None), ("completed", "SIGINT")]))
    with pytest.raises(bench.BenchInterrupted, match="stopped by SIGINT after 2 measured settings") as stopped:
        bench.bench(config, [8], [1, 2, 4], bench_steps=3, end_to_end_budget=3.0, test_images=20)
    assert [r["end_to_end_status"] for r in stopped.value.rows] == ["completed", "completed"]
    assert stopped.value.signal_name == "SIGINT"
