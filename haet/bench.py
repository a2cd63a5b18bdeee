"""Throughput of a recipe's training step, and how much of it the real training path keeps.

    python -m haet.bench --flagfile=flags/page_resnet9.flags --width_multiplier=0.25 \\
        --batch_sizes=128 --json=results/bench/resnet9.json
    KERAS_BACKEND=jax python -m haet.bench --model=tiny_cnn --batch_sizes=32 \\
        --steps_per_execution=1 --steps_per_executions=1,4,16,64 --keras_fit

Takes every training flag (`--flagfile` recipes work) and, for each batch size and
each steps-per-execution value, prints and writes (`--json`, a list of rows):

- `flops_per_image`: forward FLOPs of one image, from the layers (2 x multiply-adds
  of every convolution and dense layer; normalization, activations and the
  augmentation are not counted); a training step counts 3x;
- with `--ensemble_members=N`, images count once per member that trains on them (a
  step is N x `batch_size` images) and FLOPs are one member's;
- `step_ms`, `images_per_second`: the compiled training step alone (Keras'
  `train_step` of the model, augmentation included, `--bench_steps` steps on one
  batch held on the device with no host work between them, see `pure_step`;
  compilation excluded);
- `compile_seconds`: tracing and compiling that step (under JAX, both of the
  variants `pure_step` times);
- `tflops` and `peak_fraction` (against `PEAK_TFLOPS`, dense bf16/fp16 of known
  GPUs; null on a CPU or an unknown device);
- `end_to_end_images_per_second`: the same model trained by the real
  `haet.training.train` path for `--end_to_end_budget` seconds in the same
  process (the record's `images_per_second_after_compile`: trained images over
  the budget's seconds without compilation or the planner's probe), and
  `end_to_end_ratio` = `images_per_second` / that (the end-to-end step time over the
  pure step's); `end_to_end_status`: the run's status (a diverged run's figures
  are null);
- `host_overhead_us_per_step`: end-to-end step time minus the pure step's, in
  microseconds;
- with `--keras_fit`, `keras_fit_images_per_second`: `model.fit` fed NumPy batches by
  a one-worker `PyDataset` with a callback that reads the clock at each batch end
  (the loop haet had before its engine), after its first epoch.

Training data: `--data_dir` as `haet.train` reads it, or (unset) random uint8
images of the dataset's shape. Only `--bench_test_images` test images are scored
after each end-to-end run (the score is not the point).

Ctrl-C or SIGTERM stops it (in an end-to-end run too, and after one whose training
ended): the settings measured before are printed and written, then it ends by the
signal (`haet.cli.exit_by_signal`: a shell reports 130 or 143).
"""

import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import time

import keras
import numpy as np
from absl import app, flags, logging

from haet import config as config_lib
from haet import data as data_lib
from haet import cli, engine, training

# Dense (no sparsity) bf16/fp16 tensor-core peaks in TFLOP/s, from NVIDIA's data
# sheets; matched in this order against the device name.
PEAK_TFLOPS = (
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM, "NVIDIA H100 80GB HBM3"
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("RTX 4090", 165.2),
    ("V100", 125.0),
    ("T4", 65.0),
)


def peak_tflops(device):
    """The dense bf16/fp16 peak of `device` (`haet.device.describe_device()`), or None."""
    if device.get("platform") != "gpu":
        return None
    name = device.get("name") or ""
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def forward_flops(model):
    """Forward FLOPs of one example through `model`: 2 x the multiply-adds of its
    convolutions and dense layers (nested models included); other layers are not
    counted."""
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            total += forward_flops(layer)
        elif isinstance(layer, keras.layers.Conv2D):
            kernel_h, kernel_w, channels_in, channels_out = layer.kernel.shape
            out_h, out_w = layer.output.shape[1:3]
            total += 2 * out_h * out_w * kernel_h * kernel_w * channels_in * channels_out // layer.groups
        elif isinstance(layer, keras.layers.Dense):
            units_in, units_out = layer.kernel.shape
            positions = math.prod(layer.output.shape[1:-1]) if len(layer.output.shape) > 2 else 1
            total += 2 * positions * units_in * units_out
    return int(total)


def compiled_model(config, data, settings, source=None):
    """The model of `config` built and compiled as `haet.train` does, on `data`
    (`haet.training.prepare_data`) under `settings` (`haet.training.settings_of`;
    `source`: the `--init_from` model, already loaded, or None):
    `(model, augmentation layer or None, learning-rate schedule)`."""
    model, augmentation, _ = training.build_model(config, data, source)
    optimizer, schedule = training.build_optimizer(config, data.steps_per_epoch(config))
    training.compile_model(config, model, optimizer, settings)
    return model, augmentation, schedule


