"""Run by the end-to-end tests in one fresh process: a haet tool's command line once per
case, each as `python -m MODULE ARGS...` runs it (the module's `__main__` block: its flags,
`haet.cli.run`, `main`), and prints, as one JSON list on the last line of standard
output, each case's exit status and what it wrote to `sys.stdout` and `sys.stderr`.

    python tests/tool_cases.py MODULE CASES_JSON   # CASES_JSON: a list of argument lists

Why one process: the tests check, case by case, that each bad setting is refused before
any work. A process per case paid Python's start and the import of Keras and its backend
for each (5-6 s on the 2-core CI machine, about 20 cases in the e2e tier, under each
backend); here they are paid once. The successful runs the tests check stay processes
of their own (`subprocess`), as a user starts them.

What makes a case as fresh as a process of its own: the flags the module's `__main__`
block defines are removed before the next case defines them again, and every flag is
unparsed (the training flags, defined once by importing `haet.train`, stay defined:
`haet.config.define_flags` skips those that are). What a case does not get:
a fresh interpreter (modules stay imported, their state kept), nor output written to the
file descriptors themselves rather than through `sys.stdout` / `sys.stderr`: use it for
cases that end before a model trains.
"""

import contextlib
import importlib.util
import io
import json
import os
import runpy
import sys
import traceback

from absl import flags

def _forget_flags_of(module_keys):
    """Removes every flag absl registered as defined by one of `module_keys` (module names;
    absl names the `__main__` module after `sys.argv[0]`), then unparses the rest."""
    by_module = flags.FLAGS.flags_by_module_dict()
    for key in module_keys:
        for flag in list(by_module.get(key, [])):  # (removing a flag edits that list)
            if flag.name in flags.FLAGS:
                delattr(flags.FLAGS, flag.name)
        # (A flag left defined would not be defined again: absl keeps the first definition when
        # a module of the same name defines it again, its validators and all.)
        assert not by_module.get(key), f"flags of {key} still defined: {by_module[key]}"
    flags.FLAGS.unparse_flags()


def run_case(module, args):
    """Runs `python -m module *args` in this process; returns (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    status = 0
    argv = sys.argv
    main_file = importlib.util.find_spec(module).origin  # absl's name for the flags the main block defines
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            sys.argv = [module, *args]  # runpy puts the module's file name in argv[0]
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if isinstance(e.code, str):
                err.write(e.code + "\n")
        except BaseException:  # as the interpreter would: the traceback on stderr, status 1
            err.write(traceback.format_exc())
            status = 1
        finally:
            sys.argv = argv
    _forget_flags_of([main_file])
    return status, out.getvalue(), err.getvalue()


def main():
    module, cases = sys.argv[1], json.loads(sys.argv[2])
    if not isinstance(cases, list) or not all(isinstance(c, list) for c in cases):
        raise SystemExit(f"CASES_JSON must be a list of argument lists, not {sys.argv[2]!r}")
    results = []
    for args in cases:
        status, out, err = run_case(module, [str(a) for a in args])
        results.append({"args": args, "returncode": status, "stdout": out, "stderr": err})
    sys.stdout.write("\n" + json.dumps(results) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    main()
