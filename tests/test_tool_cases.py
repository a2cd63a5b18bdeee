"""tests/tool_cases.py: the one-process runner of command-line cases the e2e tests use for
refusals must give each case the flags a fresh process would (no value, definition or
validator carried over from the case before), and report exits and tracebacks as one."""

import os

from conftest import REPO, run_tool_cases

_TOOL = '''
import importlib.util
import math
import os

from absl import flags

# haet/cli.py by its path: the package's __init__ would import Keras (seconds a process).
spec = importlib.util.spec_from_file_location("haet_cli", os.environ["HAET_CLI_PATH"])
cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli)


def main(argv):
    if flags.FLAGS.name == "boom":
        raise RuntimeError("an error in main")
    print(f"rate={flags.FLAGS.rate} name={flags.FLAGS.name} verbosity={flags.FLAGS.verbosity}")


if __name__ == "__main__":
    flags.DEFINE_float("rate", 1.0, "A rate.")
    flags.DEFINE_string("name", "default", "A name.")
    flags.register_validator("rate", math.isfinite, "--rate must be a finite number.")
    cli.run(main)
'''


def test_each_case_starts_with_fresh_flags_and_reports_its_exit(tmp_path):
    (tmp_path / "case_tool.py").write_text(_TOOL)
    env = dict(os.environ, HAET_CLI_PATH=os.path.join(REPO, "haet", "cli.py"))
    # (--verbosity: absl's, defined once when absl.logging is imported, as haet.train's flags are)
    cases = [["--rate=nan"], ["--name=x", "--verbosity=1"], ["--rate=nan"], ["--rate=2"], ["--what=1"],
             ["--name=boom"], []]
    nan, named, nan_again, rated, unknown, boom, plain = run_tool_cases("case_tool", cases, env=env, cwd=tmp_path)
    for refused in (nan, nan_again):  # the validator is defined again with its flag
        assert refused.returncode == 2 and "case_tool: error: " in refused.stderr
        assert "--rate must be a finite number." in refused.stderr and refused.stdout == ""
    assert named.returncode == 0 and named.stdout == "rate=1.0 name=x verbosity=1\n"  # --rate=nan did not stay
    # Nor --name=x, nor --verbosity=1 (absl's flag, which stays defined: unparsed).
    assert rated.returncode == 0 and rated.stdout == "rate=2.0 name=default verbosity=-1\n"
    assert unknown.returncode == 2 and "Unknown command line flag 'what'" in unknown.stderr
    assert boom.returncode == 1 and "Traceback" in boom.stderr and "RuntimeError: an error in main" in boom.stderr
    assert plain.returncode == 0 and plain.stdout == "rate=1.0 name=default verbosity=-1\n" and plain.args == []
