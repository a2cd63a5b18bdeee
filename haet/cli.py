"""How haet's command lines start and refuse: `haet.cli.run(main)` in place of `absl.app.run(main)`.

absl's `app.run` answers a flag it cannot parse with exit status 1, the status haet's
tools keep for a run that failed, and a `UsageError` with the module's whole help
(its docstring and every flag) printed above the one line that says what is wrong.
`run` keeps absl (flag files, `--helpshort`, `--helpfull`, logging set-up) and changes
only these two answers: bad flags and refused settings print one line, then a hint
at the help, and exit with `USAGE_ERROR` (2), before any work. A file that cannot be
written after the work ends the tool with `not_written` (exit status 4).

Stop signals: SIGTERM is raised in the tool as a `Terminated` (a `KeyboardInterrupt`,
as Python raises SIGINT), so that every tool stops on it as it does on Ctrl-C, writing
what it has, where before SIGTERM killed it at once; a stop signal the tool does not
handle ends it with one line, not a traceback, then by the signal itself
(`exit_by_signal`: a shell reports 130 or 143, and a loop running the tool stops).
`StopSignalsHeld` holds them while finished work is written.
"""

import contextlib
import os
import signal
import sys
import threading

from absl import app, flags

USAGE_ERROR = 2
# As `python -m haet.train`'s "completed, but a file could not be written".
NOT_WRITTEN = 4
_HINT = "Pass --helpshort or --helpfull to see help on flags."


def program_name(argv=None):
    """`python -m haet.X`'s name for itself (`haet.X`), or the script's file name."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        return spec.name
    return os.path.basename((argv or sys.argv or ["haet"])[0])


def refuse(message, argv=None):
    """Prints `NAME: error: message` and the hint at the help to standard error, then
    exits with status 2 (`SystemExit`)."""
    sys.stderr.write(f"{program_name(argv)}: error: {message}\n{_HINT}\n")
    sys.stderr.flush()
    raise SystemExit(USAGE_ERROR)


def not_written(what, error, argv=None):
    """After the work, a file that could not be written (a full disk, a read-only
    folder): prints `NAME: could not write what: error` to standard error and exits
    with `NOT_WRITTEN` (4). The tools print their results before writing them, so a
    failed write loses the file, not the numbers; `haet.results.write_new_file`
    leaves no truncated file behind to refuse the rerun."""
    detail = f"{type(error).__name__}: {error}" if not isinstance(error, OSError) or not error.strerror else (
        f"{error.strerror}" + (f" ({error.filename})" if error.filename else ""))
    sys.stderr.write(f"{program_name(argv)}: could not write {what}: {detail}\n")
    sys.stderr.flush()
    raise SystemExit(NOT_WRITTEN)


def parse_flags(argv):
    """absl's flag parsing, with a parse error (unknown flag, bad value, a value out of
    its bounds, a missing required flag) answered by `refuse`: exit status 2.

    A value (or list item) starting with `~` is expanded as the shell expands a word
    (`os.path.expanduser`): bash expands `--data_dir ~/data` but not
    `--data_dir=~/data`, which made a run read, or a results folder be made under, a
    folder literally named `~` in the working directory."""
    try:
        remaining = flags.FLAGS(argv)
    except flags.Error as e:
        refuse(str(e), argv)
    for name in flags.FLAGS:
        flag = flags.FLAGS[name]
        if not flag.present:
            continue
        if isinstance(flag.value, str) and flag.value.startswith("~"):
            flag.value = os.path.expanduser(flag.value)
        elif isinstance(flag.value, list) and any(isinstance(v, str) and v.startswith("~") for v in flag.value):
            flag.value = [os.path.expanduser(v) if isinstance(v, str) else v for v in flag.value]
    return remaining


class SecondStopSignal(KeyboardInterrupt):
    """A second stop signal, raised at once. `signal_name`: the first signal's, the
    one a record's `interrupted_by` names, for the exit status (a second SIGTERM
    exited 130, as if it were SIGINT)."""

    def __init__(self, message, signal_name=None):
        super().__init__(message)
        self.signal_name = signal_name


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as Python raises SIGINT (`signal_name` "SIGTERM", as
    `SecondStopSignal` names its signal)."""

    signal_name = "SIGTERM"

    def __init__(self, message="SIGTERM"):
        super().__init__(message)


def _raise_terminated(signum, frame):
    raise Terminated()


