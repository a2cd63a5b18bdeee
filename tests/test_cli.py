"""haet.cli: how every haet command line refuses bad flags, arguments and settings."""

import os
import signal
import subprocess
import sys

import pytest

from conftest import REPO

_TOOL = '''
"""A tool's docstring: absl prints it, with every flag, above a UsageError."""
import importlib.util
import sys

from absl import app, flags

# haet/cli.py by its path: the package's __init__ would import Keras (seconds a process).
spec = importlib.util.spec_from_file_location("haet_cli", sys.argv.pop(1))
cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli)

flags.DEFINE_integer("count", 1, "A count.", lower_bound=1)
flags.DEFINE_string("name", None, "A name.", required=True)
flags.DEFINE_list("paths", [], "Paths.")


def main(argv):
    import os, signal, time

    name = flags.FLAGS.name
    if name == "refused":
        raise app.UsageError("--name=refused is refused: pass another --name.")
    if name in ("SIGTERM", "SIGINT"):
        os.kill(os.getpid(), signal.Signals[name])
        time.sleep(60)  # (the signal raises before)
    if name.startswith("held"):
        with cli.StopSignalsHeld("the file"):
            for _ in range(name.count("x")):
                os.kill(os.getpid(), signal.SIGTERM)
            print("written")
    print(f"ran with {flags.FLAGS.count} {flags.FLAGS.name}" + "".join(f" {p}" for p in flags.FLAGS.paths))


if __name__ == "__main__":
    cli.run(main)
'''


@pytest.fixture(scope="module")
def tool(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tool.py"
    path.write_text(_TOOL)
    return str(path)


def _run(tool, *args):
    return subprocess.run([sys.executable, tool, os.path.join(REPO, "haet", "cli.py"), *args], capture_output=True,
                          text=True)


@pytest.mark.parametrize("args, message", [
    (["--name=a", "--cuont=2"], "Unknown command line flag 'cuont'"),
    (["--name=a", "--count=0"], "flag --count=0: 0 is not a positive integer"),
    (["--name=a", "--count=two"], "flag --count=two: invalid literal for int()"),
    ([], "flag --name=None: Flag --name must have a value other than None."),
    (["--name=a", "stray"], "Unexpected arguments: ['stray']"),
    (["--name=refused"], "--name=refused is refused: pass another --name."),
])
def test_every_refusal_is_one_line_and_exit_status_2(tool, args, message):
    result = _run(tool, *args)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0].startswith("tool.py: error: ") and message in lines[0], result.stderr
    assert lines[1:] == ["Pass --helpshort or --helpfull to see help on flags."]


def test_good_flags_run_main_and_help_still_works(tool):
    result = _run(tool, "--name=a", "--count=3")
    assert result.returncode == 0 and result.stdout == "ran with 3 a\n"
    # A leading ~ is the home folder, as the shell makes it of `--name ~/runs` but not of `--name=~/runs`.
    home = subprocess.run([sys.executable, tool, os.path.join(REPO, "haet", "cli.py"), "--name=~/runs",
                           "--paths=~/a,b/~,~"], capture_output=True, text=True,
                          env={**os.environ, "HOME": "/home/someone"})
    assert home.returncode == 0 and home.stdout == "ran with 1 /home/someone/runs /home/someone/a b/~ /home/someone\n"
    helped = _run(tool, "--helpshort")  # (absl's help exits with status 1; haet leaves it so)
    assert "A tool's docstring" in helped.stdout and "--count" in helped.stdout and helped.returncode != 2


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_stop_signal_ends_a_tool_with_one_line_then_by_the_signal(tool, signal_name):
    """SIGTERM killed a tool at once (nothing written, no line); Ctrl-C printed a
    traceback. It ends by the signal (a shell's 130 or 143), not `exit(130)`, which a
    shell loop running the tool went on after."""
    result = _run(tool, f"--name={signal_name}")
    assert result.returncode == -signal.Signals[signal_name] and result.stderr == f"tool.py: stopped by {signal_name}\n"


def test_a_stop_signal_while_finished_work_is_written_waits_for_it(tool):
    held = _run(tool, "--name=heldx")
    assert held.returncode == 0 and held.stdout.startswith("written")
    assert held.stderr == ("SIGTERM received while the file is written: it is finished first (send it again to stop "
                           "at once)\n")
    twice = _run(tool, "--name=heldxx")  # the second stops at once
    assert twice.returncode == -signal.SIGTERM and twice.stdout == ""
    assert twice.stderr.splitlines()[-1] == "tool.py: stopped by SIGTERM (second stop signal (SIGTERM))"


