"""The training engine: images held on the accelerator, K steps per compiled execution.

`model.fit` feeds every step from the host and, with any callback that has batch
hooks, waits for every step to finish; on a GPU a few-millisecond step then leaves
the device idle between steps. The engine instead

- puts the training images and labels on the accelerator once (uint8, as given);
- draws each epoch's permutation on the host (`np.random.default_rng((seed, epoch))`,
  so the order is the same on every backend) and copies it there, with those of
  the next epochs an execution can reach (executions may run on past epoch ends,
  see `Engine`);
- runs up to `steps_per_execution` (K) training steps as one execution: each step
  takes its batch of indices from the permutation at a position held on the device,
  gathers the images and labels there and calls the model's own Keras `train_step`
  (augmentation, loss, regularization, loss scaling, optimizer and its EMA,
  metrics); nothing crosses from the host per step;
- waits for the device only at the end of an execution (`run` returns the per-step
  losses), which is where the host reads the clock and decides whether to go on.

The number of steps of an execution is a run-time value (`lax.fori_loop` /
`tf.range` with a tensor bound, or the count of dispatches), so executions of any
length up to K share one compiled program.

Backends: JAX (`jax.jit` over the stateless `train_step`, the state donated) and
TensorFlow (a `tf.function` loop over an XLA-compiled step; under
`tf.distribute.MirroredStrategy` each replica gathers its share of the batch). With
`keras.distribution.DataParallel` (JAX) each gathered batch is sharded over the
devices.
"""

import contextlib
import dataclasses
import weakref

import keras
import numpy as np
from keras import ops

# Steps per execution unless told otherwise; see results/bench/ for the
# measurements behind it.
DEFAULT_STEPS_PER_EXECUTION = 64
EXECUTION_LOOPS = ("auto", "fused", "dispatch")
# The most epochs one execution may reach: an execution that runs on past epoch ends
# keeps each epoch's permutation of the training indices on the device.
MAX_EPOCHS_PER_EXECUTION = 1024


def order_slots(steps_per_execution, steps_per_epoch, spans_epochs=True):
    """How many epochs' permutations an execution of up to `steps_per_execution`
    steps can reach (1 when executions end with their epoch)."""
    if not spans_epochs:
        return 1
    return (steps_per_epoch + steps_per_execution - 2) // steps_per_epoch + 1


def check_steps_per_execution(steps_per_execution, steps_per_epoch, size, spans_epochs=True):
    """Refuses `steps_per_execution` (a positive integer) so large that one execution
    would reach more than `MAX_EPOCHS_PER_EXECUTION` epochs: the engine keeps a
    permutation of the `size` training indices (int32) on the device for each (a
    billion steps asked for 59.6 GiB of host memory, or hung under JAX).

    Raises:
        ValueError: naming the value and the largest one allowed.
    """
    if steps_per_epoch < 1:  # a batch larger than the set: refused with its own message
        return
    slots = order_slots(steps_per_execution, steps_per_epoch, spans_epochs)
    if slots > MAX_EPOCHS_PER_EXECUTION:
        most = (MAX_EPOCHS_PER_EXECUTION - 1) * steps_per_epoch + 1
        raise ValueError(f"steps_per_execution={steps_per_execution} would let one execution reach {slots} epochs "
                         f"of {steps_per_epoch} steps, and the device keeps a permutation of the {size} training "
                         f"examples for each ({slots * size * 4 / 1e6:.0f} MB): pass steps_per_execution <= {most} "
                         f"({MAX_EPOCHS_PER_EXECUTION} epochs).")


@dataclasses.dataclass(frozen=True)
class EpochEnd:
    """An epoch that ended in an execution, as the engine saw it.

    Attributes:
        epoch: 0-based epoch.
        steps: its steps (the steps per epoch, or fewer when training stopped inside it).
        logs: its training metrics after its last step (floats, e.g. `loss`, `accuracy`).
        learning_rate: the learning rate of the step after its last (float).
        after_steps: steps of the execution up to and including the epoch's last one;
            None for an epoch the loop ended itself (training stopped inside it).
    """

    epoch: int
    steps: int
    logs: dict
    learning_rate: float
    after_steps: int | None = None


def epoch_permutation(seed, epoch, size, member=0):
    """The order in which epoch `epoch` visits `size` training images: int32 `(size,)`.

    A function of `(seed, epoch)` only (and of `member`, for ensemble member 1 and
    on: `(seed, epoch, member)`; member 0 visits the images as a single network
    does), so a run that repeats an epoch (the planner's probe) or changes backend
    sees the same batches.
    """
    key = (seed, epoch) if member == 0 else (seed, epoch, member)
    return np.random.default_rng(key).permutation(size).astype(np.int32)


