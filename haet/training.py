"""Train a classifier under a wall-clock budget, evaluate it, write the run's record.

`train(config)` is a run of named steps; each is a function that returns values,
and the other commands reuse them (`haet.sanity`, `haet.lr_find`, `haet.search`,
`haet.bench`):

1. `haet.device.run_settings`: precision policy, seeds, data-parallel devices
   (restored afterwards);
2. `prepare_data`: the dataset, its stratified training subset, the validation split;
3. `build_model`: the uint8-input model with its normalization and augmentation;
4. `build_optimizer` and `compile_model`: the learning-rate schedule, the optimizer,
   the loss;
5. `build_run`: the engine (training images on the accelerator), the budget and the
   hooks (planner, validation, EMA, early stopping, snapshots, health, TensorBoard);
6. `Run.fit`: epochs of compiled executions until the budget, the plan, the epochs or
   early stopping end them;
7. `evaluate`: every variant of the final model on the validation and test sets;
8. `haet.results`: the record (written from the start, see `train`) and the files
   of the run folder.

The defaults of `haet.config.TrainConfig` are the UMBC HAET-2021 recipe.
"""

import contextlib
import dataclasses
import math
import os
import random
import re
import sys
import time

import keras
import numpy as np
from absl import logging

from haet import augment, budget as budget_lib, checkpoint as checkpoint_lib, cli, data as data_lib
from haet import device as device_lib, evaluation, models, optimizers, results, schedules
from haet.config import TrainConfig
from haet.engine import check_steps_per_execution, current_weights, make_engine
from haet.layers import PatchWhitening
from haet.hooks import DivergenceGuard, LookaheadEnd, MovingAverage, SnapshotKeeper, TrainingHealth, Validation
from haet.loop import Hook, KerasCallbacks, StepLimit, Training

__all__ = ["TrainConfig", "SetupError", "CheckpointMismatch", "SetupInterrupted", "train", "prepare_data",
           "build_model", "load_init_from", "build_optimizer", "compile_model", "build_run", "evaluate"]


def train(config, results_dir="results/runs", clock=time.perf_counter, resume=None, hooks=(), resume_hint=None):
    """Trains `config` within its budget, evaluates it, and writes the run folder
    (see `haet.results`) while it goes.

    The data are loaded and the model built first (a model to fine-tune from,
    `init_from`, is loaded before the data); then the run folder is made and its
    record written (`status: "running"`). History rows are appended as
    epochs end; checkpoints are written every `config.checkpoint_every` seconds of
    budget, and as training ends (`haet.checkpoint.Checkpointer`). The run ends as one of:

    - "completed": evaluated; the record, then the model and figures are written
      (a file that cannot be written is listed in `artifact_errors`) and the
      checkpoint is deleted;
    - "interrupted": SIGINT or SIGTERM stopped training at an execution boundary;
      a checkpoint is written for `resume` (`interrupted_by` names the signal);
    - "diverged": a non-finite training loss stopped training at once
      (`diverged_at_step`, `last_finite_loss`); no accuracy is claimed;
    - "failed": an exception after the folder was made; the record has the `error`
      and the exception propagates.

    Args:
        config: a `TrainConfig` (checked when it was made).
        results_dir: parent folder of the new run folder (unused when resuming).
        clock: the one clock of the run (seconds; tests pass a fake), shared by the
            phase timer and the budget.
        resume: None, or the folder of an interrupted (or killed) run of `config`
            with a checkpoint: training goes on in that folder from the checkpoint,
            on the remaining budget; the record counts the `resumes`.
        hooks: extra `haet.loop.Hook`s, acting after validation and the budget
            (e.g. `haet.search.ReportToTrial`); a hook may stop the run with its
            own reason (the record's `stopped_by`).
        resume_hint: how the interrupted run's log line says to go on: None for
            `python -m haet.train --resume=RUN_DIR`; a caller that resumes its runs
            itself (`haet.search`) says how it does.

    Returns:
        `(record, run_dir)`: the record also written to `run_dir/record.json`.

    Raises:
        SetupError (a ValueError): bad data (the file named), no data found, an
            unusable results folder, a precision or device setting the machine
            cannot take, an `init_from` model that cannot be loaded or does not
            fit, or a run that cannot be resumed: before the run folder is made or
            touched.
        KeyboardInterrupt: a second stop signal (or one outside training); the record
            says "interrupted". `SetupInterrupted` (a KeyboardInterrupt) for a stop
            signal during setup, the first too: no folder was written yet.
    """
    timer = budget_lib.PhaseTimer(clock)
    commit = results.git_commit()  # the code this process runs, not the tree at the end
    previous = saved = None
    with contextlib.ExitStack() as stack:
        try:  # Everything before the run folder is made or reopened: nothing is written.
            with _setup_errors():
                if resume is not None:
                    if os.path.isdir(resume):  # (resumable names what else it is)
                        # First: of two resumes of one run, the second stops here.
                        stack.enter_context(checkpoint_lib.run_lock(resume))
                    previous, saved = checkpoint_lib.resumable_with_checkpoint(resume)
                    _check_same_settings(config, previous, resume)
                else:
                    results.check_results_dir(results_dir)
            with _setup_errors():
                settings = stack.enter_context(settings_of(config))
            signals = stack.enter_context(checkpoint_lib.StopSignals())
            with timer.phase("setup"):
                with _setup_errors():
                    # A resumed fine-tuning run takes what it took from its source model from its
                    # checkpoint: the file may have moved, or changed, since.
                    fine_tuned = _fine_tuned_state(config, saved, previous)
                    # A damaged file is refused before the data are read.
                    source = load_init_from(config) if fine_tuned is None else None
                    data = prepare_data(config)
                start = {**results.start_record(config, settings, commit), **results.data_fields(config, data)}
                if previous is not None:
                    with _setup_errors():
                        _check_same_data(start, previous, resume)
                # Before the folder: a model to fine-tune from that does not fit is refused with nothing written.
                built = build_model(config, data, source, fine_tuned)
                del source
        except KeyboardInterrupt as e:
            raise SetupInterrupted.of(resume, getattr(e, "signal_name", None)) from None
        if signals.received is not None:
            # A stop signal during setup, the first too: nothing is written (a run folder was
            # made after it, its record "interrupted" at step 0, with no checkpoint to resume).
            raise SetupInterrupted.of(resume, signals.name)
        with timer.phase("setup"):
            if previous is None:
                folder = results.RunFolder.create(results_dir, config.run_name(), start)
                stack.enter_context(checkpoint_lib.run_lock(folder.path))
            else:
                folder = _reopen(resume, previous, start)
        try:
            record = _train_in(config, folder, data, built, settings, timer, clock, signals, previous, saved, hooks,
                               resume_hint)
        except BaseException as e:
            if isinstance(e, CheckpointMismatch):
                # Refused once the run was built, before any step: the record goes back
                # to what it said before this resume (its status, signal and resumes).
                folder.write_record(previous)
                raise
            interrupted = isinstance(e, KeyboardInterrupt)
            folder.update(status="interrupted" if interrupted else "failed",
                          error=f"{type(e).__name__}: {e}",
                          interrupted_by=signals.name if interrupted else None,
                          checkpoint=checkpoint_lib.CHECKPOINT if os.path.exists(
                              os.path.join(folder.path, checkpoint_lib.CHECKPOINT)) else None,
                          ended_utc=results.utc_now())
            if not interrupted:
                logging.exception("run %s failed", folder.path)
            raise
    return record, folder.path