def first_batch(data, config):
    """A training step's batch: `batch_size` rows for each ensemble member, member after
    member (the members take consecutive images)."""
    one_hot = data.info.num_classes if config.label_smoothing else None
    rows = np.arange(config.batch_size * config.ensemble_members) % len(data.y_fit)
    x = data.x_fit[rows]
    y = data.y_fit[rows]
    return x, (data_lib.one_hot(y, one_hot) if one_hot else y)


def pure_step(model, x, y, steps, jax_loops=("fused", "dispatch")):
    """Times `steps` training steps of the compiled model on one batch held on the
    device, with no host work between them: under JAX the faster of one compiled
    loop over the steps and back-to-back dispatches of the compiled step (XLA on the
    CPU runs a loop's body several times slower; `jax_loops` names the ones to time);
    under TensorFlow a `tf.function` loop over the XLA-compiled step.

    Returns:
        `(seconds per step, compile seconds, {variant: seconds per step})`: the best
        of three timed runs after a first one that compiles (its excess over a timed
        run is the compile time), for the faster variant and for each.
    """
    backend = keras.backend.backend()
    model._symbolic_build(data_batch=(x, y))
    if backend == "jax":
        import jax

        def loop(state, batch, n):
            return jax.lax.fori_loop(0, n, lambda _, state: model.train_step(state, batch)[1], state)

        fused = jax.jit(loop, static_argnums=2, donate_argnums=0)
        one = jax.jit(lambda state, batch: model.train_step(state, batch)[1], donate_argnums=0)
        state = tuple([v.value for v in variables] for variables in (
            model.trainable_variables, model.non_trainable_variables, model.optimizer.variables,
            model.metrics_variables))
        batch = jax.device_put((x, y))

        def run_fused():
            nonlocal state
            state = fused(state, batch, steps)
            jax.block_until_ready(state)

        def run_dispatched():
            nonlocal state
            for _ in range(steps):
                state = one(state, batch)
            jax.block_until_ready(state)

        runs = {name: run for name, run in (("fused", run_fused), ("dispatch", run_dispatched)) if name in jax_loops}
    elif backend == "tensorflow":
        import tensorflow as tf

        step = tf.function(lambda batch: model.train_step(batch)["loss"], jit_compile=True)

        @tf.function
        def loop(batch):
            loss = tf.constant(0.0)
            for _ in tf.range(steps):
                loss = tf.cast(step(batch), tf.float32)
            return loss

        batch = (tf.constant(x), tf.constant(y))
        runs = {"tf.function": lambda: loop(batch).numpy()}
    else:
        raise NotImplementedError(f"haet benchmarks the jax and tensorflow backends, not {backend!r}.")
    per_variant, compile_seconds = {}, 0.0
    for name, run in runs.items():
        seconds, compiling = best_of(run)
        compile_seconds += compiling
        per_variant[name] = seconds / steps
    return min(per_variant.values()), compile_seconds, per_variant


def best_of(run, repeats=3):
    """Times `run()` (which must wait for the device): `(best seconds of `repeats` timed
    calls, compile seconds)`, after a first call whose excess over the best is the
    compilation."""
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times), max(0.0, first - min(times))


def keras_fit_images_per_second(model, x, y, batch_size, steps, seed=0):
    """Images per second of `model.fit` fed host NumPy batches (a one-worker
    `keras.utils.PyDataset` drawing a permutation per epoch) with a callback that
    reads the clock at each batch's start and end (so Keras waits for every step),
    over epochs of `steps` steps after a first epoch that compiles: haet's loop
    before its engine."""

    class Batches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=1, use_multiprocessing=False, max_queue_size=16)
            self.rng = np.random.default_rng(seed)
            self.order = self.rng.permutation(len(x))

        def __len__(self):
            return steps

        def __getitem__(self, index):
            batch = self.order[(index * batch_size) % (len(x) - batch_size + 1):][:batch_size]
            return x[batch], y[batch]

        def on_epoch_end(self):
            self.order = self.rng.permutation(len(x))

    class Clock(keras.callbacks.Callback):
        # Batch hooks that are not async_safe: Keras converts each step's logs to host
        # values first, as it did for haet's budget callback, which read the clock here.
        def __init__(self):
            super().__init__()
            self.epoch_seconds = []

        def on_train_batch_begin(self, batch, logs=None):
            time.perf_counter()

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.epoch_seconds.append(time.perf_counter() - self._start)

    clock = Clock()
    model.fit(Batches(), epochs=3, shuffle=False, verbose=0, callbacks=[clock])
    return steps * batch_size / statistics.fmean(clock.epoch_seconds[1:])


