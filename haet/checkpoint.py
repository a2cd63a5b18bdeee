"""Runs that survive: checkpoints, resume, stop signals.

A checkpoint (`RUN_DIR/checkpoint.npz`, replaced atomically each time) holds the
whole training state at an execution boundary: every variable of the model, its
optimizer (moving average of the weights, iteration count, the planned steps and
plan offset of a step-based schedule) and its metrics, the augmentation's random-generator states,
the model's input normalization (a constant of the model, not a variable: a resumed fine-tuning
run takes it from here, not from the model it fine-tunes, which may have moved or changed);
and, as JSON, the loop's position in its epoch (the epoch's order is a function of
the seed and the epoch), the budget's elapsed seconds, steps, executions and
history, the schedules' current values, each hook's state (planner, snapshots,
early stopping, health rows) and the host's random generators.
`python -m haet.train --resume=RUN_DIR` goes on from it in the same folder, on the
remaining budget only.

Why not `keras.callbacks.BackupAndRestore`: it is driven by `model.fit`'s epoch and
batch callbacks (haet trains in compiled executions without them), saves after a
count of epochs or batches rather than seconds of the budget, and keeps the
weights, optimizer and `model.fit`'s counters only: not the wall-clock budget, the
position inside an epoch of our engine, the hooks' state or the host's generators.
"""

import contextlib
import fcntl
import json
import os
import random
import signal
import socket
import zipfile

import numpy as np
from absl import logging

from haet import cli, results
from haet.loop import Hook

CHECKPOINT = "checkpoint.npz"
FORMAT = 1
_STATE_KEY = "__state__"


def _split_arrays(value, arrays):
    """`value` with each NumPy array replaced by a reference into `arrays`."""
    if isinstance(value, np.ndarray):
        key = f"a{len(arrays)}"
        arrays[key] = value
        return {"__array__": key}
    if isinstance(value, dict):
        return {k: _split_arrays(v, arrays) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split_arrays(v, arrays) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _join_arrays(value, arrays):
    if isinstance(value, dict):
        if set(value) == {"__array__"}:
            return arrays[value["__array__"]]
        return {k: _join_arrays(v, arrays) for k, v in value.items()}
    if isinstance(value, list):
        return [_join_arrays(v, arrays) for v in value]
    return value


def host_random_state():
    """Python's and NumPy's global random states, for a checkpoint."""
    version, internal, gauss = random.getstate()
    return {"python": [version, list(internal), gauss], "numpy": list(np.random.get_state())}


def set_host_random_state(state):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(tuple(state["numpy"]))


def save(path, snapshot, variable_paths, state):
    """Writes a checkpoint to `path` through a temporary file renamed over it.

    Args:
        snapshot: list of NumPy arrays (`haet.engine.Engine.snapshot()`).
        variable_paths: their variables' paths (checked on load).
        state: JSON data with NumPy arrays anywhere inside.

    Returns:
        The bytes written.

    Raises:
        OSError: the file could not be written (nothing is left behind then).
    """
    arrays = {}
    tree = _split_arrays({"format": FORMAT, "variable_paths": list(variable_paths), "state": state}, arrays)
    arrays.update({f"v{i}": np.asarray(v) for i, v in enumerate(snapshot)})
    arrays[_STATE_KEY] = np.frombuffer(json.dumps(tree).encode(), dtype=np.uint8)
    temporary = f"{path}.tmp{os.getpid()}"
    try:
        with open(temporary, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    return os.path.getsize(path)


def load(path):
    """Reads a checkpoint written by `save`.

    Returns:
        `(snapshot, variable_paths, state)`.

    Raises:
        ValueError: the file is missing or not a haet checkpoint, naming it.
    """
    try:
        with np.load(path) as f:
            files = dict(f.items())
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist: the run has no checkpoint to resume from.") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # a truncated or overwritten file
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e}).") from None
    if _STATE_KEY not in files:
        raise ValueError(f"{path} is not a haet checkpoint (no state).")
    tree = json.loads(files.pop(_STATE_KEY).tobytes().decode())
    if tree.get("format") != FORMAT:
        raise ValueError(f"{path} has checkpoint format {tree.get('format')!r}; this haet reads {FORMAT}.")
    count = len([k for k in files if k.startswith("v")])
    snapshot = [files[f"v{i}"] for i in range(count)]
    tree = _join_arrays(tree, files)
    return snapshot, tree["variable_paths"], tree["state"]