class SetupInterrupted(cli.SecondStopSignal):
    """A stop signal while a run was setting up, before its folder was made or
    reopened: no record says so."""

    @classmethod
    def of(cls, resume, signal_name):
        """For a new run (`resume` None) or the resume of folder `resume`."""
        return cls("during setup, before anything was written" if resume is None else
                   f"during setup; {resume} was left as it was", signal_name)


class SetupError(ValueError):
    """A run that cannot start: a setting, data file, results folder or run to resume
    that is not usable; raised before the run folder is made (or touched)."""


class CheckpointMismatch(SetupError):
    """The checkpoint of a run to resume holds other variables than the run built by
    this code; found once the run is built, before any step (its record is left as
    it was before the resume)."""


@contextlib.contextmanager
def _setup_errors():
    try:
        yield
    except SetupError:
        raise
    except (ValueError, RuntimeError) as e:
        raise SetupError(str(e)) from e


def _check_same_settings(config, record, run_dir):
    ours = results.json_safe(dataclasses.asdict(config))
    theirs = {k: v for k, v in record["flags"].items() if k in ours}
    changed = sorted(k for k in theirs if k != "data_dir" and theirs[k] != ours[k])
    if changed:
        raise ValueError(f"{run_dir} was trained with other settings ({', '.join(changed)}): a run resumes with "
                         "its own settings (python -m haet.train --resume=RUN_DIR reads them from its record).")


# What a resumed run's data must share with the run's record: the training subset
# (its sha256 covers the images and labels), the splits' sizes.
_SAME_DATA = ("dataset", "subset_sha256", "train_examples", "validation_examples", "test_examples")


def _check_same_data(start, record, run_dir):
    changed = [f"{k} {record[k]!r} -> {start[k]!r}" for k in _SAME_DATA if k in record and record[k] != start[k]]
    if changed:
        raise ValueError(f"The data found now differ from those {run_dir} was trained on ({'; '.join(changed)}): "
                         f"resume with --data_dir pointing at the same data (the run's was "
                         f"{record.get('data_source')!r}).")


def _reopen(run_dir, previous, start):
    """The run folder of a resumed run, its record marked running again."""
    folder = results.RunFolder(run_dir, previous)
    history = list(previous.get("resume_history") or [])
    history.append({"utc": start["started_utc"], "git_commit": start["git_commit"], "backend": start["backend"],
                    "device": start["device"], "process": start["process"],
                    "budget_seconds_elapsed": previous.get("train_seconds")})
    folder.update(status="running", resumes=len(history), resume_history=history, process=start["process"],
                  error=None, interrupted_by=None, **_mixed_fields(previous, start))
    logging.info("resuming %s (resume %d)", run_dir, len(history))
    return folder


def _joined(before, now, separator):
    """`before` with `now` added as a part (`a+b`), unless it is one already."""
    parts = str(before).split(separator) if before not in (None, "") else []
    return separator.join(parts if now in parts else [*parts, now])


def _mixed_fields(previous, start):
    """Of a run resumed on another backend, device or precision: the record's fields
    naming both (`tensorflow+jax`, device name `A + B`), so that the report neither
    files nor averages its timings with runs made on one; each piece's own values
    stay in `resume_history`."""
    fields = {}
    for key in ("backend", "precision"):
        if previous.get(key) is not None and start[key] not in str(previous[key]).split("+"):
            fields[key] = _joined(previous[key], start[key], "+")
    before, now = previous.get("device"), start["device"]
    if isinstance(before, dict) and isinstance(now, dict) and now.get("name") not in \
            str(before.get("name")).split(" + "):
        fields["device"] = {**now, "name": _joined(before.get("name"), now.get("name"), " + "),
                            "platform": _joined(before.get("platform"), now.get("platform"), "+")}
    if fields:
        logging.warning("resumed on another %s: the record names both (%s)", " and ".join(fields),
                        {k: v if k != "device" else v["name"] for k, v in fields.items()})
    return fields


