"""Shared fixtures. Run under either backend: `pytest` or `KERAS_BACKEND=jax pytest`."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# Under JAX, XLA compiles every new program: each variable initializer of a model, its
# training and evaluation steps. The test processes (the two pytest-xdist workers, the
# command lines they start, the fast tier and then the e2e tier) build the same small
# models again and again, so they share JAX's persistent compilation cache. On the
# 2-core CPU it took the JAX fast tier from 257 s to 212 s cold and 114 s warm, and
# the e2e tier after it from 355 s to 275 s. It changes no result: an entry is keyed
# on the program, the compile options and the JAX version. Programs that compile in
# under 50 ms are not kept (that leaves about 450 entries after the fast tier): every
# kept entry makes each later write slower (JAX reads every entry's access time to keep
# the folder under its size limit), and caching every compile (about 2,000 entries)
# made the cold fast tier slower than no cache (394 s). The size limit turns
# on JAX's file lock around each read and write (the `filelock` package): processes
# that compile the same program at once (Optuna's parallel workers) must not read a
# half-written entry. TensorFlow ignores these variables; JAX_COMPILATION_CACHE_DIR=""
# turns the cache off.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "jax_compilation_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.05")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 * 1024**3))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.environ.get(
    "HAET_SHARED_DATA", os.path.join(os.path.dirname(REPO), "shared", "data")
)


def shared_dataset_dir(name):
    path = os.path.join(SHARED_DATA, name)
    if not os.path.exists(os.path.join(path, "train.npz")):
        raise FileNotFoundError(
            f"Real {name} data not found at {path}; set HAET_SHARED_DATA to the folder "
            "holding cifar10/ and mnist/ (train.npz, test.npz)."
        )
    return path


@pytest.fixture(scope="session")
def cifar10_arrays():
    """The real CIFAR-10 train and test arrays (canonical order)."""
    path = shared_dataset_dir("cifar10")
    with np.load(os.path.join(path, "train.npz")) as tr, np.load(os.path.join(path, "test.npz")) as te:
        return tr["x"], tr["y"], te["x"], te["y"]


@pytest.fixture(scope="session")
def cifar10_slice_dir(tmp_path_factory, cifar10_arrays):
    """A folder of npz files with the first 1,000 training and 500 test images of real CIFAR-10."""
    x_train, y_train, x_test, y_test = cifar10_arrays
    path = tmp_path_factory.mktemp("cifar10_slice")
    np.savez(path / "train.npz", x=x_train[:1000], y=y_train[:1000])
    np.savez(path / "test.npz", x=x_test[:500], y=y_test[:500])
    return str(path)


@pytest.fixture
def sigterm_after(monkeypatch):
    """`sigterm_after(steps)` arms this process to be sent SIGTERM once, after the
    execution in which a run's budget reaches `steps` kept steps; returns the list
    that will hold the steps counted when it was sent."""
    import signal

    from haet import budget as budget_lib

    def arm(steps):
        original = budget_lib.WallClockBudget.execute
        sent = []

        def execute(self, engine, n, probe=False):
            losses = original(self, engine, n, probe)
            if self.steps >= steps and not sent:
                sent.append(self.steps)
                os.kill(os.getpid(), signal.SIGTERM)
            return losses

        monkeypatch.setattr(budget_lib.WallClockBudget, "execute", execute)
        return sent

    return arm


class FakeClock:
    """A clock the test moves: `clock.t` seconds."""

    def __init__(self, t=0.0):
        self.t = t

    def __call__(self):
        return self.t


class FakeEngine:
    """Stands in for `haet.engine.Engine` in tests of the host loop: no model runs; each
    step advances `clock` by `step_seconds(step)` (the first execution also by
    `compile_seconds`), and every step records the values written with `assign`
    (by variable name) when it ran. With `spans_epochs`, executions run on past
    epoch ends as the JAX engine's do (`ended_epochs`, `step_epochs`, `step_positions`).

    Attributes:
        steps: one dict per step run (kept or probe): the assigned values, "epoch",
            "restored" (how many restores happened before it).
        executions: the steps of each `run` call.
    """

    def __init__(self, clock, size=16, batch_size=4, step_seconds=1.0, steps_per_execution=16, compile_seconds=0.0,
                 spans_epochs=False):
        import keras

        self.clock = clock
        self.steps_per_epoch = size // batch_size
        self.steps_per_execution = steps_per_execution
        self.step_seconds = step_seconds if callable(step_seconds) else (lambda step: step_seconds)
        self.compile_seconds = compile_seconds
        self.spans_epochs = spans_epochs
        self.model = keras.Model()  # an optimizer for the budget to find its learning-rate variable
        self.model.optimizer = keras.optimizers.SGD(0.1)
        self.epoch, self.step_in_epoch = None, 0
        self.values, self.steps, self.executions = {}, [], []
        self.restores, self.learning_rate = 0, 0.1
        self.ended_epochs, self.step_epochs, self.step_positions = [], [], []

    @property
    def steps_left_in_epoch(self):
        return self.steps_per_epoch - self.step_in_epoch

    def steps_allowed(self):
        return self.steps_per_execution if self.spans_epochs else min(self.steps_per_execution,
                                                                      self.steps_left_in_epoch)

    def take_ended_epochs(self):
        ended, self.ended_epochs = self.ended_epochs, []
        return ended

    def start_epoch(self, epoch):
        self.epoch, self.step_in_epoch = epoch, 0

    def continue_epoch(self, epoch, step_in_epoch, logs=None, learning_rate=None, ended_epochs=()):
        self.epoch, self.step_in_epoch, self.ended_epochs = epoch, step_in_epoch, list(ended_epochs)

    def run(self, steps):
        import numpy as np

        from haet.engine import EpochEnd

        if self.spans_epochs and self.step_in_epoch == self.steps_per_epoch:
            self.start_epoch(self.epoch + 1)
        assert self.epoch is not None and 1 <= steps <= self.steps_allowed()
        if not self.executions:
            self.clock.t += self.compile_seconds
        self.step_epochs, self.step_positions = [], []
        for j in range(steps):
            if self.step_in_epoch == self.steps_per_epoch:
                self.epoch, self.step_in_epoch = self.epoch + 1, 0
            self.clock.t += self.step_seconds(len(self.steps))
            self.steps.append({**self.values, "epoch": self.epoch, "restored": self.restores})
            self.step_in_epoch += 1
            self.step_epochs.append(self.epoch)
            self.step_positions.append(self.step_in_epoch)
            if self.step_in_epoch == self.steps_per_epoch:
                self.ended_epochs.append(EpochEnd(self.epoch, self.steps_per_epoch, self.epoch_metrics(),
                                                  self.learning_rate, j + 1))
        self.executions.append(steps)
        return np.full(steps, 1.0, np.float32)

    def epoch_metrics(self):
        return {"loss": 1.0, "accuracy": 0.5}

    def assign(self, variable, value):
        self.values[variable.name] = value

    def snapshot(self):
        return dict(self.values)

    def restore(self, snapshot):
        self.values = dict(snapshot)
        self.restores += 1
        self.epoch = None
        self.ended_epochs = []

    def sync(self):
        pass

    def reload(self):
        pass


def run_tool_cases(module, cases, env=None, cwd=None):
    """Runs `python -m module *args` for each argument list in `cases`, all in one fresh
    process (`tests/tool_cases.py`: Keras is imported once, not once per case); returns
    one `types.SimpleNamespace(args, returncode, stdout, stderr)` per case. For cases
    that end before a model trains (refusals): see tool_cases.py for what one process
    shares across its cases."""
    import json
    import subprocess
    import sys
    import types

    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    result = subprocess.run([sys.executable, os.path.join(REPO, "tests", "tool_cases.py"), module,
                             json.dumps([[str(a) for a in args] for args in cases])],
                            env=env, cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip(), result.stderr[-3000:]
    return [types.SimpleNamespace(**case) for case in json.loads(result.stdout.strip().splitlines()[-1])]
