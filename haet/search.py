"""Hyperparameter search over any training flags, on Optuna, scored on a validation split.

    python -m haet.search --flagfile=flags/page_resnet9.flags --data_dir=../shared/data/cifar10 \
        --validation_size=1000 --budget=60 --trials=16 --sampler=tpe --pruner=successive_halving \
        --space=learning_rate=loguniform:0.01:1,weight_decay=loguniform:1e-5:1e-3 \
        --search_dir=results/search/resnet9_lr_wd

A thin layer over Optuna (Akiba et al. 2019, "Optuna: a next-generation hyperparameter
optimization framework"): every trial is a `haet.training.train` run of the base flags
with the trial's values, in its own run folder under `SEARCH_DIR/runs/`, with
`--validation_size` images held out of the training subset and
`evaluate_test=False`: trials are ranked by validation accuracy and never see the
test set. Evaluate the winner on the test set afterwards with `python -m haet.train`
and the printed flags.

- Samplers: `tpe` (default; Bergstra et al. 2011), `random` (Bergstra & Bengio
  2012) or `grid` (every combination; `--grid_points` values per numeric flag).
- Pruning: `--pruner=successive_halving` or `hyperband` (Li et al. 2018) stop
  trials whose validation accuracy at an epoch's end trails the others'; the
  resource is seconds of the trial's budget (each epoch end reports at its elapsed
  second), so a pruned trial used a fraction of its budget.
- The study lives in `SEARCH_DIR/study.db` (SQLite) unless `--storage` names
  another database: the same command again resumes it (finished trials count
  toward `--trials`), and several processes, or machines sharing one database
  URL (e.g. `postgresql://...`), run one study together; a worker that dies is
  noticed by the storage's heartbeat and its trial marked failed.
- An interrupted trial (Ctrl-C, SIGTERM, a worker that died) is not counted; the
  same command again, or a worker of the study still running once its trial ends,
  takes up its values first: its run goes on from its checkpoint on the rest of its
  budget (trials whose run is in another search folder, or with no checkpoint,
  train afresh), and the new trial's `retry_of` names it.
- TPE and random sampling draw trial N's values from `(--search_seed, N)`: one
  process's search is reproducible, and workers, and later runs of the command,
  draw new values (seeded once per process, each drew the first one's again).

`--space` entries, `name=kind:...` with `name` a training flag:
- `loguniform:LOW:HIGH`, `uniform:LOW:HIGH` (floats);
- `int:LOW:HIGH` (integers, ends included);
- `choice:A|B|C` (the listed values, cast to the flag's type).

The search folder holds `search.json` (the space, sampler, pruner, seed and base
flags, and the commit, versions, backend and device it began with; another search in
the same folder is refused), `study.db`, `trials.csv` (every trial: number, state,
values, validation accuracy, the run folder), `runs/`, and Optuna's figures
(`optimization_history.png`, `slice.png`, `intermediate_values.png` with a pruner,
`param_importances.png` with two or more flags).
"""

import dataclasses
import hashlib
import json
import logging as stdlib_logging
import math
import numbers
import os
import shlex
import socket
import sys
import time

import keras
import numpy as np
from absl import app, flags, logging

from haet import config as config_lib
from haet import checkpoint as checkpoint_lib
from haet import cli, data as data_lib, results, training
from haet.device import describe_device
from haet.loop import Hook

KINDS = ("loguniform", "uniform", "int", "choice")
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("none", "successive_halving", "hyperband")
# The task and the validation images are the same in every trial: a trial with other
# classes, another training subset or another split scored on other images (a 2-class
# trial's 50% beat the 10-class ones').
_NOT_SEARCHABLE = {"validation_size", "evaluate_test", "save_model", "data_dir", "dataset", "classes", "train_size",
                   "subset_seed"}
# The keys of search.json that define the search (compared on resume); the others
# (git_commit, versions, backend, device, command, created_utc) say where it began, and
# study_name names its study.
# `grid_points` counts only for the grid sampler and `min_resource_seconds` only with a
# pruner: otherwise they are None (a resume with another value of a setting that
# changes nothing is the same search; one that prunes another way is not).
# `data_sha256`: the training subset's hash (`haet.training.Data.subset_sha256`): the data
# are the same whatever the path to them (another spelling, another machine's folder),
# and `base_flags.data_dir` is then not part of the search (null).
SPEC_KEYS = ("space", "sampler", "pruner", "seed", "grid_points", "base_flags", "storage", "min_resource_seconds",
             "data_sha256")
# What an interrupted trial's run logs on how to go on (`haet.training.train` would say
# `python -m haet.train --resume=...`, which trains it outside the search: not counted).
RESUME_HINT = "run the same search command again: it resumes this trial's run"
# Optuna's heartbeat: a worker beats every HEARTBEAT_SECONDS; a running trial without a
# beat for GRACE_SECONDS is marked failed (its worker died).
HEARTBEAT_SECONDS, GRACE_SECONDS = 30, 120


def _optuna():
    try:
        import optuna
    except ImportError:
        raise ValueError("haet.search runs on Optuna: pip install optuna (or pip install 'haet[search]').") from None
    return optuna


def _cast(name, text):
    """`text` as the type of config field `name` (`haet.config.parse_value`); a list
    value separates its items with ";" (commas separate --space entries)."""
    return config_lib.parse_value(config_lib.FIELDS[name], text.replace(";", ","))