class Checkpointer(Hook):
    """Writes a checkpoint every `every_seconds` of the budget, at the first execution
    boundary after each period, and once training ended, before any hook's
    `on_train_end` changes the model, when it trained `every_seconds` or more: a
    failure or a second stop signal during the evaluation then loses no training (a
    resume only evaluates). `save` also writes one on demand. The budget's
    clock is paused while it writes (the seconds are the record's
    `checkpoint_seconds`). A write that fails (a full disk) is logged and listed
    in the run folder's `artifact_errors`; training goes on.

    Place it after every hook whose state it saves acts (last among the hooks).

    Args:
        folder: the run's `haet.results.RunFolder`.
        every_seconds: seconds of budget between checkpoints; 0: only on demand.
        record_progress: optional function called after each checkpoint (it
            updates the run's record).

    Attributes:
        saved: checkpoints written by the run (all its processes).
        bytes: size of the last one.
    """

    crosses_epochs = True

    def __init__(self, folder, every_seconds, record_progress=None):
        self.folder = folder
        self.every_seconds = float(every_seconds)
        self.record_progress = record_progress
        # Data of the run that stay the same to its end, saved in every checkpoint's state.
        self.constants = {}
        self.saved = 0
        self.saved_at_step = None  # the budget's steps at this process's last checkpoint
        self.bytes = None
        self.next_due = self.every_seconds

    @property
    def path(self):
        return os.path.join(self.folder.path, CHECKPOINT)

    def state_dict(self):
        return {"saved": self.saved, "next_due": self.next_due}

    def load_state_dict(self, state):
        self.saved, self.next_due = state["saved"], state["next_due"]

    def after_execution(self, run, steps, losses):
        if self.every_seconds and run.stopped_by is None and run.budget.elapsed() >= self.next_due:
            self.save(run)
            self.next_due = run.budget.elapsed() + self.every_seconds

    def before_train_end(self, run):
        if self.every_seconds and run.budget.elapsed() >= self.every_seconds:
            self.save(run)

    def save(self, run):
        """Writes the run's checkpoint now (between executions); returns whether it was written."""
        engine = run.engine
        with run.budget.pause():
            self.saved += 1
            # The code that wrote it: a resume with other code names it when the variables differ.
            state = {**run.state_dict(), **self.constants, "host_random": host_random_state(),
                     "git_commit": process_commit(self.folder.record)}
            try:
                self.bytes = save(self.path, engine.snapshot(), engine.variable_paths(), state)
            except BaseException as e:  # (a second stop signal too: the record counted it as written)
                self.saved -= 1
                if not isinstance(e, OSError):
                    raise
                self.folder.report_failure(CHECKPOINT, e)
                return False
            self.saved_at_step = run.budget.steps
            if CHECKPOINT in self.folder.artifact_errors:
                del self.folder.artifact_errors[CHECKPOINT]
            if self.record_progress is not None:
                self.record_progress()
        logging.info("checkpoint %d written (%.1f MB) at %.1f s of the budget", self.saved, self.bytes / 1e6,
                     run.budget.elapsed())
        return True

    def remove(self):
        """Deletes the checkpoint (a completed run no longer needs it)."""
        if os.path.exists(self.path):
            os.remove(self.path)


