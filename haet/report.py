"""Results report: every run record under a results folder in one page, next to published numbers.

    python -m haet.report --results_dir=my_results          # my_results/README.md, my_results/figures/

Reads each `record.json` below `--results_dir` and the published numbers
(`--published`; default: `published.csv` in the results folder, else the one shipped in
this repository's `results/`), and writes into the results folder it read, unless
`--out` / `--figures_dir` say otherwise: a Markdown page with one table per setting
(dataset, training images, budget, device), whose rows average only comparable runs
(`comparable_key`): recipe and what differs, backend, precision, test accuracy (mean
+- sample std over runs, and the count), epochs and images/s, each row linking to its
records; below it the published numbers of the same dataset, training-set size and
budget, with their sources and protocol notes; then the records left out, with why.
Figures (PNG): accuracy vs budget, the learning curves and the confusion matrix of
the run named by `--featured_run` (default: the most recent run of the largest
budget). The page and the figures are derived files, regenerated on every call.

Maintainers: `--readme=README.md` also rewrites the results section of the project's
README (between `README_START` and `README_END`); nothing else touches it.
"""

import collections
import csv
import json
import os
import statistics

from absl import logging

from haet import cli, plots, results
from haet.fields import is_number


def scan_records(results_dir):
    """Every run record below `results_dir`, sorted into those the report can use and
    the others.

    Usable: a JSON object with status "completed" (records written before statuses
    existed count as completed), a numeric `test_accuracy`, a numeric
    `budget_seconds`, a `flags` object, and the other fields the report reads of the
    types it reads them as (`_wrong_field`). The others are returned with the reason
    (malformed, not completed, validation only) and logged as warnings; none is
    dropped silently and none stops the report.

    Returns:
        `(records, skipped)`: dicts with their `record_path` added, and
        `(path, reason)` pairs.
    """
    records, skipped = [], []

    def skip(path, reason):
        logging.warning("not in the report: %s: %s", path, reason)
        skipped.append((path, reason))

    for root, _, files in sorted(os.walk(results_dir)):
        if "record.json" not in files:
            continue
        path = os.path.join(root, "record.json")
        try:
            with open(path) as f:
                record = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            skip(path, f"unreadable ({e})")
            continue
        if not isinstance(record, dict):
            skip(path, "not a JSON object")
            continue
        status = record.get("status", "completed")
        accuracy = record.get("test_accuracy")
        if status != "completed":
            skip(path, f"status {status}" + (f" ({record['error']})" if record.get("error") else ""))
        elif accuracy is None and "test_accuracy" in record:
            skip(path, "validation only (no test accuracy)")
        elif not is_number(accuracy) or not 0 <= accuracy <= 1:
            skip(path, f"test_accuracy {accuracy!r} is not a fraction")
        elif not is_number(record.get("budget_seconds")):
            skip(path, f"budget_seconds {record.get('budget_seconds')!r} is not a number")
        elif not isinstance(record.get("flags"), dict):
            skip(path, f"flags {record.get('flags')!r} is not an object")
        elif wrong := _wrong_field(record):
            skip(path, wrong)
        else:
            record["record_path"] = path
            records.append(record)
    return records, skipped


def _wrong_field(record):
    """What keeps a record with a usable status, accuracy, budget and flags out of the
    tables: a field that the tables, labels and figures read with another type than
    `haet.training` writes (a record edited by hand or written by another tool), as
    "NAME VALUE is not TYPE"; None when there is none. One such record broke the
    sorting, grouping or labels of every record (a traceback, after some figures).
    """
    flags = record["flags"]

    def text(value):
        return isinstance(value, str)

    def count(value):  # None: not recorded
        return value is None or (isinstance(value, int) and not isinstance(value, bool))

    def accuracies(value):
        return value is None or (isinstance(value, dict) and all(v is None or is_number(v) for v in value.values()))

    checks = [("dataset", record.get("dataset", "?"), text, "a string"),
              ("train_examples", record.get("train_examples"), count, "an integer"),
              ("test_examples", record.get("test_examples"), count, "an integer"),
              ("subset_sha256", record.get("subset_sha256"), lambda v: v is None or text(v), "a string"),
              *((key, record.get(key, "?"), text, "a string") for key in ("backend", "precision", "model")),
              ("device name", device_name(record), text, "a string"),
              ("test_accuracy_variants", record.get("test_accuracy_variants"), accuracies,
               "an object of evaluation names and accuracies"),
              ("flags.model", flags.get("model", "?"), text, "a string"),
              ("flags.width_multiplier", flags.get("width_multiplier", 1), is_number, "a number"),
              ("flags.ensemble_members", flags.get("ensemble_members"), count, "an integer")]
    if flags.get("lr_schedule") not in (None, "wall_clock", "one_cycle"):  # the label shows the rate
        checks.append(("flags.learning_rate", flags.get("learning_rate", 0), is_number, "a number"))
    for name, value, check, expected in checks:
        if not check(value):
            return f"{name} {value!r} is not {expected}"
    # What the checks above miss: the report's own reading of the record, tried alone.
    try:
        hash(comparable_key(record))
        recipe_of(record)
        _label_flags(record)
    except (TypeError, ValueError, AttributeError, KeyError) as e:
        return f"cannot be shown ({type(e).__name__}: {e})"
    return None