def signal_exit_status(signal_name):
    """128 + the number of the signal named `signal_name` (a `KeyboardInterrupt`'s
    `signal_name`, a record's `interrupted_by`), as a shell reports a process a signal
    ended: 143 for SIGTERM, 130 for SIGINT, None or a name that is not a signal's."""
    return 128 + int(signal.Signals[signal_name] if signal_name in signal.Signals.__members__ else signal.SIGINT)


def exit_by_signal(signal_name):
    """Ends the process by the signal named `signal_name` (a `KeyboardInterrupt`'s
    `signal_name`, a record's `interrupted_by`; SIGINT for None or a name that is not
    a signal's), once the tool has written what it keeps: the default handler
    is put back and the signal sent to the process. Why not `sys.exit(130)`: a shell
    goes on with a loop or script whose command exited normally, whatever the status
    (it stops one that a signal ended), and interpreter shutdown waits for a device
    execution still in flight (minutes of a benchmark's steps); the status a shell
    reports is the same, 128 + the signal's number."""
    sys.stdout.flush()
    sys.stderr.flush()
    number = signal_exit_status(signal_name) - 128
    signal.signal(number, signal.SIG_DFL)
    os.kill(os.getpid(), number)
    raise SystemExit(128 + number)  # (where the signal could not end it)


class SignalHandlers(contextlib.AbstractContextManager):
    """A context in which `self._handle(signum, frame)` answers each of `self.signals`
    (SIGINT and SIGTERM unless a subclass says otherwise); the handlers before it are
    put back at its end. Main thread only: elsewhere Python cannot install handlers,
    and the signals are left alone."""

    signals = (signal.SIGINT, signal.SIGTERM)
    _previous = None

    def _handle(self, signum, frame):
        raise NotImplementedError

    def __enter__(self):
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in (self._previous or {}).items():
            signal.signal(sig, handler)
        self._previous = {}
        return False


class StopSignalsHeld(SignalHandlers):
    """While finished work is written (a result, its files): a first SIGINT or SIGTERM
    is held, not raised, so that the files are whole; a second raises at once (as a
    `KeyboardInterrupt`, or `Terminated`). `received`: the held signal's name, or None.
    Main thread only (elsewhere the signals are left alone).

    Args:
        what: what is being written, for the message printed when a signal is held.
    """

    def __init__(self, what):
        self.what, self.received = what, None

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received is not None:
            raise SecondStopSignal(f"second stop signal ({name})", self.received)
        self.received = name
        sys.stderr.write(f"{name} received while {self.what} is written: it is finished first (send it again to "
                         "stop at once)\n")
        sys.stderr.flush()


def refuse_unread(reasons):
    """Refuses (`app.UsageError`, exit status 2 under `run`) a flag this tool defines
    but does not read (`haet.train`'s, which a tool takes with its training flags),
    given on the command line or in a flagfile: it was accepted and did nothing.

    Args:
        reasons: flag name -> what to do instead, for the message.
    """
    for name, instead in reasons.items():
        if name in flags.FLAGS and flags.FLAGS[name].present:
            raise app.UsageError(f"--{name} does nothing in {program_name()}: {instead}")


def run(main, argv=None):
    """Runs `main(argv)` as `absl.app.run` does, with `parse_flags` as the flag parser
    and a `absl.app.UsageError` raised by `main` answered by `refuse` (exit status 2,
    whatever the error's own `exitcode`). haet's tools take flags only: an argument
    left after the flags is refused before `main` runs. While `main` runs, SIGTERM
    raises `Terminated` (where no handler but the default was set), and a stop signal
    `main` lets through ends the tool with one line, then `exit_by_signal`."""

    def main_refusing(args):
        if len(args) > 1:
            refuse(f"Unexpected arguments: {args[1:]} (haet's tools take flags only, e.g. --flag=value)", args)
        previous = None
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL):
            previous = signal.signal(signal.SIGTERM, _raise_terminated)
        try:
            return main(args)
        except app.UsageError as e:
            refuse(str(e), args)
        except KeyboardInterrupt as e:
            detail = str(e) if str(e) and str(e) != getattr(e, "signal_name", None) else ""
            sys.stderr.write(f"{program_name(args)}: stopped by {getattr(e, 'signal_name', None) or 'SIGINT'}"
                             f"{f' ({detail})' if detail else ''}\n")
            exit_by_signal(getattr(e, "signal_name", None))
        finally:
            if previous is not None:  # (a process that runs a tool more than once: its own handler again)
                signal.signal(signal.SIGTERM, previous)

    app.run(main_refusing, argv=argv, flags_parser=parse_flags)