def prepare_data_dir(config, folder, test_images):
    """Writes the training data of `config` into `folder` (train.npz, test.npz): its
    `--data_dir` subset with only `test_images` test images, or random uint8 images of
    the dataset's shape without a data_dir."""
    if config.data_dir:
        _small_test_split(config, folder, test_images)
    else:
        _random_data_dir(config, folder, test_images)


def _random_data_dir(config, folder, test_images):
    info = data_lib.dataset_info(config.dataset, config.data_dir)
    rng = np.random.default_rng(0)
    n = config.train_size
    labels = np.arange(n) % info.num_classes
    np.savez(os.path.join(folder, "train.npz"), x=rng.integers(0, 256, (n, *info.image_shape), dtype=np.uint8),
             y=labels.astype(np.uint8))
    np.savez(os.path.join(folder, "test.npz"),
             x=rng.integers(0, 256, (test_images, *info.image_shape), dtype=np.uint8),
             y=(np.arange(test_images) % info.num_classes).astype(np.uint8))


def _small_test_split(config, folder, test_images):
    dataset = data_lib.load_dataset(config.dataset, config.data_dir)
    indices = data_lib.stratified_subset(dataset.y_train, config.train_size, dataset.info.num_classes,
                                         config.subset_seed)
    np.savez(os.path.join(folder, "train.npz"), x=dataset.x_train[indices], y=dataset.y_train[indices])
    np.savez(os.path.join(folder, "test.npz"), x=dataset.x_test[:test_images], y=dataset.y_test[:test_images])


def bench(config, batch_sizes, steps_per_executions, bench_steps=20, end_to_end_budget=30.0, keras_fit=False,
          test_images=100, source=None):
    """Benchmark rows (dicts, see the module docstring) of `config` at each batch size
    and steps per execution (`source`: the `--init_from` model, already loaded, for
    the measured steps; the end-to-end runs load it as a run does).

    Raises:
        ValueError: a batch size or steps-per-execution value the config cannot take.
        training.SetupError (a ValueError): data that cannot be loaded, or a
            steps-per-execution value too large for a batch size's end-to-end run
            (`haet.engine.check_steps_per_execution`), before any work.
    """
    rows = []
    try:
        with tempfile.TemporaryDirectory() as folder:
            _measure(config, batch_sizes, steps_per_executions, bench_steps, end_to_end_budget, keras_fit,
                     test_images, source, folder, rows)
    except BenchInterrupted:
        raise
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM (`haet.cli.Terminated`) while measuring
        raise BenchInterrupted(rows, getattr(e, "signal_name", None) or "SIGINT") from None
    return rows


class BenchInterrupted(KeyboardInterrupt):
    """A stop signal stopped the benchmark (`signal_name`); `rows`: the settings
    measured before it."""

    def __init__(self, rows, signal_name):
        super().__init__(f"stopped by {signal_name} after {len(rows)} measured settings")
        self.rows, self.signal_name = rows, signal_name