class StopSignals(Hook, cli.SignalHandlers):
    """SIGINT and SIGTERM stop a run cleanly: the first one stops training at the next
    execution boundary (executions are kept to about `responsive_seconds`) (`run.stop("interrupted", immediate=True)`; the caller writes
    a checkpoint and an "interrupted" record); a second one raises
    `KeyboardInterrupt` at once. Between `__enter__` and `__exit__` the handlers are
    installed (in the main thread only; elsewhere signals are left alone).

    Args:
        responsive_seconds: the most seconds of an execution once steps are timed.
        signals: the signals handled (`haet.fit` takes SIGINT only: a library call
            leaves SIGTERM to the program).
        then: what the caller does after stopping, for the warning.
        after_training: what the caller does when the first signal comes after
            training ended (`on_train_end`), for the warning: it goes on with it.

    Attributes:
        received: the first signal's number, or None.
    """

    SIGNALS = cli.SignalHandlers.signals
    crosses_epochs = True

    def __init__(self, responsive_seconds=2.0, signals=SIGNALS, then="writing a checkpoint",
                 after_training="going on to the run's end (its evaluation, record and files)"):
        self.received = None
        self.responsive_seconds = responsive_seconds
        self.signals = tuple(signals)
        self.then, self.after_training = then, after_training
        self._trained = False  # training ended: a first signal no longer stops anything
        self._run = None  # the run training, told at once (a probe stops at its next execution)

    def limit(self, run):
        # Executions of slow steps (a wide model on a CPU) are cut to about
        # `responsive_seconds`, so a signal is answered within that; on a GPU an
        # execution of K steps is far shorter and this never binds.
        per_step = run.budget.steady_step_seconds()
        if not per_step:  # only compiling executions so far: their time says nothing of a step
            return None
        return max(1, int(self.responsive_seconds / per_step))

    @property
    def name(self):
        return None if self.received is None else signal.Signals(self.received).name

    def __exit__(self, *exc):
        self._run = None
        return super().__exit__(*exc)

    def _handle(self, signum, frame):
        if self.received is not None:
            raise cli.SecondStopSignal(f"second stop signal ({signal.Signals(signum).name})", self.name)
        self.received = signum
        # Training ended, or is ending for another reason (the run's last epoch end, its
        # validation): the signal stops nothing, the run goes on to its end.
        if self._trained or (self._run is not None and self._run.stopped_by is not None):
            diverged = self._run is not None and self._run.stopped_by == "diverged"
            logging.warning("%s received after training ended: %s (send it again to stop at once)",
                            signal.Signals(signum).name,
                            "it diverged, its record is written" if diverged else self.after_training)
            return
        logging.warning("%s received: stopping at the next execution boundary and %s (send it again to stop at "
                        "once)", signal.Signals(signum).name, self.then)
        if self._run is not None:
            # At once, not after the next execution: the planner's probe (inside the hooks'
            # on_train_begin) stops at its next execution; it ran to its end, and one kept
            # execution after it, first.
            self._run.stop("interrupted", immediate=True)

    def on_train_begin(self, run):
        self._run = run
        if self.received is None:
            return
        if run.ended:
            # Resumed from the checkpoint written as training ended: what is left is its end,
            # as for a signal after training (the handler said it would stop and checkpoint).
            logging.warning("%s: this run resumes a checkpoint written once its training had ended: %s",
                            self.name, self.after_training)
            return
        run.stop("interrupted", immediate=True)

    def on_train_end(self, run):
        self._run = None
        self._trained = True


def process_commit(record):
    """The commit of the code the run's latest process runs (its last resume's, or the
    run's own), from its record; None when not known."""
    history = record.get("resume_history") or []
    return (history[-1] if history else record).get("git_commit")


def exit_code(record):
    """The process exit status for a run's record: 0 completed (every file written),
    1 failed, 3 diverged, 4 completed but a file could not be written, 128 + the
    signal's number when interrupted by one (130 SIGINT, 143 SIGTERM: what a shell
    reports for `python -m haet.train`, which ends by the signal itself)."""
    status = record.get("status")
    if status == "completed":
        return 4 if record.get("artifact_errors") else 0
    if status == "interrupted":
        return cli.signal_exit_status(record.get("interrupted_by"))
    if status == "diverged":
        return 3
    return 1