def parse_space(entries):
    """Parses `--space` entries (`name=kind:args`) into `{name: (kind, values)}`.

    Returns:
        dict flag name -> `(kind, (low, high))` for loguniform/uniform/int, or
        `("choice", (value, ...))` with values cast to the flag's type.

    Raises:
        ValueError: unknown flag, unsearchable flag, unknown kind or bad bounds,
            naming the entry.
    """
    space = {}
    for entry in entries:
        name, sep, spec = entry.partition("=")
        kind, _, args = spec.partition(":")
        if not sep or not args:
            raise ValueError(f"--space entry {entry!r} must look like name=kind:args, e.g. "
                             "learning_rate=loguniform:1e-4:1e-1 or optimizer=choice:adam|sgd.")
        name = config_lib.ALIASES.get(name, name)
        if name not in config_lib.FIELDS:
            raise ValueError(f"--space names {name!r}, which is not a training flag.")
        if name in _NOT_SEARCHABLE:
            raise ValueError(f"--space cannot search {name!r}: the search fixes it for every trial (the task and "
                             "the validation images are the same in each).")
        if kind not in KINDS:
            raise ValueError(f"--space entry {entry!r}: unknown kind {kind!r}. Allowed: {', '.join(KINDS)}.")
        if name in space:
            raise ValueError(f"--space names {config_lib.flag_name(name)} twice: give each flag one entry.")
        flag_type = config_lib.FIELDS[name].type
        # A range of another type than the flag's failed every trial but its ends
        # (batch_size=uniform:16:64 tried 42.34), or searched integer learning rates.
        allowed = {int: ("int", "choice"), float: ("uniform", "loguniform", "choice")}.get(flag_type, ("choice",))
        if kind not in allowed:
            raise ValueError(f"--space entry {entry!r}: --{config_lib.flag_name(name)} takes "
                             f"{ {int: 'integers', float: 'numbers'}.get(flag_type, 'values, not a range') }"
                             f": use {' or '.join(k + ':LOW:HIGH' if k != 'choice' else 'choice:A|B' for k in allowed)}.")
        if kind == "choice":
            values = tuple(_cast(name, v) for v in args.split("|"))
            if len(set(map(_choice_key, values))) != len(values):
                raise ValueError(f"--space entry {entry!r}: a choice is listed twice.")
        else:
            try:
                low, high = (float(v) for v in args.split(":"))
            except ValueError:
                raise ValueError(f"--space entry {entry!r}: {kind} takes LOW:HIGH numbers.") from None
            if not low < high or (kind == "loguniform" and low <= 0):
                raise ValueError(f"--space entry {entry!r}: needs LOW < HIGH"
                                 f"{' and LOW > 0' if kind == 'loguniform' else ''}.")
            if kind == "int" and not (low.is_integer() and high.is_integer()):
                raise ValueError(f"--space entry {entry!r}: int takes whole LOW:HIGH (they were cut to "
                                 f"{int(low)}:{int(high)}).")
            values = (int(low), int(high)) if kind == "int" else (low, high)
        space[name] = (kind, values)
    if not space:
        raise ValueError("--space is empty: name at least one flag to search, e.g. "
                         "--space=learning_rate=loguniform:1e-4:1e-1.")
    return space


def _choice_key(value):
    """A choice as Optuna stores it (None, bool, int, float or str)."""
    return ";".join(map(str, value)) if isinstance(value, tuple) else value


def grid_values(kind, values, points):
    """The grid of one flag: the choices, every integer, or `points` values evenly
    spaced on the log (loguniform) or linear scale, ends included."""
    if kind == "choice":
        return [_choice_key(v) for v in values]
    low, high = values
    if kind == "int":
        return list(range(low, high + 1))
    if kind == "loguniform":
        return [float(v) for v in np.geomspace(low, high, points)]
    return [float(v) for v in np.linspace(low, high, points)]


def suggest(trial, space):
    """The trial's values (flag name -> value of the flag's type), asked of Optuna."""
    values = {}
    for name, (kind, args) in space.items():
        if kind == "choice":
            keys = [_choice_key(v) for v in args]
            values[name] = args[keys.index(trial.suggest_categorical(name, keys))]
        elif kind == "int":
            values[name] = trial.suggest_int(name, *args)
        else:
            values[name] = trial.suggest_float(name, *args, log=kind == "loguniform")
    return values


def make_sampler(sampler, space, seed, grid_points=3):
    """The Optuna sampler named `sampler` (see `SAMPLERS`), seeded.

    TPE and random draw trial N's values from the seed `(seed, N)` (`_seeded_per_trial`), so
    that a search is reproducible and yet each worker, and each later run of the same
    command, draws new values; the grid's order of points is `seed`'s alone, as every
    worker must number the points alike.

    Raises:
        ValueError: an unknown name, `grid_points` < 2, or a seed that is not an
            integer in [0, 2**32 - 1] (NumPy's range).
    """
    optuna = _optuna()
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**32:
        raise ValueError(f"The search's seed (--search_seed) must be an integer in [0, 2**32 - 1]. Received: {seed!r}")
    seed = int(seed)
    if sampler == "tpe":
        return _seeded_per_trial(lambda s: optuna.samplers.TPESampler(seed=s), seed)
    if sampler == "random":
        return _seeded_per_trial(lambda s: optuna.samplers.RandomSampler(seed=s), seed)
    if sampler == "grid":
        if grid_points < 2:
            raise ValueError(f"grid_points must be >= 2. Received: {grid_points}")
        return optuna.samplers.GridSampler(
            {name: grid_values(kind, args, grid_points) for name, (kind, args) in space.items()}, seed=seed)
    raise ValueError(f"Unknown sampler {sampler!r}. Allowed: {', '.join(SAMPLERS)}.")


def _seeded_per_trial(make, seed):
    """An Optuna sampler that samples trial N with `make(seed of (seed, N))`.

    Why: Optuna seeds a sampler once per process, so a sampler given the same seed in
    every process (each worker of a shared study, each run of the same command that
    goes on with a study) drew the values that the first process drew, in the same
    order: TPE's first ten trials and every random trial were trained twice. A
    sampler's state is its random numbers alone (TPE reads the history from the study
    each time), so a fresh one per trial, seeded by the trial's number (unique in a
    study), keeps one process's search reproducible and makes the workers' differ.
    Each trial running keeps its own (`study.optimize(n_jobs=N)` runs N at once in
    threads: one shared sampler drew one trial's values from another's seed). Built
    here as Optuna is imported lazily (`_optuna`).
    """
    optuna = _optuna()

    class PerTrialSeed(optuna.samplers.BaseSampler):
        def __init__(self):
            self._inner = {}  # trial number -> its sampler, while it runs

        def _of(self, trial):
            if trial.number not in self._inner:
                self._inner[trial.number] = make(int(np.random.SeedSequence([seed, trial.number]).generate_state(1)[0]))
            return self._inner[trial.number]

        def before_trial(self, study, trial):
            self._inner.pop(trial.number, None)  # (a fresh one: the same number in another study)
            self._of(trial).before_trial(study, trial)

        def infer_relative_search_space(self, study, trial):
            return self._of(trial).infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, search_space):
            return self._of(trial).sample_relative(study, trial, search_space)

        def sample_independent(self, study, trial, param_name, param_distribution):
            return self._of(trial).sample_independent(study, trial, param_name, param_distribution)

        def after_trial(self, study, trial, state, values):
            self._of(trial).after_trial(study, trial, state, values)
            self._inner.pop(trial.number, None)

        def reseed_rng(self):
            for inner in list(self._inner.values()):
                inner.reseed_rng()

    return PerTrialSeed()