def _measure(config, batch_sizes, steps_per_executions, bench_steps, end_to_end_budget, keras_fit, test_images,
             source, folder, rows):
    """`bench`'s work in the temporary `folder`, each setting's row appended to `rows`."""
    data_dir = os.path.join(folder, "data")
    os.makedirs(data_dir)
    try:
        prepare_data_dir(config, data_dir, test_images)
    except (ValueError, RuntimeError) as e:  # RuntimeError: no local copy of the data
        raise training.SetupError(str(e)) from None
    base = dataclasses.replace(config, data_dir=data_dir, classes=(), save_model=False, evaluate_test=True,
                               validation_size=0, budget_seconds=end_to_end_budget or config.budget_seconds)
    # Loaded once: the batch size and steps per execution change neither the subset
    # nor the split. Every end-to-end setting is checked here, before the first
    # measurement (a steps_per_execution too large for a batch size was refused
    # only by its end-to-end run, after the measurements before it).
    try:
        data = training.prepare_data(dataclasses.replace(base, steps_per_execution=1))
        for batch_size in batch_sizes if end_to_end_budget else ():
            for k in steps_per_executions:
                engine.check_steps_per_execution(k, len(data.y_fit) // batch_size, len(data.y_fit),
                                                 base.span_epochs)
    except (ValueError, RuntimeError) as e:
        raise training.SetupError(str(e)) from None
    for batch_size in batch_sizes:
        sized = dataclasses.replace(base, batch_size=batch_size)
        with training.settings_of(sized) as settings:
            model, _, _ = compiled_model(sized, data, settings, source)
            x, y = first_batch(data, sized)
            step_seconds, compile_seconds, variants = pure_step(model, x, y, bench_steps)
            flops = forward_flops(model)
            fit_rate = None
            if keras_fit and len(x) > len(data.y_fit):
                logging.warning("--keras_fit skipped: a step of %d images (all members) exceeds the %d training "
                                "images", len(x), len(data.y_fit))
            elif keras_fit:
                fit_model, _, _ = compiled_model(sized, data, settings, source)
                labels = (data_lib.one_hot(data.y_fit, data.info.num_classes) if sized.label_smoothing
                          else data.y_fit)
                fit_rate = keras_fit_images_per_second(fit_model, data.x_fit, labels, len(x), bench_steps)
        # Of an ensemble: images through a member (N a step), FLOPs of one member's image.
        members = sized.ensemble_members
        flops //= members
        images_per_second = len(x) / step_seconds
        peak = peak_tflops(settings.device)
        tflops = 3 * flops * images_per_second / 1e12
        for k in steps_per_executions:
            row = {
                "model": model.name, "batch_size": batch_size, "ensemble_members": members,
                "precision": settings.precision,
                "backend": keras.backend.backend(), "device": settings.device["name"],
                "flops_per_image": flops, "step_ms": round(1e3 * step_seconds, 4),
                "images_per_second": round(images_per_second, 2), "compile_seconds": round(compile_seconds, 3),
                "tflops": round(tflops, 4), "peak_fraction": round(tflops / peak, 4) if peak else None,
                "pure_step_ms_by_loop": {name: round(1e3 * v, 4) for name, v in variants.items()},
                "steps_per_execution": k, "execution_loop": None, "end_to_end_images_per_second": None, "end_to_end_ratio": None,
                "host_overhead_us_per_step": None, "keras_fit_images_per_second":
                    round(fit_rate, 2) if fit_rate else None,
                "keras_fit_host_overhead_us_per_step":
                    round(1e6 * (len(x) / fit_rate - step_seconds), 1) if fit_rate else None,
            }
            signalled = None
            if end_to_end_budget:
                run_config = dataclasses.replace(sized, steps_per_execution=k)
                record, _ = training.train(run_config, results_dir=os.path.join(folder, "runs"),
                                           resume_hint="the benchmark stops (its runs are not kept)")
                if record["status"] == "interrupted":  # (train answered the signal: this setting is not measured)
                    raise BenchInterrupted(rows, record.get("interrupted_by") or "SIGINT")
                signalled = record.get("signal_after_training")
                # A diverged run's throughput is of steps that computed nothing: not a measurement.
                rate = record["images_per_second_after_compile"] if record["status"] == "completed" else None
                row.update(execution_loop=record["execution_loop"], end_to_end_status=record["status"],
                           end_to_end_images_per_second=rate,
                           end_to_end_ratio=round(images_per_second / rate, 4)
                           if rate else None, end_to_end_steps=record["steps"],
                           host_overhead_us_per_step=round(1e6 * (len(x) / rate - step_seconds), 1)
                           if rate else None)
            logging.info("%s", row)
            rows.append(row)
            if signalled:  # after the run's training ended: its row is measured, and the benchmark stops
                raise BenchInterrupted(rows, signalled)