def _train_in(config, folder, data, built, settings, timer, clock, signals, previous, saved, hooks=(),
              resume_hint=None):
    """Trains and evaluates `config` in `folder` (see `train`), `built` by `build_model`,
    from the checkpoint `saved` (`haet.checkpoint.load`'s triple) when it resumes;
    returns the record."""
    model, augmentation, transfer = built
    with timer.phase("setup"):
        optimizer, schedule = build_optimizer(config, data.steps_per_epoch(config))
        compile_model(config, model, optimizer, settings)
        # The host's CPUs from here to the end of training: precomputed augmentation,
        # probe, compilation, steps and validation (record: host_cpu).
        host_cpu = device_lib.HostCpu()
        host_cpu.start()
        run = build_run(config, model, augmentation, schedule, data, folder, clock, timer, signals=signals,
                        extra_hooks=hooks)
    earlier_setup = (previous or {}).get("setup_seconds") or 0.0

    def progress(**fields):
        record = {**folder.record, **results.training_fields(config, data, run, timer), **fields,
                  "host_cpu": host_cpu.fields((previous or {}).get("host_cpu"), resumed=previous is not None)}
        record["setup_seconds"] = round(earlier_setup + timer.seconds.get("setup", 0.0), 3)
        return record

    folder.update(**results.model_fields(model, transfer),
                  setup_seconds=round(earlier_setup + timer.seconds["setup"], 3))
    run.checkpointer.record_progress = lambda: folder.write_record(progress(checkpoint=checkpoint_lib.CHECKPOINT))
    # The input normalization is a constant of the model, not a variable: kept beside them for a
    # resume that cannot take it from the model it fine-tunes (`_fine_tuned_state`).
    statistics = models.input_statistics_of(model)
    run.checkpointer.constants = {"input_statistics": None if statistics is None else list(statistics)}
    resume_from = None
    if previous is not None:
        resume_from = _load_checkpoint(run, saved, folder.path, previous,
                                       checkpoint_lib.process_commit(folder.record))
    # A second stop signal from here to the end of evaluation: the record keeps what was trained.
    # A resume of a checkpoint written as training ended runs no step: its process trains nothing to warn about.
    trains = resume_from is None or resume_from[1].get("training_ended_by") is None
    with _training_in_the_record(folder, run, progress):
        run.fit(resume_from)
        host_cpu.stop()
        if trains:
            _warn_if_loaded(host_cpu.fields())
        stopped_by = run.training.stopped_by
        if stopped_by == "interrupted":
            trained = run.engine.epoch is not None
            saved = trained and run.checkpointer.save(run.training)
            # An earlier checkpoint where this one could not be written (a full disk): a resume
            # goes on from it (it said "nothing was trained yet", and the run was given up).
            kept = trained and not saved and os.path.exists(run.checkpointer.path)
            record = progress(status="interrupted", interrupted_by=signals.name, ended_utc=results.utc_now(),
                              checkpoint=checkpoint_lib.CHECKPOINT if saved or kept else None)
            folder.write_record(record)
            hint = resume_hint or f"resume with: python -m haet.train --resume={folder.path}"
            error = folder.artifact_errors.get(checkpoint_lib.CHECKPOINT)
            if kept:
                at = run.checkpointer.saved_at_step
                hint = (f"its checkpoint could not be written ({error}); the earlier one"
                        f"{'' if at is None else f', of step {at},'} is kept, and a resume goes on from it: {hint}")
            elif not saved:
                hint = (f"no checkpoint: it could not be written ({error})" if trained else
                        "no checkpoint (nothing was trained yet)")
            logging.warning("interrupted by %s after %d steps (%.1f s of the %g s budget); %s", signals.name,
                            record["steps"], record["train_seconds"], config.budget_seconds, hint)
            return folder.record
        if stopped_by == "diverged":
            _end_epochs_before_divergence(run)
            record = progress(status="diverged", diverged_at_step=run.divergence.step,
                              last_finite_loss=run.divergence.last_finite_loss, test_accuracy=None,
                              signal_after_training=signals.name, ended_utc=results.utc_now())
            folder.write_record(record)
            logging.error("diverged at step %d; no accuracy is claimed -> %s", run.divergence.step, folder.path)
            return folder.record
        with timer.phase("eval"):
            evaluated = evaluate(config, model, data, run)
    # A stop signal that came after training ended stopped nothing: the record names it
    # (a caller of several runs, the search, stops after this one).
    record = progress(status="completed", **results.evaluation_fields(config, data, run, evaluated, timer),
                      signal_after_training=signals.name, ended_utc=results.utc_now())
    folder.write_record(record)  # the accuracy is on disk before the large files are written
    # Completed: the checkpoint goes before the large files are written. A stop signal
    # while they were made the run "interrupted" with its checkpoint, and a resume
    # trained it again from there, over its accuracy.
    try:
        run.checkpointer.remove()
    except OSError as e:  # (a read-only folder: it crashed the completed run, its accuracy unsaid)
        logging.warning("could not remove %s of the completed run: %s", checkpoint_lib.CHECKPOINT, e)
    folder.update(checkpoint=None)
    try:
        results.write_artifacts(folder, model, run, evaluated, data.info.class_names, save_model=config.save_model,
                                export=config.export)
    except KeyboardInterrupt:  # a second stop signal: the files left are not written, the run completed
        folder.record["files_interrupted_by"] = signals.name or "KeyboardInterrupt"
        logging.warning("stopped by %s while the run's files were written: the rest are not written (the run "
                        "completed: its record has the accuracy)", signals.name or "KeyboardInterrupt")
    signalled = folder.record["signal_after_training"] != signals.name  # (while the files were written)
    folder.record["signal_after_training"] = signals.name
    if folder.artifact_errors or signalled:
        folder.write_record()  # the files that could not be written, listed
    record = folder.record
    message = "%s; %d epochs (%d steps, %s); setup %.1f s, compile %.1f s, train %.1f s, eval %.1f s, " \
              "%.1f images/s -> %s"
    args = ("; ".join(f"{name} accuracy {v.scores[v.headline]['accuracy']:.4f}" for name, v in evaluated.items()),
            record["epochs"], record["steps"], record["stopped_by"], record["setup_seconds"],
            record["compile_seconds"], record["train_seconds"], record["eval_seconds"],
            record["images_per_second"] or 0, folder.path)
    logging.info(message, *args)
    if record["over_budget"]:
        logging.warning("training ran %.1f s past its %g s budget (more than one execution: compile %.1f s); the "
                        "report keeps this run apart", record["over_budget_seconds"], config.budget_seconds,
                        record["compile_seconds"])
    if folder.artifact_errors:
        logging.error("files that could not be written: %s", folder.artifact_errors)
    return record


