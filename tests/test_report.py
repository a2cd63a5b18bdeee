import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from haet import report

PUBLISHED = os.path.join(REPO, "results", "published.csv")


def _write_run(root, name, accuracy, budget=600.0, backend="jax", device="NVIDIA H100", epochs=10.0,
               variants=None):
    run = root / name
    run.mkdir(parents=True)
    record = {"test_accuracy": accuracy, "dataset": "cifar10", "train_examples": 5000,
              "budget_seconds": budget, "device": {"name": device}, "backend": backend,
              "precision": "mixed_bfloat16", "model": "resnet20x6", "flags": {"batch_size": 32},
              "epochs_equivalent": epochs, "images_per_second": 100.0 * accuracy, "git_commit": "abc",
              "test_accuracy_variants": variants or {}}
    (run / "record.json").write_text(json.dumps(record))
    (run / "history.csv").write_text(
        "epoch,steps,complete,elapsed_seconds,remaining_seconds,learning_rate,augmentation_strength,"
        "fill_mode,loss,accuracy\n1,10,True,5.0,5.0,0.001,1.0,wrap,2.0,0.3\n2,10,True,10.0,0.0,0.0001,0.0,reflect,1.5,0.5\n")
    header = "true \\ predicted," + ",".join(f"c{i}" for i in range(3))
    (run / "confusion_matrix.csv").write_text(header + "\nc0,5,1,0\nc1,0,6,0\nc2,1,0,4\n")
    return run


def _write_model_run(root, name, accuracy, model, **flags):
    """A run of `model` at batch 128 with these flags (see `_write_run`)."""
    path = _write_run(root, name, accuracy)
    record = json.loads((path / "record.json").read_text())
    record["model"] = model
    record["flags"] = {"batch_size": 128, "model": model, **flags}
    (path / "record.json").write_text(json.dumps(record))


def test_table_numbers_match_the_records(tmp_path):
    _write_run(tmp_path, "a", 0.80, epochs=10.0, variants={"raw": 0.82, "ema": 0.80})
    _write_run(tmp_path, "b", 0.90, epochs=12.0, variants={"raw": 0.90, "ema": 0.88})
    _write_run(tmp_path, "c", 0.50, budget=60.0)
    _write_run(tmp_path, "d", 0.40, budget=60.0, variants={"final": 0.40})
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "record.json").write_text("{not json")
    records = report.load_records(str(tmp_path))
    assert len(records) == 4
    table = report.summarize(records)
    (row,) = table[("cifar10", 5000, 600.0, "NVIDIA H100")]
    assert row["runs"] == 2 and row["accuracy_mean"] == pytest.approx(0.85)
    assert row["accuracy_std"] == pytest.approx(0.0707107, rel=1e-5)  # sample std of 0.8, 0.9
    assert row["epochs_mean"] == 11.0 and row["images_per_second_mean"] == pytest.approx(85.0)
    page = report.render_markdown(table, report.load_published(PUBLISHED), str(tmp_path), {})
    assert ("| resnet20x6, batch 32 | jax | mixed_bfloat16 | 85.00% ± 7.07 | 2 | 11.00 | 85.0 | "
            "ema 84.00%, raw 86.00% | [1](a/record.json), [2](b/record.json) |") in page
    assert ("| resnet20x6, batch 32 | jax | mixed_bfloat16 | 45.00% ± 7.07 | 2 | 10.00 | 45.0 | "
            "final 40.00% (1 of 2 runs) |") in page
    # Published CIFAR-10 numbers sit under the 600 s setting; the hidden-set leaderboard apart.
    section_600 = page.split("## cifar10, 5000 training images, 600 s")[1].split("##")[0]
    assert "UMBC widened ResNet-20 | V100 | 85.1%" in section_600 and "McGill ResNet-9" in section_600
    others = page.split("## Published numbers in other settings")[1]
    assert "Huawei (challenge winner) | haet2021_hidden" in others and "88.0%" in others


