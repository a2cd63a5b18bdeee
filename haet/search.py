"""Hyperparameter search over any training flags, scored on a validation split.

    python -m haet.search --flagfile=flags/page_resnet9.flags --data_dir=../shared/data/cifar10 \
        --validation_size=1000 --budget=60 --method=random --trials=8 \
        --space=learning_rate=loguniform:0.01:1,weight_decay=loguniform:1e-5:1e-3 \
        --search_dir=results/search/resnet9_lr_wd

Every trial is a `haet.training.train` run of the base flags with the trial's values,
its own `--budget`, `--validation_size` images held out of the training subset and
`evaluate_test=False`: trials are ranked by validation accuracy and never see the
test set (Bergstra & Bengio 2012, "Random search for hyper-parameter optimization";
log-uniform draws for scale parameters). Evaluate the winner on the test set
afterwards with `python -m haet.train` and the printed flags.

`--space` entries, `name=kind:...` with `name` a training flag:
- `loguniform:LOW:HIGH`, `uniform:LOW:HIGH` (floats; grid: `--grid_points` values,
  evenly spaced on the log / linear scale, ends included);
- `int:LOW:HIGH` (integers, ends included; grid: every integer);
- `choice:A|B|C` (the listed values, cast to the flag's type).

The search folder holds `search.json` (the space, method, seed and base flags, and
the git commit, versions, backend and device it began with), `trials.csv` (one row
per finished trial, appended as each one ends, with the commit that ran it), `runs/` (each
trial's run folder), `search.png`. Running the same command again resumes: trials
already in `trials.csv` are skipped (the trial list is a function of the search
spec, so trial k is the same draw); a different spec for an existing folder is an
error, never an overwrite.
"""

import csv
import dataclasses
import itertools
import json
import math
import os
import sys
import time

import keras
import numpy as np
from absl import app, flags, logging

from haet import config as config_lib
from haet import results, training
from haet.device import describe_device

KINDS = ("loguniform", "uniform", "int", "choice")
_NOT_SEARCHABLE = {"validation_size", "evaluate_test", "save_model", "data_dir", "dataset"}


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
            raise ValueError(f"--space cannot search {name!r}: the search fixes it for every trial.")
        if kind not in KINDS:
            raise ValueError(f"--space entry {entry!r}: unknown kind {kind!r}. Allowed: {', '.join(KINDS)}.")
        if kind == "choice":
            values = tuple(_cast(name, v) for v in args.split("|"))
        else:
            try:
                low, high = (float(v) for v in args.split(":"))
            except ValueError:
                raise ValueError(f"--space entry {entry!r}: {kind} takes LOW:HIGH numbers.")
            if not low < high or (kind == "loguniform" and low <= 0):
                raise ValueError(f"--space entry {entry!r}: needs LOW < HIGH{' and LOW > 0' if kind == 'loguniform' else ''}.")
            values = (int(low), int(high)) if kind == "int" else (low, high)
        space[name] = (kind, values)
    if not space:
        raise ValueError("--space is empty: name at least one flag to search, e.g. "
                         "--space=learning_rate=loguniform:1e-4:1e-1.")
    return space


def _grid_values(kind, values, points):
    if kind == "choice":
        return list(values)
    low, high = values
    if kind == "int":
        return list(range(low, high + 1))
    if kind == "loguniform":
        return [float(v) for v in np.geomspace(low, high, points)]
    return [float(v) for v in np.linspace(low, high, points)]


def make_trials(space, method, trials, seed, grid_points=3):
    """The list of trials (dicts flag name -> value), a function of its arguments only.

    random: `trials` independent draws from `np.random.default_rng(seed)`;
    grid: the Cartesian product of each flag's grid values (`trials` ignored).

    Raises:
        ValueError: unknown method, `trials` < 1 for random, `grid_points` < 2.
    """
    if method == "grid":
        if grid_points < 2:
            raise ValueError(f"grid_points must be >= 2. Received: {grid_points}")
        names = list(space)
        axes = [_grid_values(*space[n], grid_points) for n in names]
        return [dict(zip(names, combo)) for combo in itertools.product(*axes)]
    if method != "random":
        raise ValueError(f"Unknown search method {method!r}. Allowed: random, grid.")
    if trials < 1:
        raise ValueError(f"trials must be >= 1. Received: {trials}")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(trials):
        trial = {}
        for name, (kind, values) in space.items():
            if kind == "choice":
                trial[name] = values[int(rng.integers(len(values)))]
            elif kind == "int":
                trial[name] = int(rng.integers(values[0], values[1] + 1))
            elif kind == "loguniform":
                trial[name] = float(math.exp(rng.uniform(math.log(values[0]), math.log(values[1]))))
            else:
                trial[name] = float(rng.uniform(*values))
        out.append(trial)
    return out