def load_records(results_dir):
    """The usable run records below `results_dir` (see `scan_records`)."""
    return scan_records(results_dir)[0]


PUBLISHED_COLUMNS = {"dataset", "train_examples", "budget_seconds", "test_accuracy", "test_examples"}


# Cells every published row fills: the figure places it by both, the tables print both.
# The training-set and test-set sizes may be unknown (a hidden test set): empty -> None.
PUBLISHED_REQUIRED = ("budget_seconds", "test_accuracy")


def load_published(path):
    """Rows of the published-numbers CSV, with numbers parsed (empty cells -> None).

    Raises:
        ValueError: a column of `PUBLISHED_COLUMNS` is missing, a number does not
            parse (or is not finite), or a cell of `PUBLISHED_REQUIRED` is empty;
            the message names the line and column.
    """
    rows = []
    with open(path) as f:
        reader = csv.DictReader(f)
        missing = sorted(PUBLISHED_COLUMNS - set(reader.fieldnames or ()))
        if missing:
            raise ValueError(f"{path} lacks the columns {', '.join(missing)} of a published-numbers CSV.")
        for row in reader:
            for key, cast in (("train_examples", int), ("budget_seconds", float),
                              ("test_accuracy", float), ("test_examples", int)):
                cell = row.get(key)
                if not cell and key in PUBLISHED_REQUIRED:
                    raise ValueError(f"{path} line {reader.line_num}: {key} is empty; every published row "
                                     f"needs its {key}.")
                try:
                    row[key] = cast(cell) if cell else None
                    if cell and not is_number(row[key]):
                        raise ValueError
                except ValueError:
                    raise ValueError(f"{path} line {reader.line_num}: {key} {cell!r} is not "
                                     f"{'an integer' if cast is int else 'a finite number'}.") from None
            rows.append(row)
    return rows


def device_name(record):
    device = record.get("device") or {}
    return device.get("name", "unknown") if isinstance(device, dict) else str(device)


def setting_of(record):
    """(dataset, training images, budget seconds, device name) of a record."""
    return (record.get("dataset", "?"), record.get("train_examples"),
            float(record.get("budget_seconds", 0)), device_name(record))


def recipe_of(record):
    """A short recipe label from the record's flags, e.g. 'resnet20x6, batch 32', or
    'resnet9 width 0.25, batch 128, cosine lr 0.376, snapshot ensemble'."""
    flags = record.get("flags", {})
    model = record.get("model", flags.get("model", "?"))
    width = flags.get("width_multiplier", 1)
    members = flags.get("ensemble_members") or 1
    if members > 1:
        # An ensemble is named after --model alone ("airbench_ensemble_of_4").
        model = flags.get("model", model)
    # Some models carry their width in their name ("resnet20x6"); the others get it here.
    label = model + (f" width {width:g}" if width != 1 and not model.endswith(f"x{width:g}") else "")
    label += f", batch {flags.get('batch_size', '?')}"
    if members > 1:
        label += f", ensemble of {members}"
    if flags.get("lr_schedule") not in (None, "wall_clock", "one_cycle"):
        label += f", {flags['lr_schedule']} lr {flags.get('learning_rate', 0):.3g}"
    for key, text in (("init_from", "fine-tuned"), ("data_parallel", "data-parallel"),
                      ("snapshot_ensemble", "snapshot ensemble"), ("health_every_steps", "health monitor")):
        if flags.get(key):
            label += f", {text}"
    return label


def _label_flags(record):
    """The flags whose value the row label of `record` (`recipe_of`) carries: the
    model, width, batch and ensemble size always; the schedule and learning rate,
    fine-tuning, data parallelism, snapshots and the health monitor where it names them."""
    flags = record.get("flags", {})
    shown = {"model", "width_multiplier", "batch_size", "ensemble_members"}
    if flags.get("lr_schedule") not in (None, "wall_clock", "one_cycle"):
        shown |= {"lr_schedule", "learning_rate"}
    return shown | {key for key in ("init_from", "data_parallel", "snapshot_ensemble", "health_every_steps")
                    if flags.get(key)}


def _model_of(record):
    """The model a run trained: its `model` flag, else (older records) the record's."""
    return str((record.get("flags") or {}).get("model") or record.get("model", "?"))


def _mean_std(values):
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