def format_table(rows):
    """The rows as a fixed-width text table."""
    columns = ("model", "batch_size", "precision", "backend", "steps_per_execution", "execution_loop", "step_ms",
               "images_per_second",
               "end_to_end_images_per_second", "end_to_end_ratio", "host_overhead_us_per_step",
               "keras_fit_images_per_second", "keras_fit_host_overhead_us_per_step", "tflops", "peak_fraction",
               "compile_seconds")
    lines = [list(columns)] + [["-" if row.get(c) is None else str(row[c]) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in lines)


config_lib.define_flags()
flags.DEFINE_list("batch_sizes", [], "Batch sizes to measure (default: --batch_size).")
flags.DEFINE_list("steps_per_executions", [], "Steps per execution of the end-to-end runs (default: "
                  "--steps_per_execution).")
flags.DEFINE_integer("bench_steps", 20, "Training steps per timed loop of the pure step (and per epoch of the "
                     "keras_fit baseline).", lower_bound=1)
flags.DEFINE_float("end_to_end_budget", 30.0, "Seconds of each end-to-end training run; 0: skip them.",
                   lower_bound=0.0)
flags.DEFINE_bool("keras_fit", False, "Also measure model.fit fed NumPy batches (haet's loop before its engine).")
flags.DEFINE_integer("bench_test_images", 100, "Test images scored after each end-to-end run.", lower_bound=1)
flags.register_validator("end_to_end_budget", math.isfinite, "--end_to_end_budget must be a finite number of "
                         "seconds (0: skip the end-to-end runs).")
flags.DEFINE_string("json", None, "Write the rows here (a JSON list); an existing file is not overwritten.")


def check_json_flag():
    """Refuses (`app.UsageError`, exit status 2 under `haet.cli.run`, which refuses
    arguments other than flags) a `--json` file that exists or cannot be made, before
    any work: for the benchmark command lines (this one and scripts/)."""
    from haet import results

    if flags.FLAGS.json is not None:
        try:
            results.check_new_file(flags.FLAGS.json, "--json")
        except ValueError as e:
            raise app.UsageError(str(e)) from None


def positive_integers(texts, flag):
    """The positive integers of a list flag's `texts`.

    Raises:
        ValueError: naming the flag and the bad entry.
    """
    values = []
    for text in texts:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < 1:
            raise ValueError(f"{flag} takes positive integers, comma-separated. Received: {text!r}")
        values.append(value)
    return values


def main(argv):
    del argv  # (haet.cli.run refuses arguments other than flags)
    check_json_flag()
    f = flags.FLAGS
    try:
        batch_sizes = positive_integers(f.batch_sizes, "--batch_sizes") or [f.batch_size]
        ks = positive_integers(f.steps_per_executions, "--steps_per_executions") or [f.steps_per_execution]
        # Checked with the first of the measured settings: --batch_size (a flagfile's 512, say)
        # is not measured when --batch_sizes is given, and was refused with fewer images.
        if f.batch_sizes and 0 < f.train_size < max(batch_sizes):  # (a bad --train_size: refused below)
            raise ValueError(f"--batch_sizes={','.join(map(str, batch_sizes))} has batch sizes larger than "
                             f"--train_size={f.train_size}: measure batch sizes of at most {f.train_size}, or pass a "
                             "larger --train_size.")
        config = config_lib.config_from_flags(f, batch_size=batch_sizes[0], steps_per_execution=ks[0])
        config_lib.warn_ignored_settings(config)
        for b in batch_sizes:  # each setting is checked before any work
            for k in ks:
                dataclasses.replace(config, batch_size=b, steps_per_execution=k)
        source = training.load_init_from(config)  # a damaged --init_from
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    interrupted = None
    try:
        rows = bench(config, batch_sizes, ks, f.bench_steps, f.end_to_end_budget, f.keras_fit, f.bench_test_images,
                     source)
    except training.SetupError as e:
        raise app.UsageError(str(e)) from None
    except BenchInterrupted as e:  # the settings measured before it are printed and written
        rows, interrupted = e.rows, e
    print(format_table(rows), flush=True)
    if f.json and rows:
        try:
            with cli.StopSignalsHeld(f"--json={f.json}"):
                write_rows(f.json, rows)
        except OSError as e:
            cli.not_written(f"--json={f.json}", e)
    if interrupted is not None:
        print(f"{interrupted} (of {len(batch_sizes) * len(ks)})", file=sys.stderr)
        cli.exit_by_signal(interrupted.signal_name)


def write_rows(path, rows):
    """Writes benchmark `rows` to the new file `path` (a JSON list), each with the git
    commit, versions and command line.

    Raises:
        FileExistsError: `path` exists (nothing is overwritten).
        OSError: it could not be written (nothing is left at `path`).
    """
    from haet import results

    results.make_parents(path)
    payload = [{**row, "git_commit": results.git_commit(), "versions": results.versions(), "command": sys.argv}
               for row in rows]
    results.write_new_text(path, json.dumps(payload, indent=2))  # whole or none: no empty file refuses the rerun
    print(f"wrote {path}")


if __name__ == "__main__":
    cli.run(main)