def make_pruner(pruner, budget_seconds, min_resource_seconds=None):
    """The Optuna pruner named `pruner` (see `PRUNERS`); its resource is seconds of a
    trial's budget. `min_resource_seconds`: the least a trial trains before it can
    be pruned (default: a tenth of the budget, at least 1 s).

    Raises:
        ValueError: an unknown name, `min_resource_seconds` not a positive number
            below the budget, or given with "none".
    """
    optuna = _optuna()
    if min_resource_seconds is not None and not (
            math.isfinite(min_resource_seconds) and 0 < min_resource_seconds < budget_seconds):
        raise ValueError(f"--min_resource_seconds must be a positive number of seconds below --budget="
                         f"{budget_seconds:g}. Received: {min_resource_seconds}")
    if min_resource_seconds is not None and pruner == "none":
        raise ValueError(f"--min_resource_seconds={min_resource_seconds:g} changes nothing with --pruner=none (no "
                         f"trial is pruned): pass --pruner={PRUNERS[1]} or {PRUNERS[2]}, or leave it out.")
    least = int(max(1, round(min_resource_seconds if min_resource_seconds else budget_seconds / 10)))
    if pruner == "none":
        return optuna.pruners.NopPruner()
    if pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=least, reduction_factor=3)
    if pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=least, max_resource=max(least + 1, int(budget_seconds)),
                                              reduction_factor=3)
    raise ValueError(f"Unknown pruner {pruner!r}. Allowed: {', '.join(PRUNERS)}.")


class ReportToTrial(Hook):
    """Reports each epoch's validation accuracy to an Optuna trial, at the epoch's
    elapsed second of the budget (the pruner's resource), and stops the run
    ("pruned") when the pruner says so. Place it after `haet.hooks.Validation`."""

    crosses_epochs = True  # it acts on validation logs, and validation ends executions with their epoch

    def __init__(self, trial, earlier=None):
        """`earlier`: of a trial that resumes an interrupted trial's run, the values
        ({step: accuracy}) reported in that run before (`_reported_before`); those up
        to the checkpoint's last reported step are reported again before the resumed
        run goes on, so that the pruner judges the whole run (the ones after it the
        resumed run reports anew)."""
        self.trial = trial
        self.earlier = dict(earlier or {})
        self.pruned = False
        self._last_step = -1

    def on_train_begin(self, run):
        for step, value in sorted(self.earlier.items()):
            if step <= self._last_step:
                self.trial.report(value, step)

    def on_epoch_end(self, run, epoch, logs):
        value = logs.get("val_accuracy")
        if value is None:
            return
        step = max(self._last_step + 1, int(run.budget.elapsed()))
        self._last_step = step
        self.trial.report(float(value), step)
        if self.trial.should_prune():
            self.pruned = True
            run.stop("pruned")

    def state_dict(self):
        return {"last_step": self._last_step, "pruned": self.pruned}

    def load_state_dict(self, state):
        # Pruned before the checkpoint written as training ended: a resume from it reports
        # nothing again, and the trial is still pruned (it was scored complete).
        self._last_step, self.pruned = state["last_step"], state.get("pruned", False)


class TrialFailed(Exception):
    """A trial's run ended without a score (diverged or failed); Optuna marks it failed."""


class _NoTracebackForTrialEnds(stdlib_logging.Filter):
    """Optuna logs a trial that raised with the exception's traceback. For a trial that
    failed for the reason its message gives (`TrialFailed`), or was interrupted (a
    KeyboardInterrupt, `TrialInterrupted`), the traceback holds only haet's own frames
    and buries that message; Optuna's one-line message stays (the search prints what
    to do next). A filter on Optuna's logger, as Optuna has no setting for it."""

    def filter(self, record):
        if record.exc_info and isinstance(record.exc_info[1], (TrialFailed, KeyboardInterrupt)):
            record.exc_info, record.exc_text = None, None
        return True


def _spec(base, space, sampler, pruner, seed, grid_points, storage=None, min_resource_seconds=None,
          data_sha256=None):
    """What defines the search (`SPEC_KEYS`); `storage`: the database URL, its
    password hidden, or None for the search folder's own; `data_sha256`: the training
    subset's hash, which stands for the data folder (None: the folder's path does, as
    in a search.json from before it was kept)."""
    spec = {"space": {k: [kind, list(v)] for k, (kind, v) in space.items()}, "sampler": sampler, "pruner": pruner,
            "seed": seed, "grid_points": grid_points, "base_flags": dataclasses.asdict(base), "storage": storage,
            "min_resource_seconds": None if min_resource_seconds is None else float(min_resource_seconds)}
    if data_sha256 is not None:
        spec["data_sha256"] = data_sha256
    return _normalized(json.loads(json.dumps(spec)))


# Every training setting's default, as search.json writes it (tuples as lists).
_DEFAULT_FLAGS = json.loads(json.dumps({name: field.default for name, field in config_lib.FIELDS.items()}))


def _normalized(spec):
    """`spec` written one way: its data folder without a trailing "/" (which made
    the same command another search), `grid_points` None unless the sampler is the
    grid and `min_resource_seconds` None without a pruner (they change nothing
    there; a search.json from before kept `grid_points` for every sampler).

    A setting that the base flags of a search.json written before it was added lack
    holds its default (the behaviour of the code that wrote it): each new setting
    made every search already begun "another search", refused the same command
    again. (A name this version does not know stays: `_claim_folder` refuses it.)"""
    flags_ = spec.get("base_flags")
    if isinstance(flags_, dict):
        spec = {**spec, "base_flags": {**_DEFAULT_FLAGS, **flags_}}
        flags_ = spec["base_flags"]
    if isinstance(flags_, dict) and spec.get("data_sha256") is not None:
        spec = {**spec, "base_flags": {**flags_, "data_dir": None}}  # the data are named by their hash
    elif isinstance(flags_, dict) and isinstance(flags_.get("data_dir"), str) and flags_["data_dir"]:
        spec = {**spec, "base_flags": {**flags_, "data_dir": os.path.normpath(flags_["data_dir"])}}
    if spec.get("sampler") != "grid":
        spec = {**spec, "grid_points": None}
    if spec.get("pruner") == "none":
        spec = {**spec, "min_resource_seconds": None}
    return spec


def study_name_of(spec):
    """The study's name: "haet" in the search folder's own database (one search a
    folder); in a shared `--storage`, "haet-" and a hash of the search, so that
    other searches in that database keep their own trials (every search was "haet":
    a second one counted the first one's trials and mixed its own with them).
    search.json keeps the name it was given (`_claim_folder`): a search that runs
    again opens that study, whatever the code's spec has become since."""
    if spec.get("storage") is None:
        return "haet"
    return "haet-" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