def test_a_row_of_runs_trained_by_several_commits_says_how_many(tmp_path):
    for name, accuracy, commit in (("a", 0.80, "abc"), ("b", 0.90, "abc-dirty"), ("c", 0.70, "def")):
        path = _write_run(tmp_path, name, accuracy, budget=60.0 if name == "c" else 600.0)
        record = json.loads((path / "record.json").read_text())
        (path / "record.json").write_text(json.dumps({**record, "git_commit": commit}))
    _write_run(tmp_path, "d", 0.60, budget=60.0)  # commit "abc"
    table = report.summarize(report.load_records(str(tmp_path)))
    (same,) = table[("cifar10", 5000, 600.0, "NVIDIA H100")]  # abc, and abc with uncommitted changes
    (mixed,) = table[("cifar10", 5000, 60.0, "NVIDIA H100")]
    assert (same["runs"], same["commits"]) == (2, 1) and (mixed["runs"], mixed["commits"]) == (2, 2)
    page = report.render_markdown(table, [], str(tmp_path), {})
    assert "| 85.00% ± 7.07 | 2 | 10.00 |" in page and "| 65.00% ± 7.07 | 2 (2 commits) | 10.00 |" in page
    assert "N commits: the row averages runs of the same flags trained by N versions of the code" in page


def test_report_cli_writes_page_and_figures(tmp_path):
    _write_run(tmp_path / "results", "run1", 0.7, budget=60.0)
    _write_run(tmp_path / "results", "run2", 0.8)
    out = tmp_path / "results" / "README.md"
    env = dict(os.environ, PYTHONPATH=REPO, MPLBACKEND="Agg")
    subprocess.run([sys.executable, "-m", "haet.report", f"--results_dir={tmp_path / 'results'}",
                    f"--published={PUBLISHED}", f"--out={out}", f"--figures_dir={tmp_path / 'results' / 'figures'}"],
                   check=True, env=env, capture_output=True)
    page = out.read_text()
    for name in ("accuracy_vs_budget.png", "learning_curves.png", "confusion_matrix.png"):
        assert (tmp_path / "results" / "figures" / name).stat().st_size > 10_000
        assert f"(figures/{name})" in page
    assert report.featured_run(report.load_records(str(tmp_path / "results")))["budget_seconds"] == 600.0
    with pytest.raises(ValueError, match="No run folder named 'nope'"):
        report.featured_run(report.load_records(str(tmp_path / "results")), "nope")


def test_the_report_refuses_what_it_would_overwrite_or_cannot_read_before_writing(tmp_path):
    results_dir = tmp_path / "results"
    _write_run(results_dir, "run1", 0.7)
    page = results_dir / "README.md"
    page.write_text("# Our own notes\n")  # hand-written: never replaced
    with pytest.raises(ValueError, match="was not written by haet.report"):
        report.check_outputs(str(results_dir), str(page))
    with pytest.raises(ValueError, match="is not a folder"):
        report.check_outputs(str(tmp_path / "nothing"), str(tmp_path / "out.md"))
    no_markers = tmp_path / "README.md"
    no_markers.write_text("# A project\n")
    with pytest.raises(ValueError, match="lacks the lines"):
        report.check_outputs(str(results_dir), str(tmp_path / "out.md"), readme=str(no_markers))
    with pytest.raises(ValueError, match="is not a file"):
        report.check_outputs(str(results_dir), str(tmp_path / "out.md"), published=str(tmp_path / "none.csv"))
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    # (was "Pass --out's folder=FOLDER", a flag that does not exist)
    with pytest.raises(ValueError, match=r"out's folder '.*a_file' cannot be made: '.*a_file' is a file, not a "
                                         r"folder\. Pass --out=FILE in a folder, or where one can be made\.$"):
        report.check_outputs(str(results_dir), str(a_file / "out.md"))
    record_csv = tmp_path / "record.csv"
    record_csv.write_text('{"dataset": "cifar10"}\n')
    with pytest.raises(ValueError, match="lacks the columns budget_seconds, dataset"):
        report.load_published(str(record_csv))
    report.check_outputs(str(results_dir), str(tmp_path / "out.md"), published=PUBLISHED)  # all fine
    # The command line: a typo in --featured_run ends in one line, before any figure is drawn.
    env = dict(os.environ, PYTHONPATH=REPO, MPLBACKEND="Agg")
    result = subprocess.run([sys.executable, "-m", "haet.report", f"--results_dir={results_dir}",
                             f"--out={tmp_path / 'out.md'}", "--featured_run=typo"], env=env, capture_output=True,
                            text=True)
    assert result.returncode == 2 and "No run folder named 'typo'" in result.stderr
    assert "Traceback" not in result.stderr and "flags:" not in result.stderr  # one line, not the help
    assert "haet.report: error: No run folder named" in result.stderr
    assert not (results_dir / "figures").exists() and not (tmp_path / "out.md").exists()
    assert page.read_text() == "# Our own notes\n"