@contextlib.contextmanager
def _training_in_the_record(folder, run, progress):
    """A second stop signal (`KeyboardInterrupt`) in the block: the record in memory,
    which `train` writes as it marks the run interrupted, says what was trained.

    With a checkpoint on disk, the record stays the one written with it (its steps,
    seconds and epochs are what a resume goes on from), and `steps_when_interrupted`
    says how far the host had counted (the steps past the checkpoint's are lost).
    Without one, it takes the training's fields so far (`progress()`: up to the last
    execution the host counted; epochs that ended on the device without a history row
    are not counted: nothing keeps them). Before, that record had no training fields."""
    try:
        yield
    except KeyboardInterrupt:
        try:
            if os.path.exists(run.checkpointer.path):
                folder.record["steps_when_interrupted"] = run.budget.steps
            else:
                run.engine.take_ended_epochs()
                folder.record = progress()
        except Exception as e:  # noqa: BLE001 (the run is still marked interrupted, without them)
            logging.warning("the training's fields could not be put in the record: %s: %s", type(e).__name__, e)
        raise


def _warn_if_loaded(host_cpu):
    if host_cpu and host_cpu["loaded"]:
        logging.warning("other processes kept %.2f of the %d CPUs this run may use busy while it trained (and the "
                        "hypervisor %.2f): its timings are not those of an idle machine; the report keeps it apart",
                        host_cpu["other_load"], host_cpu["cpus"], host_cpu["steal_load"])


def _unnumbered(path):
    return "/".join(re.sub(r"_\d+$", "", part) for part in path.split("/"))


def _load_checkpoint(run, saved, run_dir, previous, commit):
    """`(snapshot, state)` of `run_dir`'s checkpoint (`saved`: as `haet.checkpoint.load`
    read it), checked against `run`'s variables; the host's random generators are put back.

    Raises:
        CheckpointMismatch (a SetupError): the checkpoint holds other variables (the
            code changed since it was written), or was written by a run with other
            hooks (the code changed, or the caller passed other `hooks`): naming the
            commit that wrote it (kept in the checkpoint; of one written before it
            was, the commits in `previous`, the record before this resume) and this
            one (`commit`) where they differ.
    """
    snapshot, paths, state = saved
    written = state.pop("git_commit", _UNKNOWN)
    ours = run.engine.variable_paths()
    offsets = [i for i, path in enumerate(ours) if path.endswith("/plan_offset")]
    if len(paths) == len(ours) - 1 and len(offsets) == 1 and not any(p.endswith("/plan_offset") for p in paths):
        # Written before plans had an offset: the plan went on from 0 (it had no other).
        i = offsets[0]
        snapshot = [*snapshot[:i], np.zeros((), np.float32), *snapshot[i:]]
        paths = [*paths[:i], ours[i], *paths[i:]]
    # Keras numbers the names of objects made again in one process (adam_1/...): compare without.
    differ = [(a, b) for a, b in zip(paths, ours) if _unnumbered(a) != _unnumbered(b)]
    if len(paths) != len(ours) or differ:
        raise CheckpointMismatch(f"The checkpoint in {run_dir} holds other variables than this model: "
                                 f"{len(paths)} vs {len(ours)} variables"
                                 f"{', first difference ' + str(differ[0]) if differ else ''}. "
                                 + _written_by(written, previous, commit))
    # Here, before any step: `Training.fit`'s own check comes inside the run, which it leaves "failed".
    differ = run.training.other_hooks(state)
    if differ:
        # A caller's own hooks (a search's pruner reports through one), or the code changed.
        same_code = written == commit and commit is not None and not commit.endswith("-dirty")
        raise CheckpointMismatch(
            f"The checkpoint in {run_dir} was {differ}: resume it as it was run (a search's trial by running its "
            "search command again; a `haet.training.train` call with the same `hooks`)."
            + ("" if same_code else " Or the code changed since: " + _written_by(written, previous, commit)))
    checkpoint_lib.set_host_random_state(state.pop("host_random"))
    state.pop("input_statistics", None)  # (read before the model was built)
    return snapshot, state


_UNKNOWN = object()  # a checkpoint written before checkpoints named their commit


def _written_by(written, previous, commit):
    """What to do about a checkpoint this code (`commit`) cannot continue: `written`,
    the commit the checkpoint names (`_UNKNOWN` for one that names none: then the
    commits of `previous`, the run's record)."""
    if written is _UNKNOWN:
        commits = [previous.get("git_commit")] + [h.get("git_commit") for h in previous.get("resume_history") or []]
        known = list(dict.fromkeys(c for c in commits if c))
        ran = ", ".join(known) or "no known commit"
        return (f"It does not name the code that wrote it (the run's processes ran {ran}; this is {commit}): "
                f"resume with that code, or start the run again.")
    if written is None or commit is None:
        return ("The code that wrote it is not known (not a git checkout): resume with that code, or start the "
                "run again.")
    if written == commit and not commit.endswith("-dirty"):
        return f"It was written by this code (commit {commit}): this is a bug of haet's; please report it."
    return (f"It was written by haet at commit {written}, and this is {commit}: resume with the code that "
            f"wrote it (git checkout {written.removesuffix('-dirty')}), or start the run again.")


def settings_of(config):
    """`haet.device.run_settings` for `config`: its precision, seed and data parallelism."""
    return device_lib.run_settings(config.precision, config.seed,
                                   config.batch_size if config.data_parallel else None, config.deterministic)


@dataclasses.dataclass(frozen=True)
class TrainingData:
    """A run's data: every split of the dataset, the training subset split into the
    images it fits (`x_fit`, `y_fit`) and the validation images (`x_val`, `y_val`;
    empty without a validation split), and the subset's sha256. Images are uint8
    NHWC, labels int32."""

    dataset: data_lib.Dataset
    x_fit: np.ndarray
    y_fit: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    subset_sha256: str

    @property
    def info(self):
        return self.dataset.info

    def steps_per_epoch(self, config):
        return len(self.y_fit) // config.batch_size


def load_dataset_of(config):
    """The dataset of `config` (all splits), restricted to `config.classes` if set."""
    return data_lib.select_classes(data_lib.load_dataset(config.dataset, config.data_dir), config.classes)


