"""Host time of an epoch boundary of the training loop: what the device waits for between
the last execution of one epoch and the first of the next.

    python scripts/bench_epoch_boundary.py --flagfile=flags/airbench94.flags --width_multiplier=0.25 \\
        --json=results/bench/epoch_boundary.json
    KERAS_BACKEND=jax python scripts/bench_epoch_boundary.py --model=tiny_cnn --execution_loop=fused

Takes every training flag (a recipe's flagfile) and builds the recipe's run as
`haet.train` does (`haet.training.build_run`: the model, optimizer and the engine with
its lookahead and moving averages, alternating-flip copies...), on random uint8 images
of the dataset's shape (`--train_size` of them) or `--data_dir`'s.
Each of `--boundaries` epochs runs one 1-step execution, then the engine's share of
the loop's epoch end is timed: `epoch_metrics()`, `sync()`, `reload()` and
`start_epoch()` (the hooks' own work, validation and history rows, is not in it; a
run's record has all of it in `between_executions_seconds`). The first eighth is
dropped (compilation, warm-up).

Row (printed, and written to `--json`, a new file): backend, device, model, the
engine's state variables, execution loop, median / mean / 90th-percentile milliseconds.
"""

import dataclasses
import os
import sys
import tempfile
import time

import keras
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from haet import bench, results, training  # noqa: E402
from haet import config as config_lib  # noqa: E402

flags.DEFINE_integer("boundaries", 200, "Epoch boundaries timed (the first eighth dropped).")


def epoch_boundary_milliseconds(engine, boundaries):
    """Milliseconds of host time of each of `boundaries` epoch boundaries of `engine`
    (see the module docstring), the first eighth dropped: float64 `(boundaries -
    boundaries // 8,)`."""
    engine.start_epoch(0)
    times = []
    for epoch in range(boundaries):
        engine.run(1)
        start = time.perf_counter()
        engine.epoch_metrics()
        engine.sync()
        engine.reload()
        engine.start_epoch(epoch + 1)
        times.append(time.perf_counter() - start)
    return 1e3 * np.asarray(times[boundaries // 8:])


def main(argv):
    del argv  # (haet.cli.run refuses arguments other than flags)
    bench.check_json_flag()
    f = flags.FLAGS
    if f.boundaries < 8:
        raise app.UsageError(f"--boundaries must be at least 8. Received: {f.boundaries}")
    try:
        config = config_lib.config_from_flags(f)
        config_lib.warn_ignored_settings(config)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    with tempfile.TemporaryDirectory() as folder:
        bench.prepare_data_dir(config, folder, 10)
        config = dataclasses.replace(config, data_dir=folder, classes=(), validation_size=0)
        with training.settings_of(config) as settings:
            data = training.prepare_data(config)
            model, augmentation, schedule = bench.compiled_model(config, data, settings)
            run_dir = os.path.join(folder, "run")
            os.makedirs(run_dir)
            engine = training.build_run(config, model, augmentation, schedule, data,
                                        results.RunFolder(run_dir, {})).engine
            ms = epoch_boundary_milliseconds(engine, f.boundaries)
    row = {"backend": keras.backend.backend(), "device": settings.device["name"], "model": model.name,
           "width_multiplier": config.width_multiplier, "batch_size": config.batch_size,
           "state_variables": len(engine.variable_paths()), "execution_loop": engine.loop_kind,
           "boundaries_timed": len(ms), "median_ms": round(float(np.median(ms)), 3),
           "mean_ms": round(float(ms.mean()), 3), "p90_ms": round(float(np.percentile(ms, 90)), 3)}
    print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    if f.json:
        bench.write_rows(f.json, [row])


if __name__ == "__main__":
    from haet import cli

    cli.run(main)