def test_readme_section_is_replaced_between_markers(tmp_path):
    _write_run(tmp_path / "results", "run1", 0.75)
    readme = tmp_path / "README.md"
    readme.write_text(f"# Project\n\nintro\n\n## Results\n{report.README_START}\nold table\n{report.README_END}\n\nrest\n")
    records = report.load_records(str(tmp_path / "results"))
    figures = {"Learning curves": str(tmp_path / "results" / "figures" / "learning_curves.png")}
    report.update_readme(str(readme), report.summarize(records), report.load_published(PUBLISHED), figures)
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# Project\n\nintro") and text.endswith("\n\nrest\n")
    assert "![Learning curves](results/figures/learning_curves.png)" in text
    assert "### cifar10, 5000 training images, 600 s budget, NVIDIA H100" in text
    assert "75.00% ± 0.00 | 1 |" in text and "UMBC widened ResNet-20 | V100 | 85.1%" in text
    bare = tmp_path / "bare.md"
    bare.write_text("no markers")
    with pytest.raises(ValueError, match="lacks the lines"):
        report.update_readme(str(bare), {}, [], {})
    assert bare.read_text() == "no markers"


def test_only_comparable_runs_are_averaged_and_bad_records_are_listed(tmp_path):
    def run(name, accuracy, **changes):
        path = _write_run(tmp_path, name, accuracy)
        record = json.loads((path / "record.json").read_text())
        flags = {"batch_size": 32, "seed": 0, "ema_decay": 0.0, "tta": "none", **(changes.pop("flags", {}) or {})}
        record.update({"subset_sha256": "aaaa1111", "test_examples": 10000, "flags": flags, **changes})
        (path / "record.json").write_text(json.dumps(record))

    run("seed0", 0.80)
    run("seed1", 0.90, flags={"seed": 1, "data_dir": "/elsewhere"})  # averaged with seed0
    run("small_test", 0.20, test_examples=1000, subset_sha256="bbbb2222")
    run("ema_tta", 0.40, flags={"ema_decay": 0.99, "tta": "flip"})
    run("slow", 0.70, over_budget=True)
    # Other processes busy on the host while it trained: apart; a quiet host's record averages as before.
    run("busy_host", 0.60, host_cpu={"cpus": 2, "other_load": 1.9, "steal_load": 0.0, "loaded": True})
    run("quiet_host", 0.85, flags={"seed": 2}, host_cpu={"cpus": 2, "other_load": 0.1, "loaded": False})
    run("stopped", 0.10, status="interrupted")
    run("no_budget", 0.50)
    broken = json.loads((tmp_path / "no_budget" / "record.json").read_text())
    del broken["budget_seconds"]
    (tmp_path / "no_budget" / "record.json").write_text(json.dumps(broken))
    run("bad_flags", 0.5)
    bad = json.loads((tmp_path / "bad_flags" / "record.json").read_text())
    bad["flags"] = None
    (tmp_path / "bad_flags" / "record.json").write_text(json.dumps(bad))
    run("text_accuracy", 0.5)
    text = json.loads((tmp_path / "text_accuracy" / "record.json").read_text())
    text["test_accuracy"] = "0.5"
    (tmp_path / "text_accuracy" / "record.json").write_text(json.dumps(text))

    records, skipped = report.scan_records(str(tmp_path))
    reasons = {os.path.basename(os.path.dirname(p)): why for p, why in skipped}
    assert reasons == {"stopped": "status interrupted", "no_budget": "budget_seconds None is not a number",
                       "bad_flags": "flags None is not an object",
                       "text_accuracy": "test_accuracy '0.5' is not a fraction"}
    rows = report.summarize(records)[("cifar10", 5000, 600.0, "NVIDIA H100")]
    by_runs = {row["recipe"]: (row["runs"], round(row["accuracy_mean"], 4)) for row in rows}
    # An ablation table: each row names what differs from the usual values of its model's rows.
    assert by_runs == {
        "resnet20x6, batch 32 (HOST LOAD NOT MEASURED)": (2, 0.85),  # written before host_cpu
        "resnet20x6, batch 32": (1, 0.85),
        "resnet20x6, batch 32; subset bbbb2222; 1000 test images": (1, 0.2),
        "resnet20x6, batch 32; ema_decay=0.99; tta=flip": (1, 0.4),
        "resnet20x6, batch 32 (OVER BUDGET)": (1, 0.7),
        "resnet20x6, batch 32 (LOADED HOST)": (1, 0.6),
    }
    page = report.render_markdown(report.summarize(records), [], str(tmp_path), {}, skipped=skipped)
    assert ("Unless its row says otherwise, every --model=resnet20x6 row has: ema_decay=0, subset aaaa1111, 10000 test images, "
            "tta=none.") in page
    assert "| [stopped/record.json](stopped/record.json) | status interrupted |" in page
    assert "OVER BUDGET: training ran past the budget" in page
    assert "LOADED HOST: while the run trained, other processes" in page
    assert "HOST LOAD NOT MEASURED: runs whose records have no measure" in page