def prepare_data(config):
    """Loads the dataset and takes the training subset and validation split of `config`.

    The subset is `haet.data.stratified_subset(..., config.subset_seed)`; with
    `validation_size` > 0 that many class-balanced images are held out of it
    (`split_validation`, seed `subset_seed + 1`).

    Returns:
        `TrainingData`.

    Raises:
        ValueError: malformed data, or a `steps_per_execution` that would let one
            execution reach more epochs than the engine keeps permutations for
            (`haet.engine.check_steps_per_execution`: every tool that trains reads
            its data here first). RuntimeError: no data found.
    """
    dataset = load_dataset_of(config)
    info = dataset.info
    if config.evaluate_test and not len(dataset.y_test):
        raise ValueError(f"The {info.name} test split from {dataset.source} holds no images: a run is scored on "
                         f"the test set (--noevaluate_test trains without scoring it).")
    indices = data_lib.stratified_subset(dataset.y_train, config.train_size, info.num_classes, config.subset_seed)
    x_train, y_train = dataset.x_train[indices], dataset.y_train[indices]
    sha = data_lib.subset_sha256(x_train, y_train)
    logging.info("%s from %s: %d training images (subset seed %d, sha256 %s), %d test images",
                 info.name, dataset.source, len(y_train), config.subset_seed, sha, len(dataset.y_test))
    x_fit, y_fit, x_val, y_val = split_validation(x_train, y_train, config.validation_size, info.num_classes,
                                                  config.subset_seed + 1)
    check_steps_per_execution(config.steps_per_execution, len(y_fit) // config.batch_size, len(y_fit),
                              config.span_epochs)
    return TrainingData(dataset, x_fit, y_fit, x_val, y_val, sha)


def split_validation(x, y, validation_size, num_classes, seed):
    """Holds `validation_size` class-balanced images out of a training subset.

    The held-out indices are `haet.data.stratified_subset(y, validation_size,
    num_classes, seed)`, so the split depends only on the labels and the seed.

    Returns:
        `(x_fit, y_fit, x_validation, y_validation)`; the validation arrays are empty
        when `validation_size` is 0.

    Raises:
        ValueError: `validation_size` not a multiple of `num_classes` or too large.
    """
    if not validation_size:
        return x, y, x[:0], y[:0]
    held = data_lib.stratified_subset(y, validation_size, num_classes, seed)
    keep = np.ones(len(y), dtype=bool)
    keep[held] = False
    return x[keep], y[keep], x[held], y[held]


def input_statistics(config, x_train):
    """`(mean, variance)` of the training images on the [0, 1] scale: per pixel
    (variance None) or per channel, as `config.input_normalization` says."""
    scaled = x_train.astype(np.float32) / 255.0
    if config.input_normalization == "pixel_mean":
        return scaled.mean(axis=0), None
    return scaled.mean(axis=(0, 1, 2)), scaled.var(axis=(0, 1, 2))


def build_model(config, data, source=None, fine_tuned=None):
    """The uint8-input model of `config`, its augmentation layer and the fine-tuning summary.

    The model normalizes with the statistics of `data.x_fit` and augments inside
    (in training only), except with precomputed augmentation, where the layer is
    returned but left out. With `init_from`, the saved model (`source`, or the file
    loaded here) gives its input normalization where its statistics have the shape
    of this model's, and its weights (new head; `haet.models.transfer_weights`); the
    first `freeze_stages` stages are frozen. With `ensemble_members` > 1 the model is a
    `haet.models.EnsembleModel` of that many networks.

    `fine_tuned`: for a fine-tuning run that resumes, `(mean, variance, transfer)`
    from its checkpoint and record: the model normalizes with those, its first
    `freeze_stages` stages are frozen, and no source is read (the checkpoint
    holds every weight).

    Returns:
        `(model, augmentation, transfer)`: a `keras.Model` from uint8 images to
        float32 logits, the layer or None, and a dict (or None without `init_from`).

    Raises:
        SetupError: an `init_from` model that cannot be loaded or has no layer in
            common with this one, or stages to freeze that it cannot fill.
    """
    info = data.info
    if config.init_from and source is None and fine_tuned is None:
        source = load_init_from(config)
    mean, variance = input_statistics(config, data.x_fit) if fine_tuned is None else fine_tuned[:2]
    from_source = None
    if source is not None:
        # The source's features were learned on images normalized its way: keep it where the
        # statistics fit these images (not from RGB to grayscale, nor per pixel to per channel).
        theirs = models.input_statistics_of(source)
        if theirs is not None and theirs[0].shape == mean.shape:
            mean, variance = theirs
            from_source = True
        else:
            from_source = False
            logging.warning("fine-tuning from %s: its input normalization (%s) does not fit this model's (%s); "
                            "the statistics of this run's training images are used", config.init_from,
                            "none" if theirs is None else f"shape {theirs[0].shape}", f"shape {mean.shape}")
    whitening = None
    if models.needs_whitening(config.model, config.prep):
        # The images as the backbone sees them: scaled and normalized, unaugmented (at most
        # 10,000: Page took 10,000, airbench 5,000).
        scale = np.sqrt(variance) if variance is not None else 1.0
        whitening = (data.x_fit[:10_000].astype(np.float32) / 255.0 - mean) / scale
    backbones = models.build_backbones(config, info.num_classes, info.image_shape, whitening)
    augmentation = augment.build_augmentation(config)
    in_model = None if config.precomputed_augmentation_epochs else augmentation
    if config.ensemble_members > 1:
        model = models.ensemble_with_input_pipeline(backbones, mean, in_model, variance,
                                                    name=f"{config.model}_ensemble_of_{config.ensemble_members}")
    else:
        model = models.with_input_pipeline(backbones[0], mean, in_model, variance)
    transfer = None
    if fine_tuned is not None:
        transfer = fine_tuned[2]
        models.freeze_leading_stages(model, config.model, config.freeze_stages)
    elif source is not None:
        try:
            moved = models.transfer_weights(source, model, config.model, config.freeze_stages)
        except ValueError as e:
            raise SetupError(f"--init_from={config.init_from!r}: {e}") from None
        transfer = {"init_from": config.init_from, "source_model": source.name, **moved,
                    "input_normalization_transferred": from_source}
        logging.info("fine-tuning from %s: %s", config.init_from, transfer)
        if moved["layers_not_transferred"]:
            logging.warning("fine-tuning from %s: %d layers keep their random initialization (no layer of the "
                            "same name and shapes in %s): %s", config.init_from,
                            len(moved["layers_not_transferred"]), source.name,
                            ", ".join(moved["layers_not_transferred"]))
    return model, augmentation, transfer


