"""Train under a wall-clock budget: `python -m haet.train --budget=600`.

With no other flag this runs the UMBC HAET-2021 recipe (widened ResNet-20, Adam at
batch 32, wall-clock learning rate and augmentation schedules) on a stratified
5,000-image CIFAR-10 subset, evaluates on the 10,000 test images and writes a run
folder under --results_dir. The recipe is also spelled out, with its sources, in
`flags/umbc_resnet20x6.flags`. Every training flag comes from a field of
`haet.config.TrainConfig` (`python -m haet.config` lists them). Examples:

    python -m haet.train --budget=600 --data_dir=../shared/data/cifar10
    python -m haet.train --flagfile=flags/page_resnet9.flags --data_dir=../shared/data/cifar10
    KERAS_BACKEND=jax python -m haet.train --budget=60 --width_multiplier=1
    python -m haet.train --resume=results/runs/RUN_FOLDER

SIGINT (Ctrl-C) or SIGTERM stops training at the next execution boundary and writes
a checkpoint; --resume goes on from it in the same folder, on the remaining budget.
Exit status: 0 completed, 1 failed, 2 bad flags or setup (nothing written),
3 diverged, 4 completed but a file could not be written, 128 + the signal's number
when interrupted (130 SIGINT, 143 SIGTERM).
"""

import sys

from absl import app, flags

from haet import checkpoint, cli, config as config_lib, device
from haet.training import SetupError, SetupInterrupted, train

config_lib.define_flags()
flags.DEFINE_string("results_dir", "results/runs", "A new run folder is made under it.")
flags.DEFINE_string("resume", None, "Folder of an interrupted run: go on from its checkpoint with its own "
                    "settings (only --data_dir may be given with it).")

FLAGS = flags.FLAGS

USAGE_ERROR = cli.USAGE_ERROR


def config_from_flags(**overrides):
    """The `TrainConfig` of the parsed command-line flags, for a new run.

    Raises:
        app.UsageError: a setting that does not check, with its message (exit status 2).
            A setting that changes nothing is logged as a warning
            (`haet.config.warn_ignored_settings`).
    """
    try:
        config = config_lib.config_from_flags(FLAGS, **overrides)
    except ValueError as e:
        raise app.UsageError(str(e), exitcode=USAGE_ERROR) from None
    config_lib.warn_ignored_settings(config)
    return config


def config_to_resume(run_dir):
    """The settings of the run in `run_dir`, for --resume (other training flags are refused).

    Raises:
        app.UsageError: training flags or --results_dir given with --resume, or a folder that
            cannot be resumed.
    """
    given = sorted(config_lib.flag_name(name) for name in config_lib.FIELDS
                   if FLAGS[config_lib.flag_name(name)].present and name != "data_dir")
    if given:
        raise app.UsageError(f"--resume continues a run with its own settings; do not pass "
                             f"{', '.join('--' + g for g in given)} with it.", exitcode=USAGE_ERROR)
    if FLAGS["results_dir"].present:
        raise app.UsageError(f"--resume goes on in the run's own folder ({run_dir}); do not pass --results_dir "
                             "with it.", exitcode=USAGE_ERROR)
    try:
        record = checkpoint.resumable(run_dir)
        overrides = {"data_dir": FLAGS.data_dir} if FLAGS["data_dir"].present else {}
        return config_lib.config_from_record(record["flags"], **overrides)
    except ValueError as e:
        raise app.UsageError(str(e), exitcode=USAGE_ERROR) from None


def main(argv):
    del argv  # (haet.cli.run refuses arguments other than flags)
    config = config_to_resume(FLAGS.resume) if FLAGS.resume else config_from_flags()
    if config.deterministic:
        try:
            device.enable_determinism()  # before anything starts JAX's backends
        except ValueError as e:
            raise app.UsageError(str(e), exitcode=USAGE_ERROR) from None
    try:
        record, run_dir = train(config, results_dir=FLAGS.results_dir, resume=FLAGS.resume)
    except SetupError as e:
        raise app.UsageError(str(e), exitcode=USAGE_ERROR) from None
    except SetupInterrupted as e:
        print(f"interrupted {e}", file=sys.stderr)
        cli.exit_by_signal(e.signal_name)
    except KeyboardInterrupt as e:
        print(f"interrupted ({e or 'KeyboardInterrupt'}); the run's record says so", file=sys.stderr)
        # (a second stop signal's: by the first; SIGINT for a KeyboardInterrupt of no signal)
        cli.exit_by_signal(getattr(e, "signal_name", None))
    print(summary(record, run_dir))
    signal_name = checkpoint.ending_signal(record)
    if signal_name:
        # Ended by the signal, as a shell's Ctrl-C expects: `exit(130)` let a shell loop of runs go on to the next.
        cli.exit_by_signal(signal_name)
    sys.exit(checkpoint.exit_code(record))


def summary(record, run_dir):
    """One line on how a run ended, for the console."""
    status = record["status"]
    if status == "completed":
        parts = []
        if record.get("test_accuracy") is not None:
            parts.append(f"test accuracy {record['test_accuracy']:.2%}")
        if record.get("validation_accuracy") is not None:
            parts.append(f"validation accuracy {record['validation_accuracy']:.2%}")
        text = f"completed: {', '.join(parts)} after {record['train_seconds']:.1f} s of training"
        if record.get("artifact_errors"):
            text += f"; NOT WRITTEN: {', '.join(record['artifact_errors'])}"
    elif status == "interrupted":
        text = f"interrupted by {record.get('interrupted_by')} after {record.get('steps')} steps"
        text += (f"; resume with: python -m haet.train --resume={run_dir}" if record.get("checkpoint")
                 else "; no checkpoint")
    elif status == "diverged":
        text = (f"diverged: non-finite loss at step {record.get('diverged_at_step')} (the step before: "
                f"{record.get('last_finite_loss')}); no accuracy")
    else:
        text = f"{status}: {record.get('error')}"
    return f"{text} -> {run_dir}"


if __name__ == "__main__":
    cli.run(main)