def epoch_orders(seed, epoch, size, members=1, copies=1):
    """Every member's order of epoch `epoch`, member after member: int32 `(members * size,)`.

    With `copies` precomputed augmented copies of the set, member m reads copy
    `(epoch + m) % copies` (its indices are offset into that copy), so members see
    different copies in the same epoch.
    """
    return np.concatenate([epoch_permutation(seed, epoch, size, m) + np.int32(((epoch + m) % copies) * size)
                           for m in range(members)])


def _batch(images, labels, order, step_start, batch_size, size, one_hot_classes, members=1):
    """The batch of each member m, the indices `order[m * size + step_start:][:batch_size]`,
    gathered on the device, members one after the other (`(members * batch_size, ...)`);
    labels one-hot (float32) when `one_hot_classes` is set."""
    # A gather, not a slice: TensorFlow's XLA bridge compiles a slice again for every
    # start offset (it must be a compile-time constant there).
    positions = step_start + ops.arange(batch_size, dtype="int32")
    if members > 1:
        positions = ops.reshape(ops.arange(members, dtype="int32")[:, None] * size + positions[None, :], (-1,))
    indices = ops.take(order, positions)
    x = ops.take(images, indices, axis=0)
    # With precomputed augmentation `images` holds several copies of the set and
    # `order` indexes the epoch's copy; the labels are those of the one set.
    y = ops.take(labels, ops.mod(indices, size), axis=0)
    if one_hot_classes:
        y = ops.one_hot(y, one_hot_classes, dtype="float32")
    return x, y