def test_the_sigterm_handler_is_the_callers_again_after_a_tool(tmp_path):
    """A process that runs a tool and goes on (a test runner running several cases):
    its SIGTERM raised Terminated wherever it came, after the tool had returned."""
    script = tmp_path / "twice.py"
    script.write_text(f"""
import importlib.util, signal, sys
spec = importlib.util.spec_from_file_location("haet_cli", {os.path.join(REPO, "haet", "cli.py")!r})
cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli)
from absl import flags
flags.DEFINE_string("name", "a", "A name.")
try:
    cli.run(lambda argv: print("ran"), argv=["tool"])
except SystemExit:
    pass
print(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
""")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert result.stdout.splitlines() == ["ran", "True"], result.stderr[-2000:]


def test_new_output_files_are_checked_before_any_work(tmp_path):
    from haet import plots, results

    existing = tmp_path / "page.png"
    existing.write_text("mine")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    cases = [(str(existing), "exists and is not overwritten"), (str(tmp_path), "is a folder"),
             (str(a_file / "out.json"), "is a file, not a folder"), ("", "--json is empty")]
    if not os.access(locked, os.W_OK):  # (root may write anywhere)
        cases.append((str(locked / "out.json"), "no write permission"))
    for path, message in cases:
        with pytest.raises(ValueError, match=message):
            results.check_new_file(path, "--json")
    new = tmp_path / "deep" / "er" / "out.json"
    results.check_new_file(str(new), "--json")  # missing folders are fine: make_parents makes them
    assert results.make_parents(str(new)) == str(new) and new.parent.is_dir() and not new.exists()
    assert existing.read_text() == "mine"
    plots.check_figure_path("figure.svg", "--out")
    plots.check_figure_path("figure", "--out")  # (PNG)
    with pytest.raises(ValueError, match=r"--out='figure.txt': matplotlib cannot write .txt files. Use one of .*\.png"):
        plots.check_figure_path("figure.txt", "--out")


def test_a_new_file_is_written_whole_or_not_at_all(tmp_path, capsys):
    import errno

    from haet import cli, results

    def disk_full(path):
        with open(path, "w") as f:
            f.write("half a file")
        raise OSError(errno.ENOSPC, "No space left on device", path)

    target = tmp_path / "rows.json"
    with pytest.raises(OSError, match="No space left"):
        results.write_new_file(str(target), disk_full)
    assert os.listdir(tmp_path) == []  # no truncated file to refuse the rerun, no temporary
    assert results.write_new_file(str(target), lambda p: open(p, "w").write("[]")) == str(target)
    assert target.read_text() == "[]" and os.listdir(tmp_path) == ["rows.json"]
    with pytest.raises(FileExistsError, match="exists and is not overwritten"):
        results.write_new_file(str(target), lambda p: open(p, "w").write("{}"))
    assert target.read_text() == "[]"
    # A run folder of several files: all of them, or no folder (the report meets no half-written one).
    runs = tmp_path / "runs"
    with pytest.raises(OSError, match="No space left"):
        results.write_run_folder(str(runs), "x", {"record.json": "{}\n", "figure.png": disk_full})
    assert os.listdir(runs) == []
    (folder,) = [results.write_run_folder(str(runs), "x", {"record.json": "{}\n", "rows.csv": "a\n1\n"})]
    assert os.listdir(runs) == [os.path.basename(folder)] and sorted(os.listdir(folder)) == ["record.json",
                                                                                           "rows.csv"]
    with pytest.raises(SystemExit) as exit_:
        cli.not_written("--json=rows.json", OSError(errno.ENOSPC, "No space left on device", "rows.json"))
    assert exit_.value.code == 4
    assert capsys.readouterr().err.endswith(
        ": could not write --json=rows.json: No space left on device (rows.json)\n")


def test_the_listing_of_settings_refuses_flags_and_the_data_tool_starts_clean():
    """`python -m haet.config` used to print its listing whatever followed it; `python -m
    haet.data` warned that runpy found haet.data imported by the package (haet.fit's module)."""
    refused = subprocess.run([sys.executable, "-m", "haet.config", "--budget=3"], capture_output=True, text=True,
                             cwd=REPO)
    assert refused.returncode == 2 and refused.stdout == ""
    assert "haet.config: error: Unknown command line flag 'budget'" in refused.stderr
    listing = subprocess.run([sys.executable, "-m", "haet.config"], capture_output=True, text=True, cwd=REPO)
    assert listing.returncode == 0 and "  --budget=600.0  Training budget in seconds" in listing.stdout
    data_help = subprocess.run([sys.executable, "-m", "haet.data", "--helpshort"], capture_output=True, text=True,
                               cwd=REPO)
    assert "--export_dir" in data_help.stdout and "RuntimeWarning" not in data_help.stderr, data_help.stderr