def test_report_writes_into_the_results_folder_it_reads(tmp_path):
    mine = tmp_path / "mine"
    _write_run(mine, "run1", 0.7)
    tracked = [os.path.join(REPO, "README.md"), os.path.join(REPO, "results", "README.md")]
    before = {p: os.path.getmtime(p) for p in tracked if os.path.exists(p)}
    env = dict(os.environ, PYTHONPATH=REPO, MPLBACKEND="Agg")
    result = subprocess.run([sys.executable, "-m", "haet.report", f"--results_dir={mine}"], env=env,
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (mine / "README.md").exists() and (mine / "figures" / "accuracy_vs_budget.png").exists()
    text = (mine / "README.md").read_text()
    assert "UMBC widened ResNet-20" in text  # the repository's published numbers
    assert f"from every `record.json` under `{mine}/` and `{REPO}/results/published.csv`" in text
    assert {p: os.path.getmtime(p) for p in before} == before  # the project's pages untouched


def test_learning_curves_show_validation_and_a_single_epoch(tmp_path, monkeypatch):
    import matplotlib.figure

    from haet import plots

    legends = []
    save = matplotlib.figure.Figure.savefig

    def record(fig, *args, **kwargs):
        legends.append([t.get_text() for t in fig.legends[0].texts])
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    row = {"epoch": "1", "elapsed_seconds": "3.5", "learning_rate": "0.1", "augmentation_strength": "",
           "loss": "2.1", "accuracy": "0.2", "val_loss": "2.2", "val_accuracy": "0.18"}
    path = plots.plot_learning_curves([row], "one epoch", str(tmp_path / "one.png"))
    assert os.path.getsize(path) > 10_000
    assert legends[-1] == ["training loss", "validation loss", "learning rate (at epoch ends)",
                           "training accuracy", "validation accuracy"]
    plots.plot_learning_curves([{k: v for k, v in row.items() if not k.startswith("val_")}], "t",
                               str(tmp_path / "two.png"))
    assert "validation loss" not in legends[-1]


def test_rows_name_what_differs_within_their_model_and_ties_show_both(tmp_path):
    """Rows of two models in one setting: a flag that only separates the models is not
    repeated (the label names the model); within a model, a value held by as many rows
    as another is no usual value, so both rows show it; an older record that lacks a
    flag says so, and a flag some records lack still separates those that have it."""
    def run(name, accuracy, model, **flags):
        _write_model_run(tmp_path, name, accuracy, model, **flags)

    run("a1", 0.70, "airbench", momentum=0.85, tta="airbench")
    run("r1", 0.60, "resnet9", momentum=0.9, tta="flip", prep="whitening", cutout_size=12)
    run("r2", 0.55, "resnet9", momentum=0.9, tta="flip", prep="conv", cutout_size=12)
    run("r3", 0.50, "resnet9", momentum=0.9, tta="airbench", prep="whitening", cutout_size=0)
    run("r4", 0.45, "resnet9", momentum=0.9, tta="flip", prep="whitening")  # older: no cutout_size
    rows = report.summarize(report.load_records(str(tmp_path)))[("cifar10", 5000, 600.0, "NVIDIA H100")]
    assert [row["recipe"] for row in rows] == [
        "airbench, batch 128",
        "resnet9, batch 128",
        "resnet9, batch 128; prep=conv",
        "resnet9, batch 128; cutout_size=0; tta=airbench",
        "resnet9, batch 128; older record: 1 flags unrecorded",
    ]
    page = report.render_markdown(report.summarize(report.load_records(str(tmp_path))), [], str(tmp_path), {})
    assert "Unless its row says otherwise, every --model=resnet9 row has: cutout_size=12, prep=whitening, tta=flip." in page
    assert "every --model=airbench row" not in page  # one row: nothing varies
    # A tie: two resnet9 rows with each value of a flag; both say theirs.
    run("r5", 0.40, "resnet9", momentum=0.9, tta="flip", prep="whitening", cutout_size=12, ema_decay=0.99)
    run("r6", 0.35, "resnet9", momentum=0.9, tta="flip", prep="whitening", cutout_size=12, ema_decay=0.0)
    rows = report.summarize(report.load_records(str(tmp_path)))[("cifar10", 5000, 600.0, "NVIDIA H100")]
    recipes = {round(row["accuracy_mean"], 2): row["recipe"] for row in rows}
    assert recipes[0.4] == "resnet9, batch 128; ema_decay=0.99" and recipes[0.35] == "resnet9, batch 128; ema_decay=0"
    assert recipes[0.6] == "resnet9, batch 128; older record: 1 flags unrecorded"
    assert recipes[0.45] == "resnet9, batch 128; older record: 2 flags unrecorded"


def test_a_schedule_the_label_does_not_name_is_shown_where_it_differs(tmp_path):
    """The label names cosine-like schedules with their rate ("cosine lr 0.4") and not
    the wall-clock or one-cycle ones: those rows show the schedule and rate where they
    differ from the usual, and a labelled schedule is not repeated."""
    def run(name, accuracy, **flags):
        _write_model_run(tmp_path, name, accuracy, "resnet9", **flags)

    run("a", 0.70, lr_schedule="wall_clock", learning_rate=0.4, cutout_size=12)
    run("b", 0.69, lr_schedule="wall_clock", learning_rate=0.4, cutout_size=8)
    run("c", 0.60, lr_schedule="one_cycle", learning_rate=0.4, cutout_size=12)
    run("d", 0.50, lr_schedule="wall_clock", learning_rate=0.8, cutout_size=12)
    run("e", 0.40, lr_schedule="cosine", learning_rate=0.8, cutout_size=12)
    rows = report.summarize(report.load_records(str(tmp_path)))[("cifar10", 5000, 600.0, "NVIDIA H100")]
    assert [row["recipe"] for row in rows] == [
        "resnet9, batch 128",
        "resnet9, batch 128; cutout_size=8",
        "resnet9, batch 128; lr_schedule=one_cycle",
        "resnet9, batch 128; learning_rate=0.8",
        "resnet9, batch 128, cosine lr 0.8",
    ]
    page = report.render_markdown(report.summarize(report.load_records(str(tmp_path))), [], str(tmp_path), {})
    # The usual values of what rows name; not those every label carries (batch size, model).
    assert ("Unless its row says otherwise, every --model=resnet9 row has: cutout_size=12, learning_rate=0.4, "
            "lr_schedule=wall_clock.") in page


def _edit_record(run, **changes):
    record = json.loads((run / "record.json").read_text())
    (run / "record.json").write_text(json.dumps({**record, **changes}))


def test_a_record_with_a_field_of_the_wrong_type_is_listed_and_the_report_goes_on(tmp_path):
    """Each of these once ended the report in a traceback (a sort, a label, a set of
    the records' settings), some after figures were rewritten."""
    _write_run(tmp_path, "good", 0.7)
    wrong = {"train_examples": {"train_examples": "abc"}, "dataset_null": {"dataset": None},
             "dataset_number": {"dataset": 5}, "variants_list": {"test_accuracy_variants": [1, 2]},
             "variants_text": {"test_accuracy_variants": "x"},
             "variant_value": {"test_accuracy_variants": {"raw": "0.5"}},
             "members": {"flags": {"batch_size": 32, "ensemble_members": "3"}},
             "width": {"flags": {"batch_size": 32, "width_multiplier": "x"}},
             "model": {"model": {"name": "resnet9"}},
             "rate": {"flags": {"batch_size": 32, "lr_schedule": "cosine", "learning_rate": "x"}},
             "device": {"device": {"name": ["a"]}}, "sha": {"subset_sha256": 5}, "backend": {"backend": ["jax"]}}
    for name, changes in wrong.items():
        _edit_record(_write_run(tmp_path, name, 0.6, budget=60.0), **changes)
    # A rate the label does not show may be anything (here: recorded as text by another tool).
    _edit_record(_write_run(tmp_path, "rate_not_shown", 0.5, budget=60.0),
                 flags={"batch_size": 32, "lr_schedule": "wall_clock", "learning_rate": "auto"})
    records, skipped = report.scan_records(str(tmp_path))
    assert sorted(os.path.basename(os.path.dirname(r["record_path"])) for r in records) == ["good", "rate_not_shown"]
    reasons = {os.path.basename(os.path.dirname(p)): why for p, why in skipped}
    assert reasons == {
        "train_examples": "train_examples 'abc' is not an integer",
        "dataset_null": "dataset None is not a string", "dataset_number": "dataset 5 is not a string",
        "variants_list": "test_accuracy_variants [1, 2] is not an object of evaluation names and accuracies",
        "variants_text": "test_accuracy_variants 'x' is not an object of evaluation names and accuracies",
        "variant_value": "test_accuracy_variants {'raw': '0.5'} is not an object of evaluation names and accuracies",
        "members": "flags.ensemble_members '3' is not an integer",
        "width": "flags.width_multiplier 'x' is not a number",
        "model": "model {'name': 'resnet9'} is not a string",
        "rate": "flags.learning_rate 'x' is not a number",
        "device": "device name ['a'] is not a string", "sha": "subset_sha256 5 is not a string",
        "backend": "backend ['jax'] is not a string"}
    page = report.render_markdown(report.summarize(records), [], str(tmp_path), {}, skipped=skipped)
    assert "| [dataset_number/record.json](dataset_number/record.json) | dataset 5 is not a string |" in page


def test_a_record_the_labels_cannot_read_is_listed_with_the_error(tmp_path, monkeypatch):
    """The last check tries the report's own reading of each record: a field a label
    reads that the type checks do not know yet leaves out that record, not the report."""
    _write_run(tmp_path, "good", 0.7)
    _edit_record(_write_run(tmp_path, "odd", 0.6), flags={"batch_size": 32, "model": "odd"})
    recipe_of = report.recipe_of

    def strict_recipe_of(record):
        if record["flags"].get("model") == "odd":
            raise KeyError("new_flag")
        return recipe_of(record)

    monkeypatch.setattr(report, "recipe_of", strict_recipe_of)
    records, skipped = report.scan_records(str(tmp_path))
    assert len(records) == 1 and [why for _, why in skipped] == ["cannot be shown (KeyError: 'new_flag')"]


def test_published_rows_need_a_budget_and_an_accuracy_and_say_which_cell_is_wrong(tmp_path):
    header = "entry,dataset,train_examples,budget_seconds,device,test_accuracy,test_examples,source,protocol_notes\n"
    good = "A,cifar10,5000,600,GPU,0.85,1000,s,p\n"
    path = tmp_path / "published.csv"
    # Sizes may be unknown (a hidden test set): empty -> None.
    path.write_text(header + good + "B,hidden,,600,V100,0.88,,s,p\n")
    assert [(r["train_examples"], r["test_examples"]) for r in report.load_published(str(path))] == [
        (5000, 1000), (None, None)]
    for row, message in (("C,cifar10,5000,600,GPU,,,s,p\n", "line 3: test_accuracy is empty"),
                         ("C,cifar10,5000,,GPU,0.8,,s,p\n", "line 3: budget_seconds is empty"),
                         ("C,cifar10,5k,600,GPU,0.8,,s,p\n", "line 3: train_examples '5k' is not an integer"),
                         ("C,cifar10,5000,600,GPU,nan,,s,p\n", "line 3: test_accuracy 'nan' is not a finite number")):
        path.write_text(header + good + row)
        with pytest.raises(ValueError, match=f"{path} {message}"):
            report.load_published(str(path))


def test_a_featured_run_whose_files_cannot_be_drawn_is_refused_before_any_figure(tmp_path):
    _write_run(tmp_path, "run", 0.7)
    run = tmp_path / "run"
    (good,) = report.load_records(str(tmp_path))
    history, (names, counts) = report.featured_files(good)
    assert len(history) == 2 and names == ["c0", "c1", "c2"] and counts == [[5, 1, 0], [0, 6, 0], [1, 0, 4]]
    header = "epoch,elapsed_seconds,learning_rate,loss,accuracy\n"
    for case, (name, content, message) in enumerate((
            ("confusion_matrix.csv", "", "is not a table of N classes"),
            ("confusion_matrix.csv", "t,a,b\na,1,2\n", "is not a table of 2 classes"),
            ("confusion_matrix.csv", "t,a,b\na,1,2\nb,x,3\n", "holds a cell that is not a count"),
            ("confusion_matrix.csv", "t,a,b\na,1,2\nb,-1,3\n", "holds a negative count"),
            ("history.csv", "loss\n1.0\n", "lacks the columns epoch, elapsed_seconds"),
            ("history.csv", header + "1,5.0,0.1,one,0.3\n", "line 2: loss 'one' is not a number"),
            ("history.csv", header + "1,5.0,0.1,2.0,0.3\nnan,9.0,0.1,2.0,0.3\n",
             "line 3: epoch 'nan' is not a finite number"),
            ("history.csv", b"\x00\xff\xfe", "cannot be read \\(UnicodeDecodeError"))):
        broken = _write_run(tmp_path / f"case{case}", "run", 0.7)
        (broken / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        (record,) = report.load_records(str(broken.parent))
        with pytest.raises(ValueError, match=f"{broken / name} {message}.*Pass --featured_run=OTHER"):
            report.make_figures([record], [], str(broken.parent / "figures"))
        assert not (broken.parent / "figures").exists()  # not one figure written
    # A diverged loss is drawn (nan), and a history of no epochs.
    (run / "history.csv").write_text(header + "1,5.0,0.1,nan,0.1\n")
    assert report.featured_files(good)[0][0]["loss"] == "nan"
    (run / "history.csv").write_text(header)
    assert report.featured_files(good)[0] == []


def test_the_command_line_refuses_a_broken_featured_run_and_empty_paths_before_writing(tmp_path):
    results_dir = tmp_path / "results"
    _write_run(results_dir, "run", 0.7)
    (results_dir / "run" / "confusion_matrix.csv").write_text("garbage\n")
    env = dict(os.environ, PYTHONPATH=REPO, MPLBACKEND="Agg")
    for flag, message in (("--out=", "--out is empty: pass --out=VALUE, or leave the flag out"),
                          ("--featured_run=run", f"{results_dir / 'run' / 'confusion_matrix.csv'} is not a table")):
        result = subprocess.run([sys.executable, "-m", "haet.report", f"--results_dir={results_dir}", flag],
                                env=env, capture_output=True, text=True)
        assert result.returncode == 2 and f"haet.report: error: {message}" in result.stderr
        assert "Traceback" not in result.stderr
        assert sorted(os.listdir(results_dir)) == ["run"]  # no page, no figures


def test_figures_are_written_only_over_figures_the_report_wrote(tmp_path):
    results_dir = tmp_path / "results"
    _write_run(results_dir, "run", 0.7)
    out = str(tmp_path / "page.md")
    run_dir = results_dir / "run"
    (run_dir / "learning_curves.png").write_text("the run's own")
    with pytest.raises(ValueError, match=f"--figures_dir='{run_dir}' is a run folder"):
        report.check_outputs(str(results_dir), out, figures_dir=str(run_dir))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "confusion_matrix.png").write_text("a figure of mine")
    with pytest.raises(ValueError, match="holds confusion_matrix.png, not written by haet.report"):
        report.check_outputs(str(results_dir), out, figures_dir=str(mine))
    # The report's own figures carry its mark: a second report replaces them.
    figures = tmp_path / "figures"
    records = report.load_records(str(results_dir))
    assert sorted(os.path.basename(p) for p in report.make_figures(records, [], str(figures)).values()) == [
        "accuracy_vs_budget.png", "confusion_matrix.png", "learning_curves.png"]
    report.check_outputs(str(results_dir), out, figures_dir=str(figures))
    # Figures written before the mark existed: the report's if its own page links them.
    from PIL import Image
    Image.new("RGB", (4, 4)).save(figures / "learning_curves.png")
    with pytest.raises(ValueError, match="holds learning_curves.png, not written"):
        report.check_outputs(str(results_dir), out, figures_dir=str(figures))
    page = report.render_markdown({}, [], str(tmp_path), {"Learning curves": str(figures / "learning_curves.png")})
    (tmp_path / "page.md").write_text(page)
    report.check_outputs(str(results_dir), out, figures_dir=str(figures))


def test_only_a_page_that_opens_with_the_reports_words_is_replaced(tmp_path):
    _write_run(tmp_path / "results", "run", 0.7)
    out = tmp_path / "page.md"
    out.write_text(f"# Notes\n\nWe ran {report.GENERATED} and kept what it wrote here.\n")
    with pytest.raises(ValueError, match="was not written by haet.report"):
        report.check_outputs(str(tmp_path / "results"), str(out))
    out.write_text(report.render_markdown({}, [], str(tmp_path), {}))
    report.check_outputs(str(tmp_path / "results"), str(out))


def test_featured_run_takes_a_folder_name_or_a_path_and_says_what_it_cannot_show(tmp_path):
    _write_run(tmp_path / "cpu", "RUN", 0.7)
    _write_run(tmp_path / "gpu", "other", 0.8)
    records, skipped = report.scan_records(str(tmp_path))
    for name in ("RUN", "cpu/RUN", "cpu/RUN/", str(tmp_path / "cpu" / "RUN")):
        assert report.featured_run(records, name)["record_path"] == str(tmp_path / "cpu" / "RUN" / "record.json")
    with pytest.raises(ValueError, match="No run folder named 'gpu/RUN'.*its path"):
        report.featured_run(records, "gpu/RUN")
    _write_run(tmp_path / "gpu", "RUN", 0.6)
    _edit_record(_write_run(tmp_path / "search", "trial", 0.6), test_accuracy=None)
    records, skipped = report.scan_records(str(tmp_path))
    with pytest.raises(ValueError, match=f"--featured_run='RUN' names 2 run folders: {tmp_path / 'cpu' / 'RUN'}; "
                                         f"{tmp_path / 'gpu' / 'RUN'}. Pass the path of one."):
        report.featured_run(records, "RUN", skipped)
    assert report.featured_run(records, "gpu/RUN", skipped)["test_accuracy"] == 0.6
    with pytest.raises(ValueError, match=f"the run {tmp_path / 'search' / 'trial'} is not in the report: "
                                         "validation only"):
        report.featured_run(records, "trial", skipped)