def _fine_tuned_state(config, saved, previous):
    """`(mean, variance, transfer)` of a fine-tuning run to resume (`build_model`'s
    `fine_tuned`), from its checkpoint `saved` (`haet.checkpoint.load`'s triple) and
    its record `previous`; None for another run (or no resume), or for a checkpoint
    written before checkpoints kept the input statistics (then the `init_from` file
    is read again, as it was).

    Raises:
        SetupError: such an older checkpoint, and no `init_from` file.
    """
    if saved is None or not config.init_from:
        return None
    statistics = saved[2].get("input_statistics")
    if statistics is None:
        if not os.path.isfile(config.init_from):  # (--resume takes no --init_from: say what can be done)
            raise SetupError(f"The run's checkpoint was written before checkpoints kept the input normalization: "
                             f"the resume takes it from --init_from={config.init_from!r}, which is not a file. Put "
                             "the model the run fine-tunes back at that path, or start the run again.")
        return None
    mean, variance = statistics
    return np.asarray(mean, np.float32), np.asarray(variance, np.float32), previous.get("transfer")


def load_init_from(config):
    """The saved model `config.init_from` names, or None without it.

    Loading leaves Python's random generator as it was: Keras draws the seeds of the
    initializers it makes while loading from it, so the layers a fine-tuned model
    does not take from the source (its new head) start from the weights they would
    have without the load.

    Raises:
        SetupError: a file Keras cannot load (`haet.models.load_saved_model`).
    """
    if not config.init_from:
        return None
    state = random.getstate()
    try:
        return models.load_saved_model(config.init_from, f"--init_from={config.init_from!r}",
                                       "Pass the model.keras of a completed run folder (a run trained with "
                                       "--save_model).")
    except ValueError as e:
        raise SetupError(str(e)) from None
    finally:
        random.setstate(state)


def planned_steps(config, steps_per_epoch):
    """The steps of `config.epochs` epochs (a fraction rounds up to a whole step); 0 with `epochs=0`."""
    return math.ceil(config.epochs * steps_per_epoch)


def build_optimizer(config, steps_per_epoch):
    """The learning-rate schedule of `config` and the optimizer that follows it.

    A schedule of unit "steps" runs inside the compiled step over a planned number
    of steps, a variable created here (`--epochs` x steps per epoch, or set by the
    planner before training); one of unit "budget" starts the optimizer at its
    first value and is written by the budget as the clock runs.

    Returns:
        `(optimizer, schedule)`.
    """
    schedule = schedules.learning_rate_schedule(config)
    if schedule.unit == "steps":
        optimizer = optimizers.make_optimizer(config, schedule)
        planned = max(steps_per_epoch, planned_steps(config, steps_per_epoch))
        schedule.attach(optimizer, planned, steps_per_epoch)
    else:
        optimizer = optimizers.make_optimizer(config, schedule(0.0))
    return optimizer, schedule


def compile_model(config, model, optimizer, settings):
    """Compiles `model` with `optimizer`, the loss of `config` and accuracy; XLA unless
    the data-parallel engine cannot (`settings` from `haet.device.run_settings`)."""
    xla = settings.parallel["xla"] if settings.parallel else True
    model.compile(optimizer=optimizer, loss=optimizers.make_loss(config), metrics=["accuracy"], jit_compile=xla)
    logging.info("model %s: %d parameters, XLA %s", model.name, model.count_params(), xla)


@dataclasses.dataclass
class Run:
    """The training side of a run: the engine, the budget, the loop and its hooks
    (None where the config does not use them); after `fit`, what they measured."""

    engine: object
    budget: budget_lib.WallClockBudget
    training: Training
    planner: budget_lib.StepPlanner | None = None
    moving_average: MovingAverage | None = None
    early_stopping: keras.callbacks.EarlyStopping | None = None
    snapshots: SnapshotKeeper | None = None
    health: TrainingHealth | None = None
    divergence: DivergenceGuard | None = None
    checkpointer: checkpoint_lib.Checkpointer | None = None
    history: "HistoryWriter | None" = None

    def fit(self, resume=None):
        """Trains (see `haet.loop.Training.fit`, and its `resume`); returns `self`."""
        self.training.fit(resume)
        return self


def _end_epochs_before_divergence(run):
    """A diverged run's epochs that ended on the device before its first non-finite
    step, in the execution that diverged (it ran on past their ends), get their
    history rows: training loss and accuracy, learning rate, seconds. Nothing else
    acts on them: the weights of their ends are gone (the model holds the diverged
    ones), and an execution spans epochs only without validation or callbacks. The
    epochs that ended after that step are dropped, neither rows nor counted: they
    trained on a non-finite loss, and a diverged run is not resumed."""
    training, last = run.training, run.budget.executions[-1]
    first_step = run.budget.steps - last.steps  # of the run, before the last execution
    for end in run.engine.take_ended_epochs():
        if end.after_steps is None or first_step + end.after_steps >= run.divergence.step:
            break
        logs = dict(end.logs)
        training.ending = end
        try:
            run.budget.on_epoch_end(training, end.epoch, logs)
            run.history.on_epoch_end(training, end.epoch, logs)
        finally:
            training.ending = None


class HistoryWriter(Hook):
    """Appends each epoch's history row to the run folder's `history.csv` as the epoch
    ends (a resumed run first writes the rows its checkpoint kept)."""

    crosses_epochs = True

    def __init__(self, folder, budget):
        self.folder, self.budget = folder, budget

    def on_train_begin(self, run):
        self.folder.start_history(self.budget.history)

    def on_epoch_end(self, run, epoch, logs):
        self.folder.append_history(self.budget.history[-1], self.budget.history)


def _whitening_layers(model):
    """The `PatchWhitening` layers with a bias of `model`'s networks (each ensemble member's)."""
    return [layer for backbone in models.backbones_of(model) for layer in backbone.layers
            if isinstance(layer, PatchWhitening) and layer.bias is not None]


