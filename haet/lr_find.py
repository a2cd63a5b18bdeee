"""Learning-rate range test for any recipe and dataset.

    python -m haet.lr_find --flagfile=flags/page_resnet9.flags --data_dir=../shared/data/cifar10

Smith, "Cyclical Learning Rates for Training Neural Networks" (WACV 2017): train
from the recipe's initial weights while the learning rate grows exponentially from
`--min_learning_rate` to `--max_learning_rate` over `--range_steps` steps (Keras'
`ExponentialDecay` with a rate above 1), recording the training loss of every
step; stop early when the smoothed loss exceeds 4 times its minimum or is not
finite. Suggested learning rate: a tenth of the one at the smoothed loss' minimum
(the usual rule of thumb; the steepest-descent point is recorded too).

Writes a new folder under `--results_dir` (default `results/lr_find`):
`record.json` (status, suggestion, flags, versions, commit), `lr_find.csv` (step,
learning rate, loss, smoothed loss) and `lr_find.png`. Ctrl-C stops the test and
writes the steps measured so far, with no suggestion (status "interrupted"). Exit
status: 0 a suggestion; 1 none (the loss never fell, or was never finite: lower
--min_learning_rate); 2 bad flags or data (nothing written); 4 a file could not be
written (the suggestion was printed first); 130 interrupted.
"""

import dataclasses
import math
import sys

import keras
import numpy as np
from absl import logging

from haet import cli, device, optimizers, results, training
from haet.budget import WallClockBudget
from haet.engine import make_engine
from haet.loop import Hook, Training


class _LossPerStep(Hook):
    """Records each step's own training loss and stops when it diverges.

    The engine reports the running mean of the loss since the epoch began after
    every step; with equal batches, step k's own loss is `k * mean_k - (k - 1) *
    mean_(k-1)`.

    Args:
        learning_rate: function step (0-based) -> the learning rate of that step.
        steps: steps of the test.
        divergence: stop when the smoothed loss exceeds this times its minimum.
        smoothing: the exponential moving average's factor.
        rows: the list the rows are appended to (the caller keeps them if the test is
            interrupted); default a new one.
    """

    def __init__(self, learning_rate, steps, divergence=4.0, smoothing=0.9, rows=None):
        self.learning_rate, self.steps = learning_rate, steps
        self.divergence, self.smoothing = divergence, smoothing
        self.rows, self._smoothed, self._best = [] if rows is None else rows, None, math.inf
        self._epoch_step, self._epoch_mean = 0, 0.0

    def on_epoch_begin(self, run, epoch):
        self._epoch_step, self._epoch_mean = 0, 0.0

    def limit(self, run):
        return self.steps - len(self.rows)

    def after_execution(self, run, steps, losses):
        for mean in losses:
            if self._record(float(mean)):
                run.stop("diverged")
                return
        if len(self.rows) >= self.steps:
            run.stop("steps")

    def _record(self, mean):
        """Adds the step whose running mean is `mean`; True when the test should stop."""
        self._epoch_step += 1
        k = self._epoch_step
        loss = k * mean - (k - 1) * self._epoch_mean
        self._epoch_mean = mean
        step = len(self.rows)
        finite = math.isfinite(loss)
        if finite:
            # Exponential moving average started at the first loss.
            self._smoothed = loss if self._smoothed is None else (
                self.smoothing * self._smoothed + (1 - self.smoothing) * loss)
            smoothed = self._smoothed
            self._best = min(self._best, smoothed)
        else:
            smoothed = math.nan
        self.rows.append({"step": step + 1, "learning_rate": self.learning_rate(step), "loss": loss,
                          "smoothed_loss": smoothed})
        return not finite or smoothed > self.divergence * self._best