# The keys of the first searches in a shared storage, whose search.json has no
# study_name: their study is named from these.
_FIRST_SPEC_KEYS = ("space", "sampler", "pruner", "seed", "grid_points", "base_flags", "storage")


def _saved_study_name(saved):
    """The name of the study of a search.json's search (`saved`, as written)."""
    if isinstance(saved.get("study_name"), str):
        return saved["study_name"]
    if saved.get("storage") is None:
        return "haet"
    return study_name_of({k: saved.get(k) for k in _FIRST_SPEC_KEYS})


def _hidden_password(url):
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def check_space_counts(base, space):
    """Checks that every end of each range of `space` (and each choice) is a valid
    setting of `base`, and that every searched flag counts in the trials: one that
    the model, augmentation, schedule or optimizer of `base` does not read (searching
    `learning_rate` under `lr_schedule=wall_clock`, `momentum` with Adam) is refused,
    unless the space also searches the flag that chooses that kind. (Settings of
    `base` that change nothing are warned of by the command line, not refused.)

    Raises:
        ValueError: naming the flag, the choice that ignores it, and the fix.
    """
    for name, (kind, args) in space.items():
        for value in args:
            config = dataclasses.replace(base, **{name: value})
            selector = config.ignored_settings().get(config_lib.flag_name(name))
            if selector is not None and config_lib.ALIASES.get(selector, selector) not in space:
                raise ValueError(
                    f"--space searches {config_lib.flag_name(name)}, which changes nothing: --{selector}="
                    f"{getattr(config, config_lib.ALIASES.get(selector, selector))} does not use it. Search a "
                    f"flag the trials read, set --{selector} to a kind that reads it, or also search --{selector}.")


def check_search_dir(search_dir):
    """Checks that `search_dir` can hold a search: a new or empty folder (or a path where
    one can be made), or the folder of a search (with its search.json).

    Raises:
        ValueError: naming the path and the fix.
    """
    if not search_dir:
        raise ValueError("--search_dir is empty: pass --search_dir=FOLDER, a new folder or one of the same search.")
    results.check_results_dir(search_dir, "--search_dir")
    if os.path.exists(os.path.join(search_dir, "record.json")):
        raise ValueError(f"--search_dir={search_dir!r} is a training run's folder (it holds record.json): "
                         "pass a new folder, or one that holds this search.")
    # (Another worker starting on the same new folder may be writing search.json.)
    others = [n for n in os.listdir(search_dir) if not n.startswith(("search.json", ".study.lock"))] \
        if os.path.isdir(search_dir) else []
    if others and not os.path.exists(os.path.join(search_dir, "search.json")):
        raise ValueError(f"--search_dir={search_dir!r} holds other files and no search (no search.json): pass a "
                         "new or empty folder, or one that holds this search.")