# Flags that do not change what a run measures: runs that differ only in them (and
# the seed) are averaged together.
NOT_COMPARED = ("seed", "data_dir", "save_model", "tensorboard", "eval_batch_size", "checkpoint_every")


def _canonical(value):
    """A flag value as comparable text: numbers as floats (6 and 6.0 are one value)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return json.dumps(value, sort_keys=True)
    return json.dumps(float(value))


def comparable_key(record):
    """What runs must share to be averaged: the dataset, the training subset (its
    sha256), the test set's size, the budget, the device, backend and precision,
    whether training ran past its budget, whether other processes loaded the host's
    CPUs while it trained (`loaded`), and every flag but `NOT_COMPARED`."""
    flags = record.get("flags") or {}
    compared = tuple(sorted((k, _canonical(v)) for k, v in flags.items() if k not in NOT_COMPARED))
    return (setting_of(record), record.get("subset_sha256"), record.get("test_examples"),
            record.get("backend", "?"), record.get("precision", "?"), bool(record.get("over_budget")),
            loaded(record), compared)


def loaded(record):
    """Whether other processes (or a hypervisor) took more than a quarter of the
    CPUs the run could use while it trained (the record's `host_cpu`, see
    `haet.device.HostCpu`); None when it was not measured (records written before
    2026-11-23; or without psutil, or where psutil refused): not known to be quiet,
    so not averaged with runs measured quiet."""
    host = record.get("host_cpu")
    return bool(host.get("loaded")) if isinstance(host, dict) else None


def _differences(keys, models, shown):
    """What each row of a setting changes, as an ablation table reads: for each
    comparable key, the texts of what differs from the usual recipe of its model.

    Rows are grouped by the model they train (`models`: key -> name). Within a model, a
    flag (or the training subset, the test set's size) that takes more than one
    value among the rows recording it is shown as `name=value`, except on the rows
    that hold its usual value: the one more rows hold than any other (none when
    two values tie; then every row recording it shows it). A row does not repeat
    what its recipe label says (`shown`: key -> flag names, `_label_flags`), and a
    row whose record lacks flags that others of its model record (written before
    those flags existed) says how many ("older record: N flags unrecorded").

    Returns:
        `(differences, usual)`: dict key -> list of texts, and dict model -> the
        texts of its usual values (empty where no flag varies or none is usual).
    """
    def values(key):
        _, sha, test, _, _, _, _, compared = key
        return {"subset_sha256": json.dumps(sha), "test_examples": json.dumps(test), **dict(compared)}

    def text(name, value):
        value = json.loads(value)
        if name == "subset_sha256":
            return f"subset {value[:8] if value else '?'}"
        if name == "test_examples":
            return f"{value} test images"
        if isinstance(value, float):
            return f"{name}={value:.4g}"
        return f"{name}={value}"

    table = {key: values(key) for key in keys}
    families = collections.defaultdict(list)
    for key in keys:
        families[models[key]].append(key)
    out, usual_texts = {}, {}
    for model, members in families.items():
        rows = [table[key] for key in members]
        anywhere = set().union(*(set(v) for v in rows))
        usual = {}
        for name in sorted(anywhere - {"model", "width_multiplier", "batch_size", "ensemble_members"}):
            counts = collections.Counter(v[name] for v in rows if name in v).most_common()
            if len(counts) > 1:
                # The usual value, if one is held by more rows than any other; else none.
                usual[name] = counts[0][0] if counts[0][1] > counts[1][1] else None
        displayed = set()
        for key in members:
            v = table[key]
            names = [name for name, common in usual.items()
                     if name in v and v[name] != common and name not in shown[key]]
            displayed.update(names)
            parts = [text(name, v[name]) for name in names]
            missing = len(anywhere - set(v))
            if missing:
                parts.append(f"older record: {missing} flags unrecorded")
            out[key] = parts
        # The usual values of what some row names (the labels carry the rest).
        usual_texts[model] = [text(n, v) for n, v in usual.items() if v is not None and n in displayed]
    return out, usual_texts


def summarize(records):
    """Groups records by setting, then into comparable runs (`comparable_key`: only
    the seed and `NOT_COMPARED` flags may differ within a row).

    Returns:
        dict setting -> list of row dicts: recipe (a short label, then what differs
        from the usual recipe of its model among the setting's rows, see
        `_differences`), model (`_model_of`), usual (the texts of that usual
        recipe's values, which rows holding them do not repeat), backend, precision, runs, accuracy_mean,
        accuracy_std (fractions), epochs_mean, images_per_second_mean, over_budget
        (runs trained past their budget by more than one execution), loaded (runs
        trained while other processes loaded the host, `loaded`: True, False or None
        when not measured), unmeasured (not measured, beside a row of the same
        settings that was), records
        (paths), commits (how many code versions the runs were trained with: their git
        commits, a "-dirty" one counted with its commit; a row averages runs of the same
        flags, not of the same code), variants (evaluation name -> (mean accuracy, runs that have it),
        e.g. raw and EMA weights, with and without TTA). Rows sorted by accuracy,
        best first.
    """
    groups = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in records:
        groups[setting_of(r)][comparable_key(r)].append(r)
    table = {}
    for setting, by_key in groups.items():
        models = {key: _model_of(runs[0]) for key, runs in by_key.items()}
        differences, usual = _differences(list(by_key), models,
                                          {key: _label_flags(runs[0]) for key, runs in by_key.items()})
        rows = []
        for key, runs in by_key.items():
            mean, std = _mean_std([r["test_accuracy"] for r in runs])
            ips = [r["images_per_second"] for r in runs if is_number(r.get("images_per_second"))]
            variant_names = sorted({k for r in runs for k in (r.get("test_accuracy_variants") or {})})
            variants = {}
            for k in variant_names:
                values = [r["test_accuracy_variants"][k] for r in runs
                          if is_number((r.get("test_accuracy_variants") or {}).get(k))]
                if values:
                    variants[k] = (statistics.fmean(values), len(values))
            recipe = "; ".join([recipe_of(runs[0]), *differences[key]])
            model = models[key]
            over, busy_host = key[5], key[6]
            if over:
                recipe += " (OVER BUDGET)"
            if busy_host:
                recipe += " (LOADED HOST)"
            # Said only beside rows of the same runs' settings whose host was measured.
            unmeasured = busy_host is None and any(
                other[:6] == key[:6] and other[7] == key[7] and other[6] is not None for other in by_key)
            if unmeasured:
                recipe += " (HOST LOAD NOT MEASURED)"
            rows.append({
                "recipe": recipe, "backend": key[3], "precision": key[4], "runs": len(runs),
                "variants": variants, "over_budget": over, "loaded": busy_host, "unmeasured": unmeasured,
                "accuracy_mean": mean, "accuracy_std": std,
                "epochs_mean": statistics.fmean(_epochs(r) for r in runs),
                "images_per_second_mean": statistics.fmean(ips) if ips else None,
                "records": [r["record_path"] for r in runs], "model": model, "usual": usual[model],
                "commits": len({str(r.get("git_commit")).removesuffix("-dirty") for r in runs}),
            })
        table[setting] = sorted(rows, key=lambda row: -row["accuracy_mean"])
    return table


def _epochs(record):
    value = record.get("epochs_equivalent", record.get("epochs", 0))
    return value if is_number(value) else 0.0


def matching_published(published, setting):
    """Published rows with the setting's dataset, training-set size and budget."""
    dataset, train_examples, budget, _ = setting
    return [p for p in published if p["dataset"] == dataset and p["train_examples"] == train_examples
            and p["budget_seconds"] == budget]


def _link(path, base):
    return os.path.relpath(path, base)


# The opening of every page the report writes: its title, then these words. A page that
# opens otherwise is not replaced, even if it quotes them further down.
GENERATED = "Generated by `python -m haet.report`"
PAGE_START = "# Results\n\n" + GENERATED

# The figures `make_figures` writes, and the PNG text (matplotlib's "Software" key) that
# marks them as the report's: a file of one of these names without it (a run folder's
# learning curves, a figure of the user's) is never replaced.
FIGURES = ("accuracy_vs_budget.png", "learning_curves.png", "confusion_matrix.png")
FIGURE_MARK = {"Software": "python -m haet.report"}


def render_markdown(table, published, base_dir, figures, title=True, skipped=(), results_dir="results",
                    published_path="results/published.csv"):
    """The report page as a Markdown string; links are relative to `base_dir`.

    With `title=False` (a section inside another page) it starts at the figures
    and uses third-level headings. `skipped` (`(path, reason)` pairs from
    `scan_records`) are listed at the end. The page's first line names the folder
    the records were read from (`results_dir`) and the file of published numbers
    (`published_path`; None: none was read), as the command line gave them.
    """
    h = "##" if title else "###"
    source = f" and `{published_path}`" if published_path else " (no published numbers)"
    lines = ["# Results", "",
             f"{GENERATED} from every `record.json` under `{results_dir.rstrip('/')}/`{source}; "
             "do not edit by hand.", ""] if title else []
    if figures:
        lines += [f"![{name}]({_link(path, base_dir)})" for name, path in figures.items()] + [""]
    for setting in sorted(table, key=lambda s: (s[0], s[1] or 0, s[2], s[3])):
        dataset, train_examples, budget, device = setting
        lines += [f"{h} {dataset}, {train_examples} training images, {budget:g} s budget, {device}", "",
                  "| recipe | backend | precision | test accuracy (mean ± std) | runs | epochs | images/s "
                  "| every evaluation (mean) | records |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in table[setting]:
            ips = f"{row['images_per_second_mean']:.1f}" if row["images_per_second_mean"] else "-"
            links = ", ".join(f"[{i + 1}]({_link(p, base_dir)})" for i, p in enumerate(row["records"]))
            variants = ", ".join(
                f"{k} {100 * mean:.2f}%" + (f" ({n} of {row['runs']} runs)" if n < row["runs"] else "")
                for k, (mean, n) in row["variants"].items()) or "-"
            runs = f"{row['runs']}" + (f" ({row['commits']} commits)" if row["commits"] > 1 else "")
            lines.append(
                f"| {row['recipe']} | {row['backend']} | {row['precision']} | "
                f"{100 * row['accuracy_mean']:.2f}% ± {100 * row['accuracy_std']:.2f} | {runs} | "
                f"{row['epochs_mean']:.2f} | {ips} | {variants} | {links} |")
        usual = {row["model"]: row["usual"] for row in table[setting] if row["usual"]}
        if usual:
            lines += [""] + [f"Unless its row says otherwise, every --model={model} row has: {', '.join(texts)}."
                             for model, texts in sorted(usual.items())]
        same = matching_published(published, setting)
        if same:
            lines += ["", "Published in the same dataset / training-set size / budget:", "",
                      "| entry | device | test accuracy | source | protocol |", "|---|---|---|---|---|"]
            lines += [f"| {p['entry']} | {p['device']} | {100 * p['test_accuracy']:.1f}% | {p['source']} | "
                      f"{p['protocol_notes']} |" for p in same]
        lines.append("")
    shown = {id(p) for s in table for p in matching_published(published, s)}
    others = [p for p in published if id(p) not in shown]
    if others:
        lines += [f"{h} Published numbers in other settings", "",
                  "| entry | dataset | training images | budget | device | test accuracy | source | protocol |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {p['entry']} | {p['dataset']} | {p['train_examples'] or '?'} | "
                  f"{p['budget_seconds']:g} s | {p['device']} | {100 * p['test_accuracy']:.1f}% | "
                  f"{p['source']} | {p['protocol_notes']} |" for p in others]
        lines.append("")
    if any(row["commits"] > 1 for rows in table.values() for row in rows):
        lines += ["N commits: the row averages runs of the same flags trained by N versions of the code (their "
                  "records' git_commit); follow its records to see what changed between them.", ""]
    if any(row["over_budget"] for rows in table.values() for row in rows):
        lines += ["OVER BUDGET: training ran past the budget by more than one execution (e.g. a compilation "
                  "longer than the budget); those runs are not averaged with the others.", ""]
    if any(row["loaded"] for rows in table.values() for row in rows):
        lines += ["LOADED HOST: while the run trained, other processes (and the hypervisor's steal) kept more "
                  "than a quarter of the CPUs it could use busy (its record's host_cpu); its timings and what "
                  "fitted in its budget are not those of an idle machine, so it is not averaged with the others.",
                  ""]
    if any(row["unmeasured"] for rows in table.values() for row in rows):
        lines += ["HOST LOAD NOT MEASURED: runs whose records have no measure of their host's CPU load (host_cpu "
                  "missing: recorded before it existed; or null: no psutil, psutil refused, or a resumed process not "
                  "measured), beside runs of the "
                  "same settings that have one: not averaged with them (some older CPU runs had an induced load: "
                  "see a load.txt in their folders).", ""]
    validation_only = [path for path, reason in skipped if reason.startswith("validation only")]
    listed = [(path, reason) for path, reason in skipped if not reason.startswith("validation only")]
    if skipped:
        lines += [f"{h} Records not in the tables", ""]
    if listed:
        lines += ["| record | why |", "|---|---|"]
        lines += [f"| [{_link(path, base_dir)}]({_link(path, base_dir)}) | {reason} |" for path, reason in listed]
        lines.append("")
    if validation_only:
        lines += [f"{len(validation_only)} validation-only runs (search trials, scored without the test set) are "
                  "not in the tables.", ""]
    return "\n".join(lines)


def _names_run(record_path, name):
    """Whether `name` (`--featured_run`) names the run folder of `record_path`: by its
    folder name, its path below the results folder (`cpu/RUN`), or a path to it."""
    run_dir = os.path.dirname(record_path)
    below = os.path.normpath(name)
    return (os.path.realpath(run_dir) == os.path.realpath(name)
            or not os.path.isabs(name) and (run_dir == below or run_dir.endswith(os.sep + below)))


def featured_run(records, name=None, skipped=()):
    """The record of the run folder that `name` names (`_names_run`), else the latest
    of the largest budget.

    Raises:
        ValueError: `name` names no run folder, or two or more (a folder name found
            under two parents), or one whose record is not in the report (one of
            `skipped`, the `(path, reason)` pairs of `scan_records`: it says why).
    """
    if not name:
        return max(records, key=lambda r: (r.get("budget_seconds", 0),
                                           os.path.basename(os.path.dirname(r["record_path"]))))
    matches = [r for r in records if _names_run(r["record_path"], name)]
    left_out = [(path, reason) for path, reason in skipped if _names_run(path, name)]
    if len(matches) + len(left_out) > 1:
        folders = [os.path.dirname(r["record_path"]) for r in matches] + [
            f"{os.path.dirname(path)} (not in the report: {reason})" for path, reason in left_out]
        raise ValueError(f"--featured_run={name!r} names {len(folders)} run folders: {'; '.join(folders)}. "
                         "Pass the path of one.")
    if left_out:
        (path, reason), = left_out
        raise ValueError(f"--featured_run={name!r}: the run {os.path.dirname(path)} is not in the report: "
                         f"{reason}. Pass --featured_run=ANOTHER, a run in its tables.")
    if not matches:
        raise ValueError(f"No run folder named {name!r} under the results directory: pass a run folder's name "
                         "or its path (cpu/RUN below the results folder, or any path to it).")
    return matches[0]


# What the learning curves plot against: each row's must be a finite number (the
# figure's axis limits); the other columns plotted may be empty or any number (a
# diverged run's loss is nan).
HISTORY_AXES = ("epoch", "elapsed_seconds")
HISTORY_PLOTTED = ("learning_rate", "augmentation_strength", "loss", "accuracy", "val_loss", "val_accuracy")


def featured_files(run):
    """What the featured run's figures show, read from its folder: the rows of its
    `history.csv` (dicts of text) and its `confusion_matrix.csv` as `(class names,
    rows of counts)`; each None where the folder has no such file.

    Raises:
        ValueError: a file that is there cannot be read or is not what the run
            writes (a history with non-numbers in the plotted columns; a matrix
            that is not a square table of counts below a header of class names);
            the message names the file and the fix.
    """
    run_dir = os.path.dirname(run["record_path"])
    history = matrix = None
    path = os.path.join(run_dir, "history.csv")  # the file being read, which `broken` names

    def broken(why):
        return ValueError(f"{path} {why}: the featured run's figures cannot be drawn. Pass "
                          "--featured_run=OTHER (another run folder), or repair or remove the file.")
    try:
        if os.path.exists(path):
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                if not set(HISTORY_AXES) <= set(reader.fieldnames or ()):
                    raise broken(f"lacks the columns {', '.join(HISTORY_AXES)}")
                history = []
                for row in reader:
                    for key in HISTORY_AXES + HISTORY_PLOTTED:
                        axis, value = key in HISTORY_AXES, row.get(key)
                        if not axis and value in (None, ""):
                            continue
                        try:
                            number = float(value)
                        except (TypeError, ValueError):
                            number = None
                        if number is None or axis and not is_number(number):
                            raise broken(f"line {reader.line_num}: {key} {value!r} is not "
                                         f"{'a finite number' if axis else 'a number'}")
                    history.append(row)
        path = os.path.join(run_dir, "confusion_matrix.csv")
        if os.path.exists(path):
            with open(path, newline="") as f:
                rows = list(csv.reader(f))
            names = rows[0][1:] if rows else []
            if not names or len(rows) != len(names) + 1 or any(len(row) != len(names) + 1 for row in rows):
                raise broken(f"is not a table of {len(names) or 'N'} classes: a header of class names, then a "
                             "row of counts for each")
            try:
                matrix = (names, [[int(v) for v in row[1:]] for row in rows[1:]])
            except ValueError as e:
                raise broken(f"holds a cell that is not a count ({e})") from None
            if any(v < 0 for row in matrix[1] for v in row):
                raise broken("holds a negative count")
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise broken(f"cannot be read ({type(e).__name__}: {e})") from None
    return history, matrix


def make_figures(records, published, figures_dir, featured=None, featured_read=None):
    """Writes the report's figures; returns {caption: path}. `featured_read`: the
    featured run's record and files, `(run, featured_files(run))`, when the caller has
    read them already (else read here from `featured`).

    Raises:
        ValueError: `featured` names no usable run (`featured_run`), or the featured
            run's files cannot be drawn (`featured_files`); before any figure is written.
    """
    if featured_read is None:
        run = featured_run(records, featured)
        featured_read = (run, featured_files(run))
    run, (history, matrix) = featured_read
    os.makedirs(figures_dir, exist_ok=True)
    figures = {}
    # The HAET setting only (CIFAR-10, 5,000 images) when it has runs: other datasets and
    # sizes are not comparable on one axis; the tables list them all.
    haet = [r for r in records if r.get("dataset") == "cifar10" and r.get("train_examples") == 5000]
    shown = haet or records
    runs = [{"budget_seconds": r["budget_seconds"], "test_accuracy": r["test_accuracy"],
             "label": f"{recipe_of(r)}, {device_name(r)}, {r.get('backend')}"} for r in shown]
    pub = [p for p in published if p["budget_seconds"] and (
        (p["dataset"] == "cifar10" and p["train_examples"] == 5000) if haet
        else p["dataset"] in {r.get("dataset") for r in records})]
    figures["Test accuracy vs budget"] = plots.plot_accuracy_vs_budget(
        runs, pub, os.path.join(figures_dir, "accuracy_vs_budget.png"),
        title="CIFAR-10, 5,000 training images: test accuracy vs wall-clock budget" if haet else
        "Test accuracy vs wall-clock budget", metadata=FIGURE_MARK)
    title = (f"{run.get('model')} on {run.get('dataset')} ({run.get('train_examples')} images), "
             f"{run['budget_seconds']:g} s, {device_name(run)}, {run.get('backend')}: "
             f"test accuracy {100 * run['test_accuracy']:.2f}%")
    if history is not None:
        figures["Learning curves"] = plots.plot_learning_curves(
            history, title, os.path.join(figures_dir, "learning_curves.png"), metadata=FIGURE_MARK)
    if matrix is not None:
        names, counts = matrix
        figures["Confusion matrix"] = plots.plot_confusion_matrix(
            counts, names, os.path.join(figures_dir, "confusion_matrix.png"),
            title="Confusion matrix (test set)\n" + title, metadata=FIGURE_MARK)
    return figures


def default_published(results_dir):
    """`published.csv` in `results_dir`, else the repository's `results/published.csv`,
    else None."""
    for path in (os.path.join(results_dir, "published.csv"),
                 os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results",
                              "published.csv")):
        if os.path.exists(path):
            return path
    return None


README_START = "<!-- results: generated by python -m haet.report -->"
README_END = "<!-- end of results -->"


def _readme_section(text, path):
    """Where the results section of `text` (the file `path`) starts and ends.

    Raises:
        ValueError: the markers are missing.
    """
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"{path} lacks the lines {README_START!r} and {README_END!r}; add them "
                         "where the results should go.")
    return start, end


def _is_report_figure(path):
    """Whether the file `path` is a PNG that carries `FIGURE_MARK`."""
    from PIL import Image  # matplotlib's own dependency

    try:
        with Image.open(path) as image:
            return image.info.get("Software") == FIGURE_MARK["Software"]
    except (OSError, ValueError, SyntaxError):
        return False


def _check_figures_dir(figures_dir, out):
    """Checks that writing `FIGURES` into `figures_dir` replaces only figures the report
    wrote: ones that carry `FIGURE_MARK`, or that its page `out` links (figures
    written before the mark existed; `out` is known to be the report's page).

    Raises:
        ValueError: `figures_dir` is a run folder (it holds a record.json), or it
            holds a file of one of those names that the report did not write.
    """
    if os.path.exists(os.path.join(figures_dir, "record.json")):
        raise ValueError(f"--figures_dir={figures_dir!r} is a run folder (it holds a record.json): the report's "
                         "figures would replace the run's. Pass --figures_dir=ANOTHER (default: RESULTS_DIR/figures).")
    page = ""
    if os.path.isfile(out):
        with open(out, errors="replace") as f:
            page = f.read()
    base = os.path.dirname(os.path.abspath(out))
    foreign = [name for name in FIGURES if os.path.lexists(os.path.join(figures_dir, name))
               and not _is_report_figure(os.path.join(figures_dir, name))
               and f"]({_link(os.path.join(figures_dir, name), base)})" not in page]
    if foreign:
        raise ValueError(f"--figures_dir={figures_dir!r} holds {', '.join(foreign)}, not written by haet.report: "
                         "nothing there is replaced. Pass --figures_dir=ANOTHER, or move those files away.")


def check_outputs(results_dir, out, readme=None, published=None, figures_dir=None):
    """Checks, before anything is written, what `main` reads and replaces.

    Raises:
        ValueError: `results_dir` is not a folder; `out` exists and is not a page
            this report wrote (a hand-written README is never replaced); `readme`
            is not a readable file with the results markers; `published` is not a
            file; the folders of `out` and `figures_dir` (or `readme`) cannot be
            written; `figures_dir` holds files of the figures' names that the
            report did not write (`_check_figures_dir`). Each message names the
            path and the fix.
    """
    if not os.path.isdir(results_dir):
        raise ValueError(f"--results_dir={results_dir!r} is not a folder: pass the folder that holds the runs.")
    if os.path.isdir(out):
        raise ValueError(f"--out={out!r} is a folder: pass the Markdown file to write.")
    # Pages are replaced through a temporary sibling: their folders must be writable.
    results.check_results_dir(os.path.dirname(os.path.abspath(out)), file_flag="--out")
    if figures_dir is not None:
        results.check_results_dir(figures_dir, "--figures_dir")
    if readme:
        results.check_results_dir(os.path.dirname(os.path.abspath(readme)), file_flag="--readme")
    if os.path.exists(out):
        with open(out, errors="replace") as f:
            if f.read(len(PAGE_START)) != PAGE_START:
                raise ValueError(f"{out} exists and was not written by haet.report: it is not replaced. Pass "
                                 f"--out=ANOTHER.md.")
    if figures_dir is not None:
        _check_figures_dir(figures_dir, out)
    if readme:
        try:
            with open(readme) as f:
                _readme_section(f.read(), readme)
        except OSError as e:
            raise ValueError(f"--readme={readme!r} cannot be read ({e}).") from None
    if published and not os.path.isfile(published):
        raise ValueError(f"--published={published!r} is not a file: pass a CSV of published numbers "
                         f"(results/published.csv).")


def update_readme(path, table, published, figures):
    """Rewrites the part of `path` between `README_START` and `README_END` with the
    results tables and figures (links relative to `path`).

    Raises:
        ValueError: if the markers are missing (nothing is written then).
    """
    with open(path) as f:
        text = f.read()
    start, end = _readme_section(text, path)
    base = os.path.dirname(os.path.abspath(path))
    body = render_markdown(table, published, base, figures, title=False)
    results.write_text_atomic(path, text[:start + len(README_START)] + "\n" + body.strip() + "\n" + text[end:])


def main(argv):
    del argv
    from absl import app, flags

    f = flags.FLAGS
    out = f.out or os.path.join(f.results_dir, "README.md")
    figures_dir = f.figures_dir or os.path.join(f.results_dir, "figures")
    # Everything that can be refused is, before a figure or page is written.
    try:
        # An empty value is a mistake (an unset shell variable), not a request for the default.
        for name, default in (("out", "RESULTS_DIR/README.md"), ("figures_dir", "RESULTS_DIR/figures"),
                              ("published", "RESULTS_DIR/published.csv, else the repository's"),
                              ("featured_run", "the latest run of the largest budget"),
                              ("readme", "no README rewritten")):
            if getattr(f, name) == "":
                raise ValueError(f"--{name} is empty: pass --{name}=VALUE, or leave the flag out ({default}).")
        check_outputs(f.results_dir, out, f.readme, f.published, figures_dir)
        published_path = f.published or default_published(f.results_dir)
        try:
            published = load_published(published_path) if published_path else []
        except (UnicodeDecodeError, KeyError, OSError, csv.Error) as e:
            raise ValueError(f"{published_path} is not a CSV of published numbers ({type(e).__name__}: {e}).") \
                from None
        records, skipped = scan_records(f.results_dir)
        if not records:
            raise ValueError(f"No usable record.json under {f.results_dir!r} ({len(skipped)} skipped).")
        # A history or confusion matrix of the featured run that cannot be drawn refuses the
        # report, rather than leaving its figure out: the page would lack it with no word
        # why (last report's figure of that name left beside it), and --featured_run was
        # either asked for (that run's figures were wanted) or can pick another run.
        featured = featured_run(records, f.featured_run, skipped)
        featured = (featured, featured_files(featured))
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    except ValueError as e:
        raise app.UsageError(str(e), exitcode=cli.USAGE_ERROR) from None
    table = summarize(records)
    try:
        figures = make_figures(records, published, figures_dir, featured_read=featured)
        page = render_markdown(table, published, os.path.dirname(os.path.abspath(out)), figures, skipped=skipped,
                               results_dir=f.results_dir, published_path=published_path)
        results.write_text_atomic(out, page)  # the old page or the new one, never a part
        if f.readme:
            update_readme(f.readme, table, published, figures)
    except OSError as e:
        cli.not_written("the report", e)
    logging.info("%d records -> %s (%d figures in %s)", len(records), out, len(figures), figures_dir)
    print(f"{len(records)} records ({len(skipped)} left out) -> {out}, figures in {figures_dir}")


if __name__ == "__main__":
    from absl import flags

    flags.DEFINE_string("results_dir", "results", "Folder searched for record.json files.")
    flags.DEFINE_string("published", None, "Published numbers, one row each (default: published.csv in "
                        "--results_dir, else the repository's results/published.csv).")
    flags.DEFINE_string("out", None, "Markdown page to (re)write (default: --results_dir/README.md).")
    flags.DEFINE_string("figures_dir", None, "Folder for the report's PNG figures (default: --results_dir/figures).")
    flags.DEFINE_string("featured_run", None, "Run folder whose curves and confusion matrix are shown: its name, "
                        "or its path (below --results_dir, e.g. cpu/RUN, or any path to it).")
    flags.DEFINE_string("readme", None, "Maintainers: also rewrite this file's results section (the project's "
                        "README.md).")
    cli.run(main)