def suggest(rows):
    """(suggested learning rate, learning rate at the smoothed minimum, steepest-descent rate).

    Raises:
        ValueError: if no step produced a finite loss, or the smoothed loss was lowest
            at the first step (it never fell: the range starts too high).
    """
    finite = [r for r in rows if math.isfinite(r["smoothed_loss"])]
    if not finite:
        raise ValueError("No finite loss in the range test: lower --min_learning_rate.")
    best = min(finite, key=lambda r: r["smoothed_loss"])
    if best is rows[0] and len(rows) > 1:
        raise ValueError(f"The loss never fell: it was lowest at the first step (learning rate "
                         f"{best['learning_rate']:.3g}), so the test says nothing of a good rate; lower "
                         "--min_learning_rate.")
    upto = [r for r in finite if r["step"] <= best["step"]]
    if len(upto) >= 2:
        log_lr = np.log([r["learning_rate"] for r in upto])
        slopes = np.gradient([r["smoothed_loss"] for r in upto], log_lr)
        steepest = upto[int(np.argmin(slopes))]["learning_rate"]
    else:
        steepest = best["learning_rate"]
    return best["learning_rate"] / 10.0, best["learning_rate"], steepest


def check_range(min_learning_rate, max_learning_rate, steps):
    """Checks the range test's settings.

    Raises:
        ValueError: unless `0 < min_learning_rate < max_learning_rate` (both finite)
            and `steps >= 2`; the message names the flags.
    """
    if not (math.isfinite(min_learning_rate) and math.isfinite(max_learning_rate)
            and 0 < min_learning_rate < max_learning_rate) or steps < 2:
        raise ValueError(
            f"Need 0 < --min_learning_rate < --max_learning_rate (finite) and --range_steps >= 2. Received: "
            f"{min_learning_rate}, {max_learning_rate}, {steps}")


def range_test(config, data, min_learning_rate, max_learning_rate, steps, rows=None, source=None):
    """Runs the range test on the training images of `data` (`haet.training.prepare_data`)
    with the model, loss, precision and engine of a run of `config`.

    Args:
        rows: a list the per-step rows are appended to as they come (so that a caller
            keeps them when the test is interrupted); default a new one.
        source: the `--init_from` model, already loaded (`haet.training.load_init_from`);
            None: `build_model` loads it.

    Returns:
        `(rows, suggestion)`: the per-step rows (dicts step, learning_rate, loss,
        smoothed_loss) and the triple of `suggest`.

    Raises:
        ValueError: the settings `check_range` refuses (before any work), or no
            suggestion (`suggest`) from the rows.
        KeyboardInterrupt: Ctrl-C; `rows` holds the steps measured.
    """
    check_range(min_learning_rate, max_learning_rate, steps)
    rate = (max_learning_rate / min_learning_rate) ** (1 / (steps - 1))
    with training.settings_of(config) as settings:
        model, _, _ = training.build_model(config, data, source)
        schedule = keras.optimizers.schedules.ExponentialDecay(min_learning_rate, decay_steps=1, decay_rate=rate)
        optimizer = optimizers.make_optimizer(config, schedule)
        training.compile_model(config, model, optimizer, settings)
        engine = make_engine(model, data.x_fit, data.y_fit, config.batch_size, seed=config.seed,
                             one_hot_classes=data.info.num_classes if config.label_smoothing else None,
                             steps_per_execution=config.steps_per_execution)
        recorder = _LossPerStep(lambda step: min_learning_rate * rate**step, steps, rows=rows)
        budget = WallClockBudget(math.inf)
        Training(engine, budget, [budget, recorder]).fit()
    return recorder.rows, suggest(recorder.rows)