class Engine:
    """Runs training steps of a compiled Keras model in executions of up to K steps,
    on training images resident on the accelerator.

    The model must be compiled (optimizer, loss, metrics); its `train_step` is the
    step. An epoch is `len(images) // batch_size` steps of full batches (the
    `len % batch_size` images at the end of each epoch's permutation wait for the
    next one, so every step has one shape and compiles once).

    An `haet.models.EnsembleModel` of N members trains each member on its own
    `batch_size` images a step, in its own order (`epoch_orders`): a step gathers
    N blocks of `batch_size` rows, member after member, which the model splits.

    Usage::

        engine = Engine(model, x, y, batch_size=512)
        engine.start_epoch(0)
        while engine.steps_left_in_epoch:
            losses = engine.run(min(engine.steps_per_execution, engine.steps_left_in_epoch))
        logs = engine.epoch_metrics()

    Under JAX the training state lives in the engine between `sync()` calls: read the
    model's variables only after `sync()`, and call `reload()` after changing them.
    `assign(variable, value)` writes one variable in either case.

    **Executions across epoch ends** (`spans_epochs`, JAX): `run(steps)` may take up
    to K steps whatever is left of the epoch; the epochs that end inside the
    execution go on in the next one on the device (each its own permutation, its
    metrics started afresh at its first step), and each ended epoch's metrics and
    learning rate are kept in `ended_epochs` (`EpochEnd`) for the host to read
    after the execution. In the HAET setting an epoch is 9 steps at batch 512, so an
    execution of 64 steps replaces seven epoch-end waits with one.

    Args:
        model: a compiled `keras.Model` taking the images as they are stored.
        images: `(N, H, W, C)` array (e.g. uint8), or `(E * N, H, W, C)` holding `E`
            precomputed augmented copies of the set (`copies=E`): epoch `k` reads copy
            `k % E`.
        labels: int `(N,)` class labels.
        batch_size: examples per step, in [1, N].
        seed: int seed of the epoch permutations.
        one_hot_classes: when set, labels reach the loss as float32 one-hot rows of
            this length (losses with label smoothing).
        steps_per_execution: K, the most steps one execution runs (>= 1).
        copies: number of precomputed copies in `images` (>= 1).
        averages: weight averagers (`haet.averaging.ExponentialMovingAverage`...),
            built here on the model; after every optimizer step, inside the
            execution, each one's `update` runs on the new weights, and their
            variables are part of the training state (snapshots, checkpoints).
        span_epochs: whether executions may run past epoch ends (see above); None
            or True: they may (both backends); False: an execution ends at its
            epoch's end at the latest.
        execution_loop: JAX only: "fused" runs an execution as one compiled program
            (a `lax.fori_loop` over the steps); "dispatch" dispatches one compiled step
            after another without waiting for them (XLA on the CPU runs a loop's body
            several times slower than the same step called on its own); "auto":
            fused on accelerators, dispatch on CPUs. TensorFlow loops in a
            `tf.function` over an XLA-compiled step either way.

    Raises:
        ValueError: a batch size outside [1, N], K < 1, or images and labels that
            do not match; naming the values.
    """

    def __init__(self, model, images, labels, batch_size, seed=0, one_hot_classes=None,
                 steps_per_execution=DEFAULT_STEPS_PER_EXECUTION, copies=1, execution_loop="auto", averages=(),
                 span_epochs=None):
        if not (isinstance(copies, int) and copies >= 1):
            raise ValueError(f"copies must be a positive integer. Received: copies={copies!r}")
        if len(images) != copies * len(labels):
            raise ValueError(
                f"images must hold copies={copies} copies of the {len(labels)} labelled images. "
                f"Received {len(images)} images.")
        size = len(labels)
        if not (isinstance(batch_size, (int, np.integer)) and 1 <= batch_size <= size):
            raise ValueError(f"batch_size={batch_size!r} must be between 1 and the {size} training images.")
        if not (isinstance(steps_per_execution, (int, np.integer)) and steps_per_execution >= 1):
            raise ValueError(
                f"steps_per_execution must be a positive integer. Received: {steps_per_execution!r}")
        if execution_loop not in EXECUTION_LOOPS:
            raise ValueError(f"Unknown execution_loop {execution_loop!r}. Allowed: {', '.join(EXECUTION_LOOPS)}.")
        if getattr(model, "optimizer", None) is None:
            raise ValueError("The model must be compiled (optimizer, loss, metrics) before training.")
        if span_epochs not in (None, True, False):
            raise ValueError(f"span_epochs must be None, True or False. Received: {span_epochs!r}")
        self.model = model
        self.size = size
        self.batch_size = int(batch_size)
        self.seed = seed
        self.one_hot_classes = one_hot_classes
        self.steps_per_execution = int(steps_per_execution)
        self.copies = copies
        self.members = int(getattr(model, "ensemble_members", 1))
        self.execution_loop = execution_loop
        self.steps_per_epoch = size // self.batch_size
        self.spans_epochs = span_epochs is not False
        self.epoch = None
        self.step_in_epoch = 0
        self.ended_epochs = []  # `EpochEnd`s of the executions since the loop last took them
        # Of the last execution's steps: the epoch of each and its 1-based position there.
        self.step_epochs = np.zeros(0, np.int64)
        self.step_positions = np.zeros(0, np.int64)
        self.loop_kind = None  # how executions run: "fused", "dispatch" (JAX) or "tf.function"
        self.learning_rate = None  # the rate of the next step, after each execution
        self._logs = {}
        # The permutations on the device: one row per epoch from `_order_epoch` on, as
        # many as an execution of K steps can reach (one without `spans_epochs`).
        check_steps_per_execution(self.steps_per_execution, self.steps_per_epoch, size, self.spans_epochs)
        self._slots = order_slots(self.steps_per_execution, self.steps_per_epoch, self.spans_epochs)
        self._order_epoch, self._order_rows = None, {}
        # Builds the model's metrics and optimizer variables (as `fit` does first).
        model._symbolic_build(data_batch=_batch(
            images[:self.batch_size], labels[:self.batch_size],
            np.tile(np.arange(self.batch_size, dtype=np.int32), self.members), 0, self.batch_size, self.batch_size,
            one_hot_classes, self.members))
        self.averages = list(averages)
        tensorflow = keras.backend.backend() == "tensorflow"
        with model.distribute_strategy.scope() if tensorflow else contextlib.nullcontext():
            for average in self.averages:
                average.build(model)
        self._setup(np.asarray(images), np.asarray(labels, dtype=np.int32))

    @property
    def steps_left_in_epoch(self):
        return self.steps_per_epoch - self.step_in_epoch

    def start_epoch(self, epoch):
        """Resets the metrics and starts epoch `epoch` (its permutation goes to the
        device with the next `run`, with those of the epochs after it)."""
        self._reset_metrics()
        self.epoch = epoch
        self.step_in_epoch = 0
        self._logs = {}

    def continue_epoch(self, epoch, step_in_epoch, logs=None, learning_rate=None, ended_epochs=()):
        """Goes on inside epoch `epoch` after `step_in_epoch` of its steps (a resumed
        run, after `restore`): the metrics keep their restored values; `logs` and
        `learning_rate` are the last execution's, `ended_epochs` the `EpochEnd`s the
        loop had not taken yet.

        Raises:
            ValueError: `step_in_epoch` outside [0, steps per epoch].
        """
        if not 0 <= step_in_epoch <= self.steps_per_epoch:
            raise ValueError(f"step_in_epoch must be in [0, {self.steps_per_epoch}]. Received: {step_in_epoch!r}")
        self.epoch = epoch
        self.step_in_epoch = step_in_epoch
        self._logs = dict(logs or {})
        self.learning_rate = learning_rate
        self.ended_epochs = list(ended_epochs)

    def steps_allowed(self):
        """The most steps the next `run` may take: K, or fewer where an execution must
        end at the epoch's end (`spans_epochs` false)."""
        if self.spans_epochs:
            return self.steps_per_execution
        return min(self.steps_per_execution, self.steps_left_in_epoch)

    def take_ended_epochs(self):
        """The `EpochEnd`s since the last call, oldest first (the loop's epoch ends)."""
        ended, self.ended_epochs = self.ended_epochs, []
        return ended

    def run(self, steps):
        """Runs `steps` training steps (1 to `steps_allowed()`) as one execution and
        waits for them. With `spans_epochs`, an execution that starts at the end of
        an epoch goes on with the next one, and one that passes an epoch's end goes
        on into the next epochs (`ended_epochs` gets each).

        Returns:
            float32 `(steps,)`: the running mean of the training loss since its
            epoch's start after each step (what Keras logs per batch);
            `step_epochs` and `step_positions` say which epoch each step was in and
            where. `epoch_metrics()` and `learning_rate` are updated from the same
            execution, and an epoch that ended in it is added to `ended_epochs`.

        Raises:
            ValueError: `steps` outside [1, steps_allowed()].
            RuntimeError: no epoch started.
        """
        if self.epoch is None:
            raise RuntimeError("Call start_epoch(epoch) before run(steps).")
        if self.spans_epochs and self.step_in_epoch == self.steps_per_epoch:
            self.start_epoch(self.epoch + 1)
        limit = self.steps_allowed()
        if not (isinstance(steps, (int, np.integer)) and 1 <= steps <= limit):
            raise ValueError(f"steps must be in [1, {limit}] (K={self.steps_per_execution}, "
                             f"{self.steps_left_in_epoch} left in the epoch"
                             f"{', executions span epochs' if self.spans_epochs else ''}). Received: {steps!r}")
        losses, logs, end_logs = self._run(int(steps))
        spe = self.steps_per_epoch
        counters = self.step_in_epoch + np.arange(int(steps))  # 0-based, from the epoch's start
        epochs, positions = self.epoch + counters // spe, counters % spe + 1
        ends = np.flatnonzero(positions == spe)
        if len(ends) != len(end_logs):
            raise AssertionError(f"{len(end_logs)} epoch-end logs for {len(ends)} epoch ends")
        for index, values in zip(ends, end_logs):
            values = dict(values)
            rate = float(values.pop("learning_rate"))
            self.ended_epochs.append(EpochEnd(int(epochs[index]), spe, {k: float(v) for k, v in values.items()},
                                              rate, int(index) + 1))
        self.epoch, self.step_in_epoch = int(epochs[-1]), int(positions[-1])
        self.step_epochs, self.step_positions = epochs, positions
        self.learning_rate = float(logs.pop("learning_rate"))
        self._logs = {name: float(value) for name, value in logs.items()}
        return losses[:steps]

    def epoch_metrics(self):
        """The epoch's training metrics after the last execution as floats, e.g.
        `{"loss": ..., "accuracy": ...}` (running means over the epoch's steps); empty
        before the epoch's first execution."""
        return dict(self._logs)

    def snapshot(self):
        """A copy of the whole training state (weights, optimizer, metrics, random
        generators), for `restore`."""
        self.sync()
        return [keras.ops.convert_to_numpy(v.value) for v in self._variables()]

    def restore(self, snapshot):
        """Puts back a `snapshot()`; the next epoch must be started again (or
        `continue_epoch`).

        Raises:
            ValueError: a snapshot of another model (count or shapes differ).
        """
        variables = self._variables()
        if len(snapshot) != len(variables):
            raise ValueError(f"The snapshot has {len(snapshot)} values; the model and optimizer have "
                             f"{len(variables)} variables.")
        for variable, value in zip(variables, snapshot):
            if tuple(np.shape(value)) != tuple(variable.shape):
                raise ValueError(f"The snapshot's value for {variable.path} has shape {np.shape(value)}; the "
                                 f"variable has {tuple(variable.shape)}.")
        for variable, value in zip(variables, snapshot):
            variable.assign(value)
        self.reload()
        self.epoch = None
        self.ended_epochs = []

    def variable_paths(self):
        """The paths of the variables a `snapshot()` holds, in its order."""
        return [v.path for v in self._variables()]

    def _variables(self):
        model = self.model
        return [*model.trainable_variables, *model.non_trainable_variables,
                *model.optimizer.variables, *model.metrics_variables, *self._average_variables()]

    def _average_variables(self):
        return [v for average in self.averages for v in average.variables]

    def _apply_averages(self, trainable, non_trainable, values, optimizer_values):
        """Each averager's `update` after a step: `(trainable, non_trainable, values)`."""
        trainable, non_trainable, values, out = list(trainable), list(non_trainable), list(values), []
        for average in self.averages:
            count = len(average.variables)
            trainable, non_trainable, new = average.update(trainable, non_trainable, values[:count],
                                                           optimizer_values)
            values = values[count:]
            out += list(new)
        return list(trainable), list(non_trainable), out

    # Backend parts.
    def _setup(self, images, labels):
        raise NotImplementedError

    def _reset_metrics(self):
        """Sets the metrics' state to its initial values for a new epoch."""
        self.sync()
        self.model.reset_metrics()
        self.reload()

    def _place_order(self, steps):
        """Where the next execution's first step is in the permutations on the device,
        counted in steps from the first row's start (copying the rows of the epoch
        and the ones after it there first when they do not reach `steps` steps on)."""
        spe = self.steps_per_epoch
        if self._order_epoch is not None and self._order_epoch <= self.epoch:
            start = (self.epoch - self._order_epoch) * spe + self.step_in_epoch
            if start + steps <= self._slots * spe:
                return start
        epochs = range(self.epoch, self.epoch + self._slots)
        rows = {e: self._order_rows[e] if e in self._order_rows else
                epoch_orders(self.seed, e, self.size, self.members, self.copies) for e in epochs}
        self._put_order(np.stack([rows[e] for e in epochs]))
        self._order_epoch, self._order_rows = self.epoch, rows
        return self.step_in_epoch

    def _ended_rows(self, start, steps):
        """The rows of the epochs that end in an execution of `steps` steps from
        `start` (`_place_order`), in order."""
        spe = self.steps_per_epoch
        return [(start + j) // spe for j in range(steps) if (start + j + 1) % spe == 0]

    def _put_order(self, rows):
        """Copies the permutations `rows` (int32 `(slots, members * N)`) to the device."""
        raise NotImplementedError

    def _run(self, steps):
        """Runs `steps` steps from `(self.epoch, self.step_in_epoch)`; returns the
        per-step losses, the last step's logs (with `learning_rate`) and the logs of
        each epoch that ended in the execution (oldest first)."""
        raise NotImplementedError

    def sync(self):
        """Writes the engine's training state into the model's variables."""

    def sync_after_interrupt(self):
        """After an exception raised inside an execution (a second Ctrl-C): writes the
        state into the model's variables where they do not hold it already, so that
        the model holds the weights of the last step that ran (the interrupted
        execution's steps too: the host neither counted them nor checked their
        losses). Returns False where it cannot: the exception came between the
        execution taking the state and returning the new one (under JAX the arrays
        donated to it are deleted, and the model's variables may hold them)."""
        self.sync()
        return True

    def reload(self):
        """Reads the training state back from the model's variables."""

    def assign(self, variable, value):
        """Sets `variable` (of the model or its optimizer) to `value` for the next execution."""
        variable.assign(value)

    def read(self, variable):
        """The current value of `variable` (of the model or its optimizer) as a NumPy
        array, without syncing the whole state (one device-to-host copy)."""
        return np.asarray(keras.ops.convert_to_numpy(variable.value))


class _JaxEngine(Engine):
    """`jax.jit` of a `lax.fori_loop` over the model's stateless `train_step`."""

    def _setup(self, images, labels):
        import jax

        distribution = keras.distribution.distribution()
        self._state_shardings = None
        # Every argument is committed to its devices: jit compiles again for an
        # uncommitted argument where it saw a committed one.
        if distribution is not None:
            mesh = distribution.device_mesh.backend_mesh
            self._replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        else:
            self._replicated = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        self._images = jax.device_put(images, self._replicated)
        self._labels = jax.device_put(labels, self._replicated)
        spe, k = self.steps_per_epoch, self.steps_per_execution
        self._order = None
        self._state = None
        self._synced = True
        # The metrics' initial values (what `reset_metrics` writes), for a new epoch's
        # first step inside an execution and for `start_epoch`.
        self.model.reset_metrics()
        self._metric_initial = [np.asarray(v.value) for v in self.model.metrics_variables]
        self.reload()
        if distribution is not None:
            self._state_shardings = jax.tree.map(lambda a: a.sharding, self._state)

            def shard(batch):
                layout = distribution.get_data_layout(batch.shape).backend_layout
                return jax.lax.with_sharding_constraint(batch, layout)
        else:
            def shard(batch):
                return batch

        model, batch_size, size, members = self.model, self.batch_size, self.size, self.members
        one_hot, slots, initial = self.one_hot_classes, self._slots, self._metric_initial
        optimizer = model.optimizer

        def step(state, images, labels, order, counter):
            # `counter`: the step's place in the permutations on the device (its epoch's
            # row, `counter // spe`, and the step in that epoch), held on the device.
            row = counter // spe
            within = counter - row * spe
            # An epoch that starts inside an execution starts its metrics afresh.
            metrics = [jax.numpy.where(within == 0, start, value) for start, value in zip(initial, state[3])]
            x, y = _batch(images, labels, ops.take(order, row, axis=0), within * batch_size, batch_size, size,
                          one_hot, members)
            logs, (trainable, non_trainable, optimizer_values, metrics) = model.train_step(
                (state[0], state[1], state[2], metrics), (shard(x), shard(y)))
            trainable, non_trainable, averages = self._apply_averages(trainable, non_trainable, state[4],
                                                                      optimizer_values)
            state = (trainable, non_trainable, list(optimizer_values), list(metrics), averages)
            return logs, state, counter + 1

        def learning_rate(optimizer_values):
            # The rate the next step will use, from the optimizer's state (a schedule
            # reads its iteration count).
            with keras.StatelessScope(state_mapping=list(zip(optimizer.variables, optimizer_values))):
                return ops.cast(optimizer.learning_rate, "float32")

        def fused(state, images, labels, order, counter, steps):
            def body(i, carry):
                state, counter, losses, _, ends = carry
                row = counter // spe
                logs, state, counter = step(state, images, labels, order, counter)
                # Each epoch's row of `ends` holds the logs after its latest step: after
                # its last one once it has ended.
                values = {**logs, "learning_rate": learning_rate(state[2])}
                ends = {name: ends[name].at[row].set(values[name].astype(ends[name].dtype)) for name in ends}
                return state, counter, losses.at[i].set(logs["loss"].astype("float32")), logs, ends

            # The structure of the logs, for the loop's carry.
            shapes = jax.eval_shape(step, state, images, labels, order, counter)[0]
            logs = jax.tree.map(lambda a: jax.numpy.zeros(a.shape, a.dtype), shapes)
            ends = {name: jax.numpy.zeros((slots, *a.shape), a.dtype) for name, a in shapes.items()}
            ends["learning_rate"] = jax.numpy.zeros((slots,), "float32")
            state, _, losses, logs, ends = jax.lax.fori_loop(
                0, steps, body, (state, counter, jax.numpy.zeros((k,), "float32"), logs, ends))
            return state, losses, {**logs, "learning_rate": learning_rate(state[2])}, ends

        out = None if self._state_shardings is None else self._state_shardings
        self._fused = jax.jit(fused, donate_argnums=0, out_shardings=None if out is None else (
            out, self._replicated, self._replicated, self._replicated))
        self._step = jax.jit(step, donate_argnums=0,
                             out_shardings=None if out is None else (self._replicated, out, self._replicated))
        self._learning_rate = jax.jit(learning_rate)
        self.fused = self.execution_loop == "fused" or (
            self.execution_loop == "auto" and jax.devices()[0].platform != "cpu")
        self.loop_kind = "fused" if self.fused else "dispatch"

    def _groups(self):
        """The variables of the five parts of the state, in its order (made once: Keras
        walks every layer to list them, and they do not change once the engine is
        built), and where each variable is (`_where`)."""
        if getattr(self, "_group_lists", None) is None:
            model = self.model
            self._group_lists = tuple(list(group) for group in (
                model.trainable_variables, model.non_trainable_variables, model.optimizer.variables,
                model.metrics_variables, self._average_variables()))
            self._where = {id(v): (g, i) for g, variables in enumerate(self._group_lists)
                           for i, v in enumerate(variables)}
        return self._group_lists

    def _reset_metrics(self):
        # Without a round trip of the whole state through the model's variables: a
        # compiled function returns new arrays of the metrics' initial values (the
        # state's arrays are donated to each execution, so each epoch needs its own),
        # in one dispatch; the metric variables take the same arrays, so a `reload()`
        # keeps them.
        import jax

        metrics = self._state[3]
        if getattr(self, "_initial_metrics", None) is None:
            initial = self._metric_initial
            self._initial_metrics = jax.jit(lambda: [jax.numpy.asarray(v) for v in initial],
                                            out_shardings=[held.sharding for held in metrics])
        metrics[:] = self._initial_metrics()
        for variable, value in zip(self._groups()[3], metrics):
            variable.assign(value)

    def _put_order(self, rows):
        import jax

        self._order = jax.device_put(rows, self._replicated)

    def _run(self, steps):
        import jax

        spe = self.steps_per_epoch
        start = self._place_order(steps)
        ended_rows = self._ended_rows(start, steps)
        data = (self._images, self._labels, self._order)
        counter = jax.device_put(np.int32(start), self._replicated)
        if self.fused:
            count = jax.device_put(np.int32(steps), self._replicated)
            self._state, losses, logs, by_row = self._fused(self._state, *data, counter, count)
            self._synced = False
            losses, logs, by_row = jax.device_get((losses, logs, by_row))
            ends = [{name: values[row] for name, values in by_row.items()} for row in ended_rows]
            return np.asarray(losses, np.float32), logs, ends
        # One dispatch a step, none waited for: the device runs them back to back.
        losses, ends = [], []
        for j in range(steps):
            logs, self._state, counter = self._step(self._state, *data, counter)
            losses.append(logs["loss"])
            if (start + j + 1) % spe == 0:
                ends.append({**logs, "learning_rate": self._learning_rate(self._state[2])})
        logs = {**logs, "learning_rate": self._learning_rate(self._state[2])}
        self._synced = False
        losses, logs, ends = jax.device_get((losses, logs, ends))
        return np.asarray(losses, np.float32), logs, ends

    def sync_after_interrupt(self):
        # The model's variables hold the arrays of the last sync, donated to the
        # executions since: the state's are written back unless they were donated too.
        # A model that holds live arrays and is synced keeps them: a hook may have
        # written weights since (the moving average, the best epoch's).
        if self._state is None or any(value.is_deleted() for values in self._state for value in values):
            return False
        if self._synced and not any(variable.value.is_deleted() for variables in self._groups()
                                    for variable in variables):
            return True
        self._synced = False
        self.sync()
        return True

    def sync(self):
        if self._synced:
            return
        for variables, values in zip(self._groups(), self._state):
            for variable, value in zip(variables, values):
                variable.assign(value)
        self._synced = True

    def reload(self):
        import jax

        # Runs at every epoch's end: only values a hook replaced since the last sync
        # are committed again; the rest are the state's own.
        previous = self._state or tuple([None] * len(g) for g in self._groups())

        def current(variable, held):
            value = variable.value
            return held if value is held else jax.device_put(value, value.sharding)

        self._state = tuple([current(v, held) for v, held in zip(variables, values)]
                            for variables, values in zip(self._groups(), previous))
        self._synced = True

    def assign(self, variable, value):
        import jax

        self._groups()
        if id(variable) not in self._where:
            raise ValueError(f"{variable.path} is not a variable of the model or its optimizer.")
        g, i = self._where[id(variable)]
        array = np.asarray(value, dtype=variable.dtype)
        self._state[g][i] = jax.device_put(array, self._state[g][i].sharding)
        if self._synced:
            # The model's variables hold the state (a hook is between `sync` and
            # `reload`): this one takes the new value too, so a `reload` keeps it.
            variable.assign(self._state[g][i])

    def read(self, variable):
        self._groups()
        if id(variable) not in self._where:
            self.sync()  # not in the state's lists: its value is current once the state is written back
            return super().read(variable)
        if self._synced or self._state is None:
            return super().read(variable)
        g, i = self._where[id(variable)]
        return np.asarray(self._state[g][i])


class _TensorFlowEngine(Engine):
    """A `tf.function` loop (`tf.range` over a tensor bound) calling an XLA-compiled step
    that gathers its batch from `tf.Variable`s on the device."""

    def _setup(self, images, labels):
        import tensorflow as tf

        model = self.model
        strategy = model.distribute_strategy
        with strategy.scope():
            self._images = tf.Variable(images, trainable=False, name="train_images")
            self._labels = tf.Variable(labels, trainable=False, name="train_labels")
            self._order = tf.Variable(np.zeros((self._slots, self.members * self.size), np.int32), trainable=False,
                                      name="epoch_orders")
        batch_size, size, one_hot, members = self.batch_size, self.size, self.one_hot_classes, self.members
        spe, slots = self.steps_per_epoch, self._slots
        replicas = strategy.num_replicas_in_sync
        if batch_size % replicas:
            raise ValueError(f"batch_size={batch_size} must be divisible by the {replicas} replicas.")
        share = batch_size // replicas
        # The metrics' initial values (what `reset_metrics` writes; one replica's copy:
        # under a strategy each replica keeps its own sums), for a new epoch's first
        # step inside an execution.
        model.reset_metrics()
        metric_variables = list(model.metrics_variables)
        initial = [np.asarray(strategy.experimental_local_results(v.value)[0]) for v in metric_variables]

        def one_step(counter):
            # `counter`: the step's place in the permutations on the device (its epoch's
            # row and the step in that epoch).
            row = counter // spe
            within = counter - row * spe
            # An epoch that starts inside an execution starts its metrics afresh (each
            # replica its own share).
            for variable, start in zip(metric_variables, initial):
                variable.assign(tf.where(within == 0, tf.constant(start, variable.dtype), variable.value))
            # Each replica trains on its slice of the global batch (one slice without a strategy);
            # of an ensemble, on its slice of every member's batch.
            replica = tf.distribute.get_replica_context().replica_id_in_sync_group
            x, y = _batch(self._images, self._labels, tf.gather(self._order, row), within * batch_size
                          + replica * share, share, size, one_hot, members)
            return tf.cast(model.train_step((x, y))["loss"], tf.float32)

        one_step = tf.function(one_step, jit_compile=bool(model.jit_compile))
        averages = self._average_variables()

        def average():
            # In the cross-replica context: every replica holds the same weights after a step.
            trainable = [v.value for v in model.trainable_variables]
            non_trainable = [v.value for v in model.non_trainable_variables]
            new_trainable, new_non_trainable, values = self._apply_averages(
                trainable, non_trainable, [v.value for v in averages], [v.value for v in model.optimizer.variables])
            for variables, old, new in ((model.trainable_variables, trainable, new_trainable),
                                        (model.non_trainable_variables, non_trainable, new_non_trainable),
                                        (averages, averages, values)):
                for variable, before, after in zip(variables, old, new):
                    if after is not before:
                        variable.assign(after)

        def logs():
            # The metrics so far (summed over replicas) and the rate of the next step.
            values = {name: tf.cast(value, tf.float32) for name, value in model.get_metrics_result().items()}
            values["learning_rate"] = tf.cast(model.optimizer.learning_rate, tf.float32)
            return values

        shapes = {name: tuple(np.shape(value)) for name, value in logs().items()}

        @tf.function
        def execution(counter, steps):
            losses = tf.TensorArray(tf.float32, size=steps)
            # Each epoch's row holds its logs after its last step, once it has ended.
            ends = {name: tf.zeros((slots, *shape), tf.float32) for name, shape in shapes.items()}
            for i in tf.range(steps):
                loss = strategy.run(one_step, args=(counter + i,))
                if averages:
                    average()
                # Each replica's running mean covers its equal share: their mean is the batch's.
                losses = losses.write(i, strategy.reduce("MEAN", loss, axis=None))
                done = counter + i + 1
                ends = tf.cond(done % spe == 0, lambda: {name: tf.tensor_scatter_nd_update(
                    ends[name], [[done // spe - 1]], value[None]) for name, value in logs().items()},
                    lambda: ends)
            return losses.stack(), ends

        self._execution = execution
        self.loop_kind = "tf.function"

    def _put_order(self, rows):
        self._order.assign(rows)

    def _run(self, steps):
        import tensorflow as tf

        start = self._place_order(steps)
        losses, by_row = self._execution(tf.constant(start, tf.int32), tf.constant(steps, tf.int32))
        by_row = {name: value.numpy() for name, value in by_row.items()}
        logs = {name: keras.ops.convert_to_numpy(value) for name, value in self.model.get_metrics_result().items()}
        logs["learning_rate"] = keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)
        ends = [{name: values[row] for name, values in by_row.items()} for row in self._ended_rows(start, steps)]
        return losses.numpy(), logs, ends


def make_engine(model, images, labels, batch_size, **kwargs):
    """The `Engine` of the current Keras backend (jax or tensorflow); see `Engine`.

    Raises:
        NotImplementedError: another backend.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        return _JaxEngine(model, images, labels, batch_size, **kwargs)
    if backend == "tensorflow":
        return _TensorFlowEngine(model, images, labels, batch_size, **kwargs)
    raise NotImplementedError(f"haet trains under the jax and tensorflow backends, not {backend!r}.")


def current_weights(model):
    """`(trainable, non_trainable)`: the model's variable values, the form `Predictor` takes."""
    return ([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables])


class Predictor:
    """Compiled inference of a model with weights given as arguments.

    One compiled program (`jax.jit` / `tf.function(jit_compile=True)`) of
    `model.stateless_call(trainable, non_trainable, images, training=False)`, so any
    set of weights (the final, the raw ones next to their moving average, snapshots)
    is scored without writing it into the model. The last batch is padded to
    `batch_size`, so every call has one shape.

    Args:
        model: a built `keras.Model`.
    """

    def __init__(self, model):
        self.model = model

        def logits(trainable, non_trainable, images):
            outputs, _ = model.stateless_call(trainable, non_trainable, images, training=False)
            return ops.cast(outputs, "float32")

        backend = keras.backend.backend()
        self._sharding = None
        if backend == "jax":
            import jax

            distribution = keras.distribution.distribution()
            if distribution is not None:
                mesh = distribution.device_mesh.backend_mesh
                self._sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            self._logits = jax.jit(logits)
        elif backend == "tensorflow":
            import tensorflow as tf

            # No Python control flow to convert; AutoGraph sometimes failed on this closure
            # ("closure mismatch") and warned.
            self._logits = tf.function(tf.autograph.experimental.do_not_convert(logits), jit_compile=True,
                                       reduce_retracing=True)
        else:
            raise NotImplementedError(f"haet predicts under the jax and tensorflow backends, not {backend!r}.")

    def __call__(self, images, batch_size, weights=None):
        """Logits on `images` (`(N, ...)`, as the model takes them): float32, `(N, classes)`
        (the model's output shape with N rows).

        Args:
            images: NumPy array of model inputs.
            batch_size: examples per compiled call.
            weights: `(trainable, non_trainable)` value lists (`current_weights`), or
                None for the model's current variables.

        Raises:
            ValueError: `batch_size` not a positive integer (-1 gave no rows).
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer. Received: {batch_size!r}")
        trainable, non_trainable = weights if weights is not None else current_weights(self.model)
        if keras.backend.backend() == "tensorflow":
            trainable = [ops.convert_to_tensor(v) for v in trainable]
            non_trainable = [ops.convert_to_tensor(v) for v in non_trainable]
        outputs = []
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            size = len(batch)
            if size < batch_size:
                batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - size, axis=0)])
            if self._sharding is not None:
                import jax

                batch = jax.device_put(batch, self._sharding)
            outputs.append(np.asarray(self._logits(trainable, non_trainable, batch))[:size])
        return np.concatenate(outputs) if outputs else np.zeros((0, *self.model.output_shape[1:]), np.float32)


_PREDICTORS = weakref.WeakKeyDictionary()


def predictor_of(model):
    """The `Predictor` of `model`, compiled once per model."""
    if model not in _PREDICTORS:
        _PREDICTORS[model] = Predictor(model)
    return _PREDICTORS[model]