def ending_signal(record):
    """The stop signal `python -m haet.train` ends by (`haet.cli.exit_by_signal`) once a
    run's record is written, or None: the one that interrupted the run, or one that came
    after its training ended (the run went on to its end; `signal_after_training`), so
    that a shell loop of runs stops after it, as the search does. It ended normally
    (exit 0 or 4), and a loop went on with its next run."""
    if record.get("status") == "interrupted":
        return record.get("interrupted_by") or "SIGINT"
    return record.get("signal_after_training")


@contextlib.contextmanager
def run_lock(run_dir):
    """Holds an exclusive lock on the run folder `run_dir` while the block runs (a
    `flock` on the folder itself: no file is added, and the lock goes with the
    process however it ends), so that two processes never train in one folder: a
    run holds it from its folder's creation, a resume before it reads the record.

    Raises:
        ValueError: another process holds the lock (the run, or a resume of it, is
            going on), naming the folder and what to do.
    """
    descriptor = os.open(run_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"{run_dir} is in use by another process (the run, or a resume of it, is going on): "
                             "wait for it, or stop it (kill -TERM writes a checkpoint) and resume then.") from None
        except OSError as e:  # a file system without locks (some network mounts): the run goes on unlocked
            logging.warning("cannot lock %s (%s): nothing stops a second process from training in it", run_dir, e)
        yield
    finally:
        os.close(descriptor)


def resumable(run_dir):
    """Checks that `run_dir` holds a run that can go on, before any work.

    A run can be resumed when its record says "interrupted" or "failed", or
    "running" while no process of this host with the record's pid is alive (the
    process was killed), and its checkpoint exists and reads.

    Returns:
        The run's record.

    Raises:
        ValueError: naming the folder, its status and what can be done.
    """
    return resumable_with_checkpoint(run_dir)[0]


def resumable_with_checkpoint(run_dir):
    """`resumable`, returning `(record, checkpoint)`: the checkpoint as `load`
    returns it, read once for the checks and the resume."""
    if not os.path.isdir(run_dir):
        raise ValueError(f"--resume={run_dir!r} is not a folder: pass the folder of an interrupted run.")
    record = results.read_record(run_dir)
    status = record.get("status")
    if status == "completed":
        raise ValueError(f"{run_dir} has completed (test accuracy {record.get('test_accuracy')}); nothing to resume.")
    if status == "diverged":
        raise ValueError(f"{run_dir} diverged at step {record.get('diverged_at_step')}; resuming would diverge "
                         "again: start a new run with other settings (a lower --learning_rate).")
    if status == "running":
        process = record.get("process") or {}
        if process.get("host") == socket.gethostname() and alive(process.get("pid")):
            raise ValueError(f"{run_dir} is still running (pid {process.get('pid')}): stop it first "
                             "(kill -TERM writes a checkpoint).")
    elif status not in ("interrupted", "failed"):
        raise ValueError(f"{run_dir} has status {status!r}; only interrupted, failed or killed runs resume.")
    if not os.path.exists(os.path.join(run_dir, CHECKPOINT)):
        raise ValueError(f"{run_dir} has no {CHECKPOINT} (it stopped before its first checkpoint, or "
                         "--checkpoint_every=0): start the run again.")
    if not isinstance(record.get("flags"), dict):
        raise ValueError(f"{run_dir}/record.json has no flags to rebuild the run from.")
    try:
        saved = load(os.path.join(run_dir, CHECKPOINT))  # read now, before the record is touched
    except ValueError as e:
        raise ValueError(f"{e} The run cannot go on from it: start it again.") from None
    return record, saved


def alive(pid):
    """Whether a process of this host has the int `pid` (not this process's own)."""
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = ["CHECKPOINT", "Checkpointer", "StopSignals", "save", "load", "exit_code", "ending_signal", "process_commit",
           "resumable", "host_random_state", "set_host_random_state"]