def plot(rows, suggestion, path, title):
    """Loss and smoothed loss vs learning rate (log scale), the suggestion (None: none)
    marked."""
    from haet.plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
    lrs = [r["learning_rate"] for r in rows]
    ax.plot(lrs, [r["loss"] for r in rows], color="C0", alpha=0.35, label="training loss per step")
    ax.plot(lrs, [r["smoothed_loss"] for r in rows], color="C0", label="smoothed loss")
    if suggestion is not None:
        ax.axvline(suggestion[0], color="C3", ls="--", label=f"suggested {suggestion[0]:.2e} (minimum / 10)")
        ax.axvline(suggestion[1], color="gray", ls=":", label=f"smoothed minimum at {suggestion[1]:.2e}")
    finite = [r["smoothed_loss"] for r in rows if math.isfinite(r["smoothed_loss"])]
    if finite:
        ax.set_ylim(min(finite) * 0.9, min(max(finite), 4 * min(finite)) * 1.1)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv):
    """`python -m haet.lr_find`: checks the flags, the results folder and the data
    before any training (`app.UsageError`, exit status 2), then runs the test."""
    from absl import app, flags

    from haet import train as entry

    del argv  # (haet.cli.run refuses arguments other than flags)
    f = flags.FLAGS
    cli.refuse_unread({"resume": "a range test is not resumed; run it again (--init_from=MODEL to start from a "
                                 "trained model)."})
    commit = results.git_commit()  # the code this process runs
    config = entry.config_from_flags()
    try:
        check_range(f.min_learning_rate, f.max_learning_rate, f.range_steps)
        results.check_results_dir(f.results_dir)
        source = training.load_init_from(config)  # a damaged --init_from, before the data are read
        data = training.prepare_data(config)
    except (ValueError, RuntimeError) as e:  # RuntimeError: no local copy of the data
        raise app.UsageError(str(e)) from None
    rows, status, error, suggestion, stopped = [], "completed", None, None, None
    try:
        rows, suggestion = range_test(config, data, f.min_learning_rate, f.max_learning_rate, f.range_steps, rows,
                                      source)
    except training.SetupError as e:  # an --init_from model that does not fit: nothing was measured
        raise app.UsageError(str(e)) from None
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: what was measured is written, marked interrupted
        status, stopped = "interrupted", e
    except ValueError as e:  # settings were checked above: no suggestion from the rows
        status, error = "no suggestion", str(e)
    stopped_by = stopped and (getattr(stopped, "signal_name", None) or "SIGINT")
    record = {
        "status": status, "error": error, "interrupted_by": stopped_by,
        "suggested_learning_rate": suggestion and suggestion[0],
        "minimum_loss_learning_rate": suggestion and suggestion[1],
        "steepest_descent_learning_rate": suggestion and suggestion[2], "steps": len(rows),
        "min_learning_rate": f.min_learning_rate, "max_learning_rate": f.max_learning_rate,
        "range_steps": f.range_steps,
        "dataset": config.dataset, "train_examples": len(data.y_fit), "subset_sha256": data.subset_sha256,
        "backend": keras.backend.backend(), "device": device.describe_device(),
        "precision": device.resolve_precision(config.precision, device.describe_device()),
        "versions": results.versions(),
        "git_commit": commit, "flags": dataclasses.asdict(config),
    }
    # The outcome first: a folder that cannot be written loses the files, not the result.
    if suggestion:
        print(f"suggested learning rate {suggestion[0]:.3g} (smoothed loss minimum at {suggestion[1]:.3g}, "
              f"steepest descent at {suggestion[2]:.3g})", flush=True)
    elif status == "interrupted":
        print(f"interrupted by {stopped_by} after {len(rows)} steps (no suggestion)", file=sys.stderr, flush=True)
    elif error:
        print(f"no suggestion: {error}", file=sys.stderr, flush=True)
    title = (f"LR range test: {config.model} on {config.dataset} ({config.train_size} images), {config.optimizer}, "
             f"batch {config.batch_size}" + ("" if status == "completed" else f" ({status})"))
    try:
        # A stop signal while they are written (the plot takes a while) waits for them:
        # the result was measured.
        with cli.StopSignalsHeld("the range test's files"):
            run_dir = results.write_run_folder(
                f.results_dir, f"{config.dataset}{config.train_size}_{config.model}_lr_find",
                {"record.json": results.record_text(record), "lr_find.csv": results.csv_text(rows),
                 "lr_find.png": lambda path: plot(rows, suggestion, path, title)})
    except OSError as e:  # all or nothing; the outcome was printed
        cli.not_written(f"the range test's files under {f.results_dir}", e)
    logging.info("%d steps", len(rows))
    print(f"wrote {run_dir}")
    if status == "interrupted":
        cli.exit_by_signal(stopped_by)
    if error:
        raise SystemExit(1)


if __name__ == "__main__":
    from absl import flags

    import haet.train  # noqa: F401 -- defines the training flags (--flagfile recipes work)

    flags.DEFINE_float("min_learning_rate", 1e-6, "Learning rate of the first step.")
    flags.DEFINE_float("max_learning_rate", 10.0, "Learning rate of the last step.")
    flags.DEFINE_integer("range_steps", 200, "Steps from the minimum to the maximum rate.")
    flags.FLAGS.set_default("results_dir", "results/lr_find")
    cli.run(main)