def _csv_value(value):
    if isinstance(value, tuple):
        return ";".join(str(v) for v in value)
    return value


def _read_done(path):
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


COLUMNS = ("trial", "status", "validation_accuracy", "validation_loss", "epochs", "steps",
           "train_seconds", "run_dir", "error", "git_commit")
# The keys of search.json that define the search (compared on resume); the others
# (git_commit, versions, backend, device, command, created_utc) say where it began.
SPEC_KEYS = ("space", "method", "trials", "seed", "grid_points", "base_flags")


def _append_row(path, row, fieldnames):
    """Appends `row` to the CSV at `path`, writing the header first if the file is new.
    An existing file keeps its own header (columns it lacks are dropped from `row`)."""
    existing = _read_header(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=existing or fieldnames, extrasaction="ignore")
        if not existing:
            writer.writeheader()
        writer.writerow(row)


def _read_header(path):
    if not os.path.exists(path):
        return None
    with open(path, newline="") as f:
        return next(csv.reader(f), None)


def run_search(base, space, method, trials, seed, search_dir, grid_points=3, train=training.train):
    """Runs (or resumes) a search; returns the rows of `trials.csv`, best first.

    Args:
        base: `TrainConfig` every trial starts from; needs `validation_size` > 0.
        space: from `parse_space`.
        method, trials, seed, grid_points: see `make_trials`.
        search_dir: the search folder (created, or resumed if it holds the same spec).
        train: the training function (tests may pass a stand-in with its signature).

    Raises:
        ValueError: `base.validation_size` is 0, or `search_dir` holds another search.
    """
    if not base.validation_size:
        raise ValueError("A search scores trials on a validation split of the training subset: "
                         "set --validation_size (e.g. 1000), never the test set.")
    base = dataclasses.replace(base, evaluate_test=False, save_model=False)
    plan = make_trials(space, method, trials, seed, grid_points)
    for trial in plan:
        dataclasses.replace(base, **trial)  # every trial is valid before any runs (checked at construction)
    spec = {"space": {k: [kind, list(v)] for k, (kind, v) in space.items()}, "method": method,
            "trials": len(plan), "seed": seed, "grid_points": grid_points,
            "base_flags": dataclasses.asdict(base)}
    spec = json.loads(json.dumps(spec))
    commit = results.git_commit()  # the code this process runs; each trial row repeats it
    os.makedirs(search_dir, exist_ok=True)
    spec_path = os.path.join(search_dir, "search.json")
    if os.path.exists(spec_path):
        with open(spec_path) as f:
            saved = {k: v for k, v in json.load(f).items() if k in SPEC_KEYS}
        if saved != spec:
            changed = sorted(k for k in set(saved) | set(spec) if saved.get(k) != spec.get(k))
            raise ValueError(
                f"{search_dir} holds a different search (differs in: {', '.join(changed)}). "
                "Use a new --search_dir, or the original flags to resume it.")
        logging.info("resuming the search in %s", search_dir)
    else:
        provenance = {"git_commit": commit, "versions": results.versions(),
                      "backend": keras.backend.backend(), "device": describe_device(),
                      "command": sys.argv, "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with open(spec_path, "x") as f:
            json.dump({**spec, **provenance}, f, indent=2, sort_keys=True)
    csv_path = os.path.join(search_dir, "trials.csv")
    done = {int(r["trial"]) for r in _read_done(csv_path)}
    names = list(space)
    for index, trial in enumerate(plan):
        if index in done:
            continue
        logging.info("trial %d/%d: %s", index + 1, len(plan), trial)
        row = {"trial": index, **{n: _csv_value(trial[n]) for n in names}, "git_commit": commit}
        try:
            record, run_dir = train(dataclasses.replace(base, **trial),
                                    results_dir=os.path.join(search_dir, "runs"))
            if record["status"] == "interrupted":
                raise KeyboardInterrupt(f"trial {index} interrupted by {record.get('interrupted_by')}")
            if record["status"] != "completed":
                raise ArithmeticError(f"the run {record['status']}" + (
                    f" at step {record['diverged_at_step']}" if record["status"] == "diverged" else ""))
            accuracy = record["validation_accuracy"]
            row.update(status="ok", validation_accuracy=accuracy,
                       validation_loss=record["validation_loss"], epochs=record["epochs"],
                       steps=record["steps"], train_seconds=record["train_seconds"],
                       run_dir=os.path.relpath(run_dir, search_dir), error="")
        except (ValueError, FloatingPointError, ArithmeticError) as e:
            row.update(status="failed", validation_accuracy="", validation_loss="", epochs="",
                       steps="", train_seconds="", run_dir="", error=str(e)[:300])
            logging.warning("trial %d failed: %s", index, e)
        _append_row(csv_path, row, ["trial", *names, *COLUMNS[1:]])
    rows = _read_done(csv_path)
    rows.sort(key=lambda r: -float(r["validation_accuracy"]) if r["validation_accuracy"] else math.inf)
    return rows


def plot_search(rows, space, path, title):
    """Validation accuracy against each searched flag (one panel each); returns `path`."""
    from haet.plots import _pyplot

    plt = _pyplot()
    ok = [r for r in rows if r["status"] == "ok"]
    fig, axes = plt.subplots(1, len(space), figsize=(4.5 * len(space), 3.6), squeeze=False)
    best = max(ok, key=lambda r: float(r["validation_accuracy"])) if ok else None
    for ax, (name, (kind, _)) in zip(axes[0], space.items()):
        values = [r[name] for r in ok]
        acc = [100 * float(r["validation_accuracy"]) for r in ok]
        numeric = kind != "choice"
        xs = [float(v) for v in values] if numeric else values
        ax.scatter(xs, acc, color="tab:blue")
        if best is not None:
            ax.scatter([float(best[name]) if numeric else best[name]], [100 * float(best["validation_accuracy"])],
                       color="tab:red", marker="*", s=150, label="best")
            ax.legend(loc="lower right")
        if kind == "loguniform":
            ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel("validation accuracy (%)")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def format_table(rows, names):
    """The trials as a fixed-width text table, best first."""
    header = ["trial", *names, "val acc", "epochs", "seconds", "status"]
    lines = [header]
    for r in rows:
        acc = f"{100 * float(r['validation_accuracy']):.2f}%" if r["validation_accuracy"] else "-"
        lines.append([r["trial"], *[str(r[n]) for n in names], acc, r["epochs"] or "-",
                      r["train_seconds"] or "-", r["status"]])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(c).rjust(w) for c, w in zip(line, widths)) for line in lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from haet import train as entry

    f = flags.FLAGS
    try:
        space = parse_space(f.space)
        base = entry.config_from_flags()
        search_dir = f.search_dir
        rows = run_search(base, space, f.method, f.trials, f.search_seed, search_dir, f.grid_points)
    except ValueError as e:
        raise app.UsageError(str(e))
    names = list(space)
    plot_search(rows, space, os.path.join(search_dir, "search.png"),
                f"{base.model} on {base.dataset} ({base.train_size - base.validation_size} train / "
                f"{base.validation_size} validation images), {base.budget_seconds:g} s per trial")
    print(format_table(rows, names))
    ok = [r for r in rows if r["status"] == "ok"]
    if ok:
        best = ok[0]
        print("best: " + " ".join(f"--{config_lib.flag_name(n)}={best[n]}" for n in names)
              + f"  (validation accuracy {100 * float(best['validation_accuracy']):.2f}%)")
    print(f"wrote {search_dir}")
    sys.stdout.flush()


if __name__ == "__main__":
    import haet.train  # noqa: F401 -- defines the training flags (--flagfile recipes work)

    flags.DEFINE_list("space", [], "Flags to search: name=loguniform:LOW:HIGH, name=uniform:LOW:HIGH, "
                      "name=int:LOW:HIGH or name=choice:A|B|C, comma-separated.")
    flags.DEFINE_enum("method", "random", ["random", "grid"], "Random (log-)uniform draws, or a full grid.")
    flags.DEFINE_integer("trials", 8, "random: number of trials.")
    flags.DEFINE_integer("grid_points", 3, "grid: values per loguniform/uniform flag.")
    flags.DEFINE_integer("search_seed", 0, "Seed of the random draws.")
    flags.DEFINE_string("search_dir", None, "The search folder; an existing one with the same search resumes.")
    flags.mark_flag_as_required("search_dir")
    app.run(main)