class FreezeWhiteningBias(Hook):
    """Stops the gradient of `PatchWhitening` biases from epoch `epochs` on (airbench
    trains it for the first 3 epochs), through their gate variables: nothing recompiles.
    A fraction of an epoch takes effect at the next epoch start (executions end there
    once, so that the epoch's first step already has it)."""

    crosses_epochs = True

    def __init__(self, layers, epochs):
        self.layers, self.epochs = list(layers), epochs
        self._frozen = False

    def limit(self, run):
        engine, first = run.engine, math.ceil(self.epochs)  # the first epoch without the bias's gradient
        if engine.epoch is None or engine.epoch >= first:
            return None
        return (first - engine.epoch) * engine.steps_per_epoch - engine.step_in_epoch

    def on_epoch_begin(self, run, epoch):
        if epoch >= self.epochs and not self._frozen:
            for layer in self.layers:
                run.engine.assign(layer.bias_gate, 0.0)
            self._frozen = True


def build_run(config, model, augmentation, schedule, data, folder, clock=time.perf_counter, timer=None,
              signals=None, extra_hooks=()):
    """The engine, budget and hooks that train `model` as `config` says.

    With precomputed augmentation the budget starts here: the augmented copies are
    made now (phase "precompute" of `timer`) and count toward it.

    Args:
        folder: the run's `haet.results.RunFolder` (history rows, checkpoints,
            TensorBoard logs).
        signals: a `haet.checkpoint.StopSignals` (its hook acts first), or None.
        extra_hooks: hooks acting after the built-in ones, before the planner and
            the checkpointer.

    Returns:
        `Run` (not yet fitted).
    """
    run_dir = folder.path
    steps_per_epoch = data.steps_per_epoch(config)
    affine = augmentation if isinstance(augmentation, augment.RandomAffine) else None
    budget = budget_lib.WallClockBudget(
        config.budget_seconds, schedule if schedule.unit == "budget" else None, augmentation=affine,
        augmentation_strength=augment.strength_schedule(config) if affine else None,
        fill_modes=config.fill_modes, seed=config.seed, clock=clock)
    images, copies = data.x_fit, 1
    if config.precomputed_augmentation_epochs:
        budget.begin()  # precomputed augmentation counts toward the budget
        with timer.phase("precompute") if timer else contextlib.nullcontext():
            mean = input_statistics(config, data.x_fit)[0]
            epochs = augment.precompute_epochs(data.x_fit, augmentation, config.precomputed_augmentation_epochs,
                                               255.0 * mean)
        images, copies = np.concatenate(epochs), len(epochs)
    if config.alternating_flip:
        images, copies = augment.alternating_flip_copies(data.x_fit, config.seed), 2
    one_hot = data.info.num_classes if config.label_smoothing else None
    # Lookahead first (it moves the weights), then the EMA of the weights it leaves.
    planned_by_steps = schedule.unit == "steps"
    lookahead = optimizers.make_lookahead(config, steps_per_epoch, planned_steps(config, steps_per_epoch) or None,
                                          schedule.planned_steps if planned_by_steps else None,
                                          schedule.plan_offset if planned_by_steps else None)
    average = optimizers.make_moving_average(config)
    engine = make_engine(model, images, data.y_fit, config.batch_size, seed=config.seed, one_hot_classes=one_hot,
                         steps_per_execution=config.steps_per_execution, copies=copies,
                         execution_loop=config.execution_loop, averages=[a for a in (lookahead, average) if a],
                         span_epochs=config.span_epochs)
    run = Run(engine, budget, training=None)
    hooks = [signals] if signals is not None else []
    run.divergence = DivergenceGuard()
    hooks.append(run.divergence)
    if config.validation_size:
        hooks.append(Validation(data.x_val, data.y_val, data.info.num_classes, config.eval_batch_size))
    if config.health_every_steps:
        probe = slice(0, config.batch_size)
        labels = data.y_fit[probe] if not one_hot else data_lib.one_hot(data.y_fit[probe], one_hot)
        loss, members = model.loss, config.ensemble_members
        if members > 1:
            # Every member's gradient on the same probe batch, each that of its own loss.
            loss = lambda y, logits: members * model.loss(y, logits)  # noqa: E731
        run.health = TrainingHealth(
            models.for_every_member(model, data.x_fit[probe]), models.for_every_member(model, labels), loss,
            config.health_every_steps, os.path.join(run_dir, "tensorboard", "health") if config.tensorboard else None)
        hooks.append(run.health)
    run.history = HistoryWriter(folder, budget)
    hooks += [budget, run.history]
    whitening = _whitening_layers(model)
    if config.model == "airbench" and config.whitening_bias_epochs and whitening:
        hooks.append(FreezeWhiteningBias(whitening, config.whitening_bias_epochs))
    if lookahead is not None:
        hooks.append(LookaheadEnd(lookahead))  # (before the EMA's: its raw weights are the lookahead's)
    if average is not None:
        recompute = (data.x_fit, config.batch_size) if config.ema_statistics == "recompute" else None
        run.moving_average = MovingAverage(average, recompute, clock)
        hooks.append(run.moving_average)
    callbacks = []
    if config.early_stopping_patience or config.keep_best:
        run.early_stopping = keras.callbacks.EarlyStopping(
            monitor="val_accuracy", mode="max", patience=config.early_stopping_patience or sys.maxsize,
            restore_best_weights=config.keep_best)
        callbacks.append(run.early_stopping)
    if config.tensorboard:
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(run_dir, "tensorboard"), write_graph=False))
    if callbacks:
        hooks.append(KerasCallbacks(callbacks, model, epochs=math.ceil(config.epochs) or None))
    if schedule.unit == "steps" and not config.epochs and getattr(schedule, "needs_plan", True):
        run.planner = budget_lib.StepPlanner(budget, schedule.planned_steps, steps_per_epoch,
                                             config.planner_probe_steps, config.planner_pace_window,
                                             plan_offset=schedule.plan_offset,
                                             step=optimizers.inner(model.optimizer).iterations)
    if config.snapshot_ensemble:
        planned = offset = None
        if run.planner:
            planned = lambda: run.planner.planned_steps_value  # noqa: E731
            offset = lambda: run.planner.plan_offset_value  # noqa: E731
        elif schedule.unit == "steps" and config.epochs:
            planned = lambda: planned_steps(config, steps_per_epoch)  # noqa: E731
        run.snapshots = SnapshotKeeper(schedules.cycle_ends(config), budget_lib.Progress(budget, planned, offset))
        hooks.append(run.snapshots)
    hooks += list(extra_hooks)
    if run.planner:
        hooks.append(run.planner)  # its epoch end measures the time the other hooks took
    run.checkpointer = checkpoint_lib.Checkpointer(folder, config.checkpoint_every)
    hooks.append(run.checkpointer)  # last: it saves what the others did
    if config.epochs != int(config.epochs):
        # A fraction of an epoch: stop inside the last one (its row says it was cut short).
        limit = StepLimit(planned_steps(config, steps_per_epoch))
        limit.reason = "epochs"
        hooks.insert(hooks.index(budget) + 1, limit)
    run.training = Training(engine, budget, hooks, epochs=math.ceil(config.epochs))
    return run