def _claim_folder(search_dir, spec, by_path=None, write_by_path=False):
    """Writes `search.json`, or checks that the folder holds this search; returns the
    name of its study (`study_name_of`). `by_path`: the same spec with the data named
    by their folder, to compare with a search.json written before `data_sha256`, and
    to write in a new folder where `write_by_path` (a shared storage holds the study
    of that search begun before)."""
    os.makedirs(search_dir, exist_ok=True)
    path = os.path.join(search_dir, "search.json")
    if os.path.exists(path):
        try:
            with open(path) as f:
                written = json.load(f)
            saved = _normalized({"storage": None, "min_resource_seconds": None,  # (older searches: neither)
                                 **{k: v for k, v in written.items() if k in SPEC_KEYS}})
            study_name = _saved_study_name(written)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            raise ValueError(f"{path} is not a search's description ({type(e).__name__}: {e}): pass a new "
                             "--search_dir.") from None
        unknown = sorted(set(saved.get("base_flags") or ()) - set(_DEFAULT_FLAGS)) \
            if isinstance(saved.get("base_flags"), dict) else []
        if unknown:  # (a newer haet's, or one since removed: the trials would train otherwise)
            raise ValueError(f"{search_dir} holds a search with training settings this version of haet does not "
                             f"know ({', '.join(unknown)}; it was begun at commit {written.get('git_commit')}): run "
                             "it with the haet that began it, or use a new --search_dir.")
        if "data_sha256" not in saved and by_path is not None:
            spec = by_path
        if saved != spec:
            changed = sorted(k for k in set(saved) | set(spec) if saved.get(k) != spec.get(k))
            if "base_flags" in changed and isinstance(saved.get("base_flags"), dict):
                ours, theirs = spec["base_flags"], saved["base_flags"]
                names = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
                changed[changed.index("base_flags")] = f"base flags: {', '.join(map(config_lib.flag_name, names))}"
            raise ValueError(f"{search_dir} holds another search (different {', '.join(changed)}); "
                             "use a new --search_dir.")
        return study_name
    if write_by_path:
        spec = by_path
    provenance = {"git_commit": results.git_commit(), "versions": results.versions(),
                  "backend": keras.backend.backend(), "device": describe_device(), "command": sys.argv,
                  "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "w") as f:
        json.dump({**spec, "study_name": study_name_of(spec), **provenance}, f, indent=2, sort_keys=True)
    try:
        os.link(temporary, path)  # whole, and only if no other worker wrote it first
    except FileExistsError:
        os.remove(temporary)
        return _claim_folder(search_dir, spec, by_path, write_by_path)
    os.remove(temporary)
    return study_name_of(spec)


def open_study(search_dir, sampler, pruner, storage=None, study_name="haet"):
    """The search's Optuna study (created, or loaded to resume or to join).

    Args:
        storage: an Optuna storage; None: `sqlite:///SEARCH_DIR/study.db`, with a
            heartbeat so that a dead worker's trial is marked failed.
    """
    import fcntl

    optuna = _optuna()
    os.makedirs(search_dir, exist_ok=True)
    # Workers starting together would race to create the database's tables.
    with open(os.path.join(search_dir, ".study.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if storage is None:
            url = f"sqlite:///{os.path.abspath(os.path.join(search_dir, 'study.db'))}"
            storage = optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_SECONDS,
                                                 grace_period=GRACE_SECONDS,
                                                 engine_kwargs={"connect_args": {"timeout": 60}})
        return optuna.create_study(storage=storage, study_name=study_name, sampler=sampler, pruner=pruner,
                                   direction="maximize", load_if_exists=True)


# Every trial trains on the dataset read once, before the first trial (it was read
# again for each trial).
@data_lib.datasets_kept()
def run_search(base, space, search_dir, trials, sampler="tpe", pruner="none", seed=0, grid_points=3,
               storage=None, min_resource_seconds=None, train=training.train, load_data=training.prepare_data):
    """Runs trials of one study until it has `trials` finished ones (or, with the grid
    sampler, the grid is done); returns the study. Several processes may run this
    at once on one search folder (or one `storage`); each finished trial counts.
    Interrupted trials are taken up again first (`_take_up_interrupted`). Trial N's
    run is in `search_dir/runs/trial_N/` (a trial that resumes an interrupted trial's
    run: that run's folder).

    Args:
        base: `TrainConfig` every trial starts from; needs `validation_size` > 0.
        space: from `parse_space`.
        search_dir: the search folder (created, or resumed if it holds the same search).
        trials: finished trials (complete, pruned or failed) the study should have.
        sampler, pruner: see `SAMPLERS`, `PRUNERS`.
        train: the training function (tests may pass a stand-in with its signature;
            it is passed `resume` only when a trial resumes a run).
        load_data: loads the data of a config, called once before anything is written
            to check them (tests of a stand-in `train` may pass a stand-in). The
            dataset it reads is the one every trial's run trains on
            (`haet.data.datasets_kept`): the files are read once.

    Raises:
        ValueError: `validation_size` 0, a searched value the config refuses or that
            changes nothing (`check_space_counts`), data
            or an `init_from` model that cannot be loaded, a `search_dir` that `check_search_dir` refuses or
            that holds another search: before the folder or the study is written.
    """
    optuna = _optuna()
    if not base.validation_size:
        raise ValueError("A search scores trials on a validation split of the training subset: "
                         "set --validation_size (e.g. 1000), never the test set.")
    if trials < 1:
        raise ValueError(f"trials must be >= 1. Received: {trials}")
    base = dataclasses.replace(base, evaluate_test=False, save_model=False)
    check_space_counts(base, space)
    study_sampler = make_sampler(sampler, space, seed, grid_points)
    study_pruner = make_pruner(pruner, base.budget_seconds, min_resource_seconds)
    check_search_dir(search_dir)
    url = None
    if isinstance(storage, str):  # opened before the folder is claimed: a bad URL writes nothing
        url = storage
        if ":memory:" in url or url.rstrip("/") == "sqlite:":
            raise ValueError(f"--storage={url!r} keeps the study in memory: it would be lost with this process "
                             "and shared with no worker; leave --storage out for the search folder's study.db.")
        try:
            # With the heartbeat: a dead worker's trial is marked failed (without it, never).
            storage = optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_SECONDS,
                                                 grace_period=GRACE_SECONDS)
        except Exception as e:  # SQLAlchemy and Optuna raise many kinds for a bad URL
            first = (str(e).strip().splitlines() or [""])[0][:200]
            hint = "; a file is sqlite:////absolute/path.db" if "://" not in url else ""
            raise ValueError(f"--storage={url!r} cannot be opened ({type(e).__name__}: {first}){hint}.") from None
    try:  # the data every trial trains on, and a model to fine-tune from, before the folder or the study is written
        data = load_data(base)
        training.load_init_from(base)
    except RuntimeError as e:  # no local copy, and tensorflow-datasets cannot give one
        raise ValueError(str(e)) from None
    spec_args = (base, space, sampler, pruner, seed, grid_points, None if url is None else _hidden_password(url),
                 min_resource_seconds)
    spec, by_path = _spec(*spec_args, data_sha256=getattr(data, "subset_sha256", None)), _spec(*spec_args)
    # A worker of a search begun before the data were named by their hash joins its
    # study, named by the path, where it began another one.
    joins = url is not None and spec != by_path and study_name_of(by_path) in optuna.study.get_all_study_names(storage)
    study_name = _claim_folder(search_dir, spec, by_path, joins)
    try:
        study = open_study(search_dir, study_sampler, study_pruner, storage, study_name)
    except Exception as e:  # a damaged study.db: SQLAlchemy's errors, of many kinds
        if not type(e).__module__.startswith(("sqlalchemy", "optuna")):
            raise
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"The search's study cannot be opened ({type(e).__name__}: {first}): its database "
                         f"({_hidden_password(url) if url else os.path.join(search_dir, 'study.db')}) is damaged; "
                         "pass a new --search_dir.") from None
    runs_dir = os.path.join(search_dir, "runs")
    commit = results.git_commit()

    signalled = []  # a stop signal that came after a trial's training ended

    def objective(trial):
        # False until the trial's outcome is known: a worker that dies (SIGKILL, a lost
        # machine) leaves it so, and once Optuna's heartbeat marks its trial failed the
        # trial is not counted (`finished_trials`): the same command replaces it.
        trial.set_user_attr("ended", False)
        try:
            return run_trial(trial)
        except KeyboardInterrupt:  # (its run's, `TrialInterrupted`, and one before its run began)
            trial.set_user_attr("interrupted", True)  # failed, but not counted as a finished trial
            raise
        finally:
            trial.set_user_attr("ended", True)

    def run_trial(trial):
        values = suggest(trial, space)  # (a trial that takes up an interrupted one has its values already)
        retry_of, resume_dir = trial.user_attrs.get("retry_of"), trial.user_attrs.get("resume_dir")
        logging.info("trial %d: %s%s", trial.number, {k: _short(v) for k, v in values.items()},
                     "" if retry_of is None else f" (interrupted trial {retry_of} again" +
                     (f", resumed from {resume_dir})" if resume_dir else ", afresh)"))
        trial.set_user_attr("git_commit", commit)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        every = study.get_trials(deepcopy=False) if retry_of is not None else []
        if retry_of is not None:
            # Workers in other folders of a shared storage hold other locks: two may have
            # queued the same interrupted trial. The first queued runs; the others end at
            # once, not counted (`finished_trials`).
            first = min(t.number for t in every if t.user_attrs.get("retry_of") == retry_of)
            if first != trial.number:
                trial.set_user_attr("duplicate_of", first)
                raise TrialFailed(f"trial {first} already takes up interrupted trial {retry_of}")
        try:
            config = dataclasses.replace(base, **values)
        except ValueError as e:
            raise TrialFailed(f"the settings do not check: {e}") from None
        # Each trial's run in a folder of its own, so that a trial whose worker died can be
        # resumed from its run's checkpoint (`_trial_run_folder`).
        trial_runs = os.path.join(runs_dir, f"trial_{trial.number}")
        try:
            record = run_dir = None
            if resume_dir:
                trial.set_user_attr("run_dir", resume_dir)  # (known at once: a killed worker's is found)
                reporter = ReportToTrial(trial, _reported_before(every, retry_of)) if pruner != "none" else None
                try:
                    record, run_dir = train(config, results_dir=trial_runs, hooks=[reporter] if reporter else [],
                                            resume=os.path.join(search_dir, resume_dir), resume_hint=RESUME_HINT)
                except training.SetupError as e:  # e.g. a checkpoint of code that built another model
                    logging.warning("trial %d cannot resume %s (%s): it trains afresh", trial.number, resume_dir, e)
                    trial.set_user_attr("run_dir", None)
                    trial.set_user_attr("resume_dir", None)  # (it resumes no run: `_reported_before`)
            if record is None:
                reporter = ReportToTrial(trial) if pruner != "none" else None
                record, run_dir = train(config, results_dir=trial_runs, hooks=[reporter] if reporter else [],
                                        resume_hint=RESUME_HINT)
        except training.SetupError as e:  # e.g. a searched precision this machine cannot take
            trial.set_user_attr("status", "could not start")
            raise TrialFailed(f"the run could not start: {e}") from None
        # A stop signal now (its run has ended) waits for the trial's result: it was marked
        # interrupted, uncounted, and its finished run trained again.
        with cli.StopSignalsHeld(f"trial {trial.number}'s result") as held:
            trial.set_user_attr("run_dir", os.path.relpath(run_dir, search_dir))
            for key in ("status", "epochs", "steps", "train_seconds", "stopped_by"):
                trial.set_user_attr(key, record.get(key))
        late = record.get("signal_after_training") or held.received
        if late:
            # A stop signal after the run's training ended: the trial ends as its run did,
            # and the search stops after it, as if the signal had come between trials.
            signalled.append(TrialInterrupted(trial.number, late, after_training=True))
            study.stop()
        if record["status"] == "interrupted":
            raise TrialInterrupted(trial.number, record.get("interrupted_by"))
        if record["status"] != "completed":
            raise TrialFailed(f"the run {record['status']}: {record.get('error') or record.get('diverged_at_step')}")
        if reporter is not None and reporter.pruned:
            raise optuna.TrialPruned(f"pruned after {record['train_seconds']:.1f} s")
        return record["validation_accuracy"]

    def stop_when_done(study, trial=None):
        if finished_trials(study) >= trials:
            study.stop()
        else:  # another worker's trial interrupted meanwhile, or its worker dead
            _fail_stale_trials(study)
            _take_up_interrupted(study, search_dir, trials)

    _fail_stale_trials(study)
    _take_up_interrupted(study, search_dir, trials)
    if finished_trials(study) < trials:
        quiet, optuna_logger = _NoTracebackForTrialEnds(), stdlib_logging.getLogger("optuna.study._optimize")
        optuna_logger.addFilter(quiet)  # (the logger of Optuna's "Trial N failed" lines)
        try:
            # The grid sampler stops the study once every point has a trial, an interrupted
            # one too, before the callback queues that one again: optimize once more for it.
            while True:
                study.optimize(objective, callbacks=[stop_when_done], catch=(TrialFailed,))
                if signalled:
                    raise signalled[0]
                if finished_trials(study) >= trials or not study.get_trials(
                        deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
                    break
        except KeyboardInterrupt as e:
            raise SearchInterrupted(study, e) from None
        finally:
            optuna_logger.removeFilter(quiet)
    elif finished_trials(study, running=False) < trials:
        _say_running(study)
    return study


def _reported_before(trials, number):
    """The values ({step: accuracy}) reported in the run of trial `number`: its own, and
    those of the interrupted trials whose run it resumed in turn (`retry_of` with a
    `resume_dir`; not across a trial that trained afresh), the latest report of a step
    kept. A trial interrupted before its resumed run reported again holds none."""
    by_number = {t.number: t for t in trials}
    chain = []
    while number is not None and number in by_number and number not in chain:
        chain.append(number)
        if not by_number[number].user_attrs.get("resume_dir"):
            break  # (its run began with it)
        number = by_number[number].user_attrs.get("retry_of")
    values = {}
    for n in reversed(chain):  # the oldest first
        values.update(by_number[n].intermediate_values)
    return values


def _trial_run_folder(search_dir, trial):
    """The run folder of `trial` (an Optuna FrozenTrial) in `search_dir`, or None:
    the one its attributes name, or the one in its own `runs/trial_N` (the trial of
    a worker that died before its run ended named none)."""
    if trial.user_attrs.get("run_dir"):
        return os.path.join(search_dir, trial.user_attrs["run_dir"])
    parent = os.path.join(search_dir, "runs", f"trial_{trial.number}")
    folders = [os.path.join(parent, n) for n in sorted(os.listdir(parent))] if os.path.isdir(parent) else []
    folders = [f for f in folders if os.path.exists(os.path.join(f, "record.json"))]
    return folders[0] if len(folders) == 1 else None


def _take_up_interrupted(study, search_dir, trials):
    """Queues each interrupted trial (a signal, or a worker that died) again, up to the
    trials the study still needs: the same values, resumed from its run's checkpoint
    when it has one (on the rest of its budget), trained afresh otherwise.

    Why: such a trial is not counted (`finished_trials`), and a new one was sampled
    instead: its values were never scored, and under the grid sampler, which counts
    every ended trial's point as visited, its point was lost from the grid. Each is
    added once, as Optuna's `RetryHeartbeatStaleTrialCallback` adds a dead worker's
    trial (a waiting trial with its values and the sampler's system attributes: its
    grid point), with `retry_of` naming it; under the search folder's lock, so that workers
    starting together add it once (workers in other folders of a shared storage
    may add it twice: the later copy ends at once, uncounted, in `run_search`).
    Called as a worker starts and after each of its trials."""
    import fcntl

    optuna = _optuna()
    with open(os.path.join(search_dir, ".study.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        every = study.get_trials(deepcopy=False)
        taken = {t.user_attrs.get("retry_of") for t in every}
        needed = trials - finished_trials(study) - sum(t.state.name == "WAITING" for t in every)
        for t in sorted(every, key=lambda t: t.number):
            if needed <= 0:
                break
            interrupted = t.state.name == "FAIL" and (t.user_attrs.get("interrupted") or
                                                      t.user_attrs.get("ended") is False)
            if not interrupted or t.number in taken or not t.params:
                continue
            folder, resume_dir = _trial_run_folder(search_dir, t), None
            if folder is not None:
                try:
                    checkpoint_lib.resumable(folder)
                    resume_dir = os.path.relpath(folder, search_dir)
                except ValueError as e:
                    logging.info("trial %d's run cannot be resumed (%s)", t.number, e)
            # Of the system attributes, the sampler's (the grid's point); not the pruner's
            # (`completed_rung_*`), which would count the interrupted trial's values twice in
            # a rung, or, under Hyperband, put them in another bracket's.
            kept = {k: v for k, v in t.system_attrs.items() if k in ("grid_id", "search_space", "fixed_params")}
            study.add_trial(optuna.trial.create_trial(
                state=optuna.trial.TrialState.WAITING, params=t.params, distributions=t.distributions,
                user_attrs={"retry_of": t.number, "resume_dir": resume_dir},
                system_attrs={**kept, "failed_trial": t.system_attrs.get("failed_trial", t.number),
                              "retry_history": [*t.system_attrs.get("retry_history", []), t.number]}))
            logging.info("trial %d was interrupted: its values go again, %s", t.number,
                         f"resumed from {resume_dir}" if resume_dir else "afresh (no checkpoint to resume)")
            needed -= 1


def _fail_stale_trials(study):
    """Marks failed the running trials whose worker stopped beating (Optuna's
    heartbeat). Optuna does it inside `optimize` only, which a search whose count a
    dead worker's trial fills never reached: the rerun of a killed search did nothing."""
    import warnings

    optuna = _optuna()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _say_running(study):
    """Logs the running trials that fill the study's count (other workers', or a dead
    worker's not yet marked failed)."""
    for t in study.get_trials(deepcopy=False):
        if t.state.name != "RUNNING":
            continue
        worker = str(t.user_attrs.get("worker") or "?")
        host, _, pid = worker.rpartition(":")
        dead = host == socket.gethostname() and pid.isdigit() and not checkpoint_lib.alive(int(pid))
        logging.warning("trial %d is running (worker %s%s) and counts toward --trials: %s", t.number, worker,
                        ", no longer alive" if dead else "",
                        f"Optuna marks a dead worker's trial failed {GRACE_SECONDS} s after its last heartbeat; "
                        "run this command again then to replace it" if dead else
                        "this worker has nothing left to run")


class TrialInterrupted(KeyboardInterrupt):
    """A trial's run stopped by a signal (`signal_name`, e.g. "SIGTERM"; its record
    says "interrupted"), or, `after_training`, a signal that came after its training
    ended: the run went on to its end, and the search stops after the trial."""

    def __init__(self, number, signal_name, after_training=False):
        super().__init__(f"{signal_name} after trial {number}'s training ended: the search stops after it"
                         if after_training else f"trial {number} interrupted by {signal_name}")
        self.number, self.signal_name, self.after_training = number, signal_name, after_training


class SearchInterrupted(KeyboardInterrupt):
    """A search stopped by a signal (Ctrl-C, SIGTERM): the study as it stands and the
    interruption (a trial's names its signal)."""

    def __init__(self, study, interruption):
        super().__init__(str(interruption))
        self.study, self.interruption = study, interruption


def finished_trials(study, running=True):
    """Trials that count toward `--trials`: complete, pruned, failed (not those an
    interruption ended, nor those of a worker that died, nor a second take-up of the
    same interrupted trial) and, with `running`, those other workers are running."""
    counted = 0
    for t in study.get_trials(deepcopy=False):
        state = t.state.name
        if state in ("COMPLETE", "PRUNED") or (state == "RUNNING" and running) or (
                state == "FAIL" and not t.user_attrs.get("interrupted") and t.user_attrs.get("ended", True)
                and t.user_attrs.get("duplicate_of") is None):
            counted += 1
    return counted


def _short(value):
    return float(f"{value:.4g}") if isinstance(value, float) else value


def trial_rows(study, space):
    """One dict per trial of `study`, by trial number: trial, state, each flag's
    value, validation_accuracy, epochs, train_seconds, stopped_by, run_dir, git_commit, and
    retry_of (the interrupted trial a trial took up again, or None)."""
    rows = []
    for t in sorted(study.trials, key=lambda t: t.number):
        row = {"trial": t.number, "state": t.state.name.lower()}
        row.update({name: t.params.get(name) for name in space})
        row["validation_accuracy"] = t.value if t.state.name == "COMPLETE" else None
        last = max(t.intermediate_values.items())[1] if t.intermediate_values else None
        row["last_reported_accuracy"] = last
        for key in ("epochs", "train_seconds", "stopped_by", "status", "run_dir", "git_commit", "retry_of"):
            row[key] = t.user_attrs.get(key)
        if t.state.name == "FAIL" and t.user_attrs.get("ended") is False:
            row["status"] = "worker died"
        elif t.state.name == "FAIL" and t.user_attrs.get("interrupted"):
            row["status"] = "interrupted"  # (a Ctrl-C between the run's steps leaves no record to say so)
        elif t.user_attrs.get("duplicate_of") is not None:
            row["status"] = f"trial {t.user_attrs['duplicate_of']} took it up"
        rows.append(row)
    return rows


def write_trials_csv(rows, path):
    """Writes the trials (`trial_rows`) to `path` (a derived file, rewritten each time)."""
    results.write_rows(path, rows)
    return path


def write_figures(study, space, search_dir, title):
    """Optuna's figures of the study, as PNG files in `search_dir`; returns their paths.
    A figure Optuna cannot draw yet (too few trials) is skipped with a log line; before a
    trial completes, only the intermediate values (of a pruned search) are drawn."""
    import warnings

    import optuna.visualization.matplotlib as plots

    from haet.plots import _pyplot

    plt = _pyplot()
    figures = {}
    if any(t.state.name == "COMPLETE" for t in study.trials):  # (without, Optuna draws empty axes, and warns)
        figures = {"optimization_history": plots.plot_optimization_history, "slice": plots.plot_slice}
    if any(t.intermediate_values for t in study.trials):
        figures["intermediate_values"] = plots.plot_intermediate_values
    if len(space) >= 2 and "slice" in figures:
        figures["param_importances"] = plots.plot_param_importances
    written = []
    for name, plot in figures.items():
        path = os.path.join(search_dir, f"{name}.png")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                axes = plot(study)
            figure = (axes.flat[0] if isinstance(axes, np.ndarray) else axes).get_figure()
            figure.suptitle(title, fontsize=9)
            figure.set_size_inches(max(6.4, 4.0 * len(space) if name == "slice" else 6.4), 4.8)
            figure.tight_layout()
            figure.savefig(path, dpi=110)
            plt.close(figure)
            written.append(path)
        except (ValueError, RuntimeError, ZeroDivisionError) as e:
            logging.info("no %s figure: %s", name, e)
    return written


def _state(row):
    """A `trial_rows` row's state as the table shows it: why a trial failed (its run's
    status: interrupted, diverged..., or its worker died), and the interrupted trial it
    took up again."""
    state = row["state"]
    if state == "fail" and row["status"] and row["status"] != "completed":
        state += f" ({row['status']})"
    if row["retry_of"] is not None:
        state += f", trial {row['retry_of']} again"
    return state


def format_table(rows, names):
    """The trials as a fixed-width text table, best first (values to 4 significant digits)."""
    header = ["trial", *names, "val acc", "epochs", "seconds", "state"]

    def accuracy(r):
        return r["validation_accuracy"] if r["validation_accuracy"] is not None else -1.0

    lines = [header]
    for r in sorted(rows, key=lambda r: (-accuracy(r), r["trial"])):
        acc = f"{100 * r['validation_accuracy']:.2f}%" if r["validation_accuracy"] is not None else (
            f"({100 * r['last_reported_accuracy']:.2f}%)" if r["last_reported_accuracy"] is not None else "-")
        seconds = f"{r['train_seconds']:.1f}" if r["train_seconds"] is not None else "-"
        lines.append([r["trial"], *[str(_short(r[n])) for n in names], acc, r["epochs"] or "-", seconds, _state(r)])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(c).rjust(w) for c, w in zip(line, widths)) for line in lines)


def best_summary(study, space, num_classes):
    """The best trial's flags (exact values) and score, with a warning when it is at
    chance level; None without a completed trial."""
    completed = [t for t in study.trials if t.state.name == "COMPLETE"]
    if not completed:
        return None
    best = max(completed, key=lambda t: t.value)

    def flag(name):
        """`--name=value` as a shell takes it: a list value comma-separated, as the
        flag parses it (Optuna keeps it joined by ";", which ended the command)."""
        value = best.params[name]
        if space[name][0] == "choice" and isinstance(value, str) and config_lib.FIELDS[name].type is tuple:
            value = value.replace(";", ",")
        return shlex.quote(f"--{config_lib.flag_name(name)}={value}")

    text = ("best: trial %d: " % best.number + " ".join(flag(n) for n in space)
            + f"  (validation accuracy {100 * best.value:.2f}%)")
    chance = 1.0 / num_classes
    if best.value <= 1.5 * chance:
        text += (f"\nWARNING: the best validation accuracy is near chance ({100 * chance:.0f}%): no trial "
                 "learned; widen the space, lengthen --budget or check the data.")
    return text


def main(argv):
    del argv  # (haet.cli.run refuses arguments other than flags)
    from haet import data as data_lib

    f = flags.FLAGS
    interrupted = None
    cli.refuse_unread({"resume": "run the same search command again: it resumes its interrupted trial's run.",
                       "results_dir": "the trials' runs go under --search_dir/runs."})
    try:
        if f["grid_points"].present and f.sampler != "grid":
            raise ValueError(f"--grid_points={f.grid_points} changes nothing with --sampler={f.sampler} (it sets "
                             "the grid sampler's values per flag): pass --sampler=grid, or leave it out.")
        space = parse_space(f.space)
        base = config_lib.config_from_flags(f)
        config_lib.warn_ignored_settings(base)
        study = run_search(base, space, f.search_dir, f.trials, f.sampler, f.pruner, f.search_seed,
                           f.grid_points, f.storage, f.min_resource_seconds)
    except ValueError as e:
        raise app.UsageError(str(e), exitcode=cli.USAGE_ERROR) from None
    except SearchInterrupted as e:  # the study so far is printed and written, then the signal's exit status
        study, interrupted = e.study, e.interruption
    names = list(space)
    rows = trial_rows(study, space)
    # Printed before the files are written: a full disk loses the files, not the results.
    print(format_table(rows, names))
    summary = best_summary(study, space, data_lib.check_config(base).num_classes)
    if summary:
        print(summary)
    sys.stdout.flush()
    try:
        write_trials_csv(rows, os.path.join(f.search_dir, "trials.csv"))
        write_figures(study, space, f.search_dir,
                      f"{base.model} on {base.dataset} ({base.train_size - base.validation_size} train / "
                      f"{base.validation_size} validation images), {base.budget_seconds:g} s per trial, "
                      f"{f.sampler}, pruner {f.pruner}")
    except OSError as e:
        cli.not_written(f"the search's trials.csv or figures in {f.search_dir}", e)
    print(f"wrote {f.search_dir}")
    if interrupted is not None:
        if getattr(interrupted, "after_training", False):
            print(f"stopped ({interrupted}; the trial counts): run the same command again to go on", file=sys.stderr)
        else:
            print(f"interrupted ({str(interrupted) or type(interrupted).__name__}); the interrupted trial is not "
                  "counted: run the same command again to go on (it takes up that trial's values again, resumed "
                  "from its run's checkpoint when it has one)", file=sys.stderr)
        # By the signal, as haet.train ends: a shell loop of searches stops.
        cli.exit_by_signal(getattr(interrupted, "signal_name", None))
    sys.stdout.flush()


if __name__ == "__main__":
    import haet.train  # noqa: F401 -- defines the training flags (--flagfile recipes work)

    flags.DEFINE_list("space", [], "Flags to search: name=loguniform:LOW:HIGH, name=uniform:LOW:HIGH, "
                      "name=int:LOW:HIGH or name=choice:A|B|C, comma-separated.")
    flags.DEFINE_enum("sampler", "tpe", list(SAMPLERS), "Optuna sampler: TPE, random, or the full grid.")
    flags.DEFINE_enum("pruner", "none", list(PRUNERS), "Stop trials that trail at an epoch's end; resource: "
                      "seconds of the trial's budget.")
    flags.DEFINE_float("min_resource_seconds", None, "Pruners: seconds a trial trains before it can be pruned "
                       "(default: a tenth of --budget).")
    flags.DEFINE_integer("trials", 8, "Finished trials the study should have (all workers together); a worker "
                         "starting when one is short may add one more.")
    flags.DEFINE_integer("grid_points", 3, "grid: values per loguniform/uniform flag.")
    flags.DEFINE_integer("search_seed", 0, "Seed of the sampler, in [0, 2**32 - 1]: TPE and random draw trial N "
                         "from (seed, N); the grid orders its points with it.")
    flags.DEFINE_string("search_dir", None, "The search folder; an existing one with the same search resumes.")
    flags.DEFINE_string("storage", None, "Optuna storage URL shared by workers (default: sqlite in --search_dir).")
    flags.mark_flag_as_required("search_dir")
    cli.run(main)