@dataclasses.dataclass(frozen=True)
class Evaluated:
    """Scores of the variants of the final model on one split.

    Attributes:
        scores: variant name -> `haet.evaluation.scores` dict (accuracy, loss,
            confusion matrix); names like "ema", "ema_tta_flip", "raw", "snapshot_ensemble".
        headline: the variant the run reports (the final weights, with the
            configured test-time augmentation).
        snapshot_accuracies: accuracy of each snapshot (empty without snapshots).
        member_scores: of an ensemble (`ensemble_members` > 1), each member's
            `haet.evaluation.scores` with the headline's weights and test-time
            augmentation (empty otherwise).
    """

    scores: dict
    headline: str
    snapshot_accuracies: list
    member_scores: list = dataclasses.field(default_factory=list)


def evaluate(config, model, data, run):
    """Scores of the final model and its variants on the validation split (when there
    is one) and the test set (unless `evaluate_test` is False).

    The final weights are named "ema" (moving average), "best" (keep_best) or
    "final"; next to EMA weights the raw ones are scored as "raw"; with snapshots,
    each snapshot and their ensemble ("snapshot_ensemble"); each also with the
    configured test-time augmentation ("<name>_tta_<mode>"). Weights other than the
    final ones are passed to the predictor, never written into the model.

    The headline is the final weights with the configured test-time augmentation;
    with EMA and a validation split, it is the one of "ema" and "raw" (with that
    augmentation) scoring higher on the validation split (ties: "ema"), never chosen
    on the test set; when that is "raw", the raw weights are written back into the
    model, so the saved model is the one the headline scores. An ensemble's
    variants are the ensemble's (the mean of its members' probabilities), and each
    member is also scored alone as the headline (`Evaluated.member_scores`), from
    the same pass over the images (`evaluation.predict_ensemble_probabilities`).

    Returns:
        dict split name ("validation", "test") -> `Evaluated`.
    """
    prefix = "ema" if config.ema_decay else "best" if config.keep_best else "final"

    def with_tta(base):
        return f"{base}_tta_{config.tta}" if config.tta != "none" else base

    splits = {}
    if config.validation_size:
        splits["validation"] = (data.x_val, data.y_val)
    if config.evaluate_test:
        splits["test"] = (data.dataset.x_test, data.dataset.y_test)
    final = current_weights(model)
    weights = {prefix: final}
    if run.moving_average is not None:
        weights["raw"] = run.moving_average.raw_weights
    snapshots = [w for _, w in run.snapshots.snapshots] if run.snapshots else []
    scored = {name: _evaluate_variants(config, model, x, y, data.info.num_classes, weights, snapshots)
              for name, (x, y) in splits.items()}
    headline, base = with_tta(prefix), prefix
    if run.moving_average is not None and "validation" in scored:
        validation = scored["validation"][0]
        if validation[with_tta("raw")]["accuracy"] > validation[headline]["accuracy"]:
            headline, base = with_tta("raw"), "raw"
            for variables, values in zip((model.trainable_variables, model.non_trainable_variables),
                                         run.moving_average.raw_weights):
                for variable, value in zip(variables, values):
                    variable.assign(value)
    return {name: Evaluated(scores, headline, snapshots, members.get(base, []))
            for name, (scores, snapshots, members) in scored.items()}


def _evaluate_variants(config, model, x, y, num_classes, weights, snapshots):
    """`(variants, snapshot accuracies, members)` on one split: the scores of each
    weights' variant, the accuracy of each snapshot, and of an ensemble, per weights'
    name, each member's scores with the configured test-time augmentation."""
    tta_modes = ["none"] + ([config.tta] if config.tta != "none" else [])
    ensemble = isinstance(model, models.EnsembleModel)

    def name(base, tta):
        return base if tta == "none" else f"{base}_tta_{tta}"

    def probabilities(w, tta):
        """The model's probabilities and, of an ensemble, each member's (one pass)."""
        if ensemble:
            return evaluation.predict_ensemble_probabilities(model, x, config.eval_batch_size, tta, weights=w)
        return evaluation.predict_probabilities(model, x, config.eval_batch_size, tta, weights=w), []

    variants, snapshot_accuracies, final, members = {}, [], {}, {}
    for base, w in weights.items():
        for tta in tta_modes:
            predicted, member_probabilities = probabilities(w, tta)
            final.setdefault(tta, predicted)  # the first weights are the final ones
            variants[name(base, tta)] = evaluation.scores(predicted, y, num_classes)
            if ensemble and tta == config.tta:
                members[base] = [evaluation.scores(p, y, num_classes) for p in member_probabilities]
    if snapshots:
        for tta in tta_modes:
            # The last snapshot is taken when training ends: the final weights, predicted above.
            member_scores, ensemble_scores = evaluation.ensemble(
                [probabilities(w, tta)[0] for w in snapshots[:-1]] + [final[tta]], y, num_classes)
            variants[name("snapshot_ensemble", tta)] = ensemble_scores
            if tta == "none":
                snapshot_accuracies = [m["accuracy"] for m in member_scores]
    return variants, snapshot_accuracies, members
