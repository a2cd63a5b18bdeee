"""Hooks of the training toolkit (`haet.loop.Hook`): validation, the weights' moving
average, snapshot ensembles and the training-health monitor.

They act between compiled executions: a hook that must see a particular step caps
the execution before it (`limit`), so nothing runs per step on the host.
"""

import time

import keras
import numpy as np
from absl import logging

from haet import autodiff, evaluation
from haet.loop import Hook


class Validation(Hook):
    """Scores the model on a held-out split at each epoch end: `val_loss` (mean
    cross-entropy in nats, no weight penalty, no label smoothing) and `val_accuracy`
    in the epoch's logs (hence the history, early stopping and TensorBoard).

    Args:
        images: uint8 `(N, H, W, C)`; labels: int `(N,)`.
        num_classes: K.
        batch_size: examples per prediction step.
    """

    def __init__(self, images, labels, num_classes, batch_size):
        self.images, self.labels = images, labels
        self.num_classes, self.batch_size = num_classes, batch_size

    def on_train_begin(self, run):
        # Compile the predictor now (the budget counts it), so that the first epoch's
        # end costs what every epoch's end costs (the planner charges it to each).
        evaluation.predict_logits(run.engine.model, self.images[:1], self.batch_size)

    def on_epoch_end(self, run, epoch, logs):
        probabilities = evaluation.predict_probabilities(run.engine.model, self.images, self.batch_size)
        scores = evaluation.scores(probabilities, self.labels, self.num_classes)
        logs["val_loss"], logs["val_accuracy"] = scores["loss"], scores["accuracy"]


class DivergenceGuard(Hook):
    """Stops a run at once at its first non-finite training loss (`run.stop("diverged",
    immediate=True)`), from the per-step losses each execution already returns (no
    extra wait for the device).

    The losses are running means since each step's epoch began (the engine's
    `step_positions` say where), so the first non-finite one is the first
    non-finite step; the last finite step's own loss is recovered from two running
    means (`k m_k - (k - 1) m_(k-1)`).

    Attributes (set when it stops the run):
        step: the run's 1-based step whose loss was not finite.
        last_finite_loss: the training loss of the step before it (None if that is
            not known: the first step of the run).
    """

    crosses_epochs = True

    def __init__(self):
        self.step = None
        self.last_finite_loss = None
        self._previous = None  # (epoch, running mean, the step's own loss) after the last execution

    def state_dict(self):
        return {"previous": self._previous}

    def load_state_dict(self, state):
        self._previous = state["previous"]

    def after_execution(self, run, steps, losses):
        engine = run.engine
        means = np.asarray(losses, np.float64)
        positions = np.asarray(engine.step_positions)  # 1-based, in each step's epoch
        same_epoch = self._previous is not None and self._previous[0] == int(engine.step_epochs[0])
        before = np.concatenate([[self._previous[1] if same_epoch and positions[0] > 1 else 0.0], means[:-1]])
        with np.errstate(invalid="ignore", over="ignore"):
            step_losses = positions * means - (positions - 1) * before
        finite = np.isfinite(means)
        if finite.all():
            self._previous = (engine.epoch, float(means[-1]), float(step_losses[-1]))
            return
        bad = int(np.argmin(finite))
        self.step = run.budget.steps - steps + bad + 1
        if bad:
            self.last_finite_loss = float(step_losses[bad - 1])
        elif self._previous is not None:
            self.last_finite_loss = self._previous[2]
        logging.error("training diverged: the loss of step %d is %s (the step before: %s); stopping",
                      self.step, means[bad], self.last_finite_loss)
        run.stop("diverged", immediate=True)


class LookaheadEnd(Hook):
    """At the end of training, the weights and batch-norm statistics take the values
    of `lookahead` (a `haet.averaging.Lookahead` the engine updates): airbench94's
    `lookahead_state.update(model, decay=1.0)` after its last step, which drops the
    steps since the last update (of airbench94's 476 steps, the last one). Nothing is
    written before the lookahead's first update. Place it before `MovingAverage`,
    whose raw weights are then the lookahead's."""

    crosses_epochs = True

    def __init__(self, lookahead):
        self.lookahead = lookahead

    def on_train_end(self, run):
        if not int(keras.ops.convert_to_numpy(self.lookahead.started.value)):
            return
        self.lookahead.write_into(run.engine.model)


class MovingAverage(Hook):
    """At the end of training, keeps host copies of the raw weights (`raw_weights`,
    `(trainable, non_trainable)` value lists: the form `haet.engine.Predictor` takes)
    and writes the moving average (`average`, a `haet.averaging.ExponentialMovingAverage`
    the engine updates) into the model: weights, and batch-norm statistics when it
    averages them. With `recompute=(images, batch_size)` the statistics are then
    recomputed under the averaged weights (`haet.averaging.recompute_batch_norm_statistics`;
    `recompute_seconds` says how long it took, on `clock`). Place it before
    `KerasCallbacks` so callbacks see the averaged weights, as with Keras' own EMA.
    """

    raw_weights = None
    recompute_seconds = None
    crosses_epochs = True

    def __init__(self, average, recompute=None, clock=None):
        self.average, self.recompute, self.clock = average, recompute, clock or time.perf_counter

    def on_train_end(self, run):
        model = run.engine.model
        self.raw_weights = tuple([keras.ops.convert_to_numpy(v.value) for v in variables]
                                 for variables in (model.trainable_variables, model.non_trainable_variables))
        self.average.write_into(model)
        if self.recompute is not None:
            from haet.averaging import recompute_batch_norm_statistics

            start = self.clock()
            recompute_batch_norm_statistics(model, *self.recompute)
            self.recompute_seconds = self.clock() - start


class SnapshotKeeper(Hook):
    """Keeps copies of the model's weights at the ends of learning-rate cycles, for a
    snapshot ensemble (Huang et al. 2017, "Snapshot ensembles: train 1, get M for
    free": cosine cycles with restarts, one model kept at the end of each cycle).

    `progress` (a `haet.budget.Progress`) gives the fraction of the run done (of the
    planned steps, or of the budget); executions are cut where a fraction is reached,
    and the weights (batch-norm statistics included) are copied to the host there. A
    cycle end already behind the steps done when an execution is about to start (a
    plan changed without the schedule's plan offset, see `haet.budget.StepPlanner`)
    is kept then, with the weights as they are. The last fraction is the run's
    end: its snapshot is taken when training ends, whatever stopped it. Cycle ends
    that fall on one step (a plan of fewer steps than cycles) keep one snapshot: the
    same weights twice made a member count twice and cost a pass more.

    Attributes:
        snapshots: list of `(fraction, weights)`; `weights` is `(trainable,
            non_trainable)`, lists of numpy arrays (`haet.engine.current_weights`).

    Args:
        fractions: increasing fractions of the run in (0, 1], the last one 1.
        progress: a `haet.budget.Progress` (`fraction()`, `steps_until(fraction)`).

    Raises:
        ValueError: fractions not increasing in (0, 1] or not ending at 1.
    """

    crosses_epochs = True

    def state_dict(self):
        return {"snapshots": [[fraction, list(trainable), list(non_trainable)]
                              for fraction, (trainable, non_trainable) in self.snapshots],
                "passed": self.passed, "taken_at_step": self.taken_at_step}

    def load_state_dict(self, state):
        self.snapshots = [(fraction, (list(trainable), list(non_trainable)))
                          for fraction, trainable, non_trainable in state["snapshots"]]
        # (a checkpoint from before: one snapshot for each cycle end passed)
        self.passed = state.get("passed", len(self.snapshots))
        self.taken_at_step = state.get("taken_at_step")

    def __init__(self, fractions, progress):
        fractions = [float(f) for f in fractions]
        if (not fractions or fractions[-1] != 1.0 or any(not 0.0 < f <= 1.0 for f in fractions)
                or any(a >= b for a, b in zip(fractions, fractions[1:]))):
            raise ValueError(f"snapshot fractions must increase within (0, 1] and end at 1. Received: {fractions}")
        self.fractions = fractions
        self.progress = progress
        self.snapshots = []
        self.passed = 0  # cycle ends passed (before the last)
        self.taken_at_step = None  # the budget's steps at the last snapshot

    def _pending(self):
        done = self.passed
        return self.fractions[done] if done < len(self.fractions) - 1 else None

    def _take(self, run, fraction):
        if self.taken_at_step == run.budget.steps:
            logging.info("cycle end at %.3f of the run: the same step as snapshot %d, kept once", fraction,
                         len(self.snapshots))
            return
        self.taken_at_step = run.budget.steps
        run.engine.sync()
        model = run.engine.model
        weights = ([np.array(v) for v in model.trainable_variables], [np.array(v) for v in model.non_trainable_variables])
        self.snapshots.append((fraction, weights))
        logging.info("snapshot %d kept at %.3f of the run", len(self.snapshots), fraction)

    def _take_due(self, run):
        while self._pending() is not None and self.progress.fraction() >= self._pending():
            self.passed += 1
            self._take(run, self.progress.fraction())

    def before_execution(self, run):
        # A plan changed since the last execution without the schedule's plan offset
        # (haet.budget.StepPlanner) can put a cycle end behind the steps done: keep the
        # weights as the last steps left them, near the lowest learning rate of their
        # cycle, not after one more step into the next cycle's high rate.
        self._take_due(run)

    def limit(self, run):
        pending = self._pending()
        return None if pending is None else self.progress.steps_until(pending)

    def after_execution(self, run, steps, losses):
        self._take_due(run)

    def on_train_end(self, run):
        self._take(run, min(1.0, self.progress.fraction()))


def _gradient_function(model, loss_fn):
    """A function of `(x, y)` giving the gradients of `loss_fn(y, model(x,
    training=True))` w.r.t. the model's trainable variables at their current
    values, as NumPy arrays, without touching the model's state (batch-norm
    statistics, seeds): `model.stateless_call` under
    `haet.autodiff.compiled_value_and_gradient` (compiled at its first call)."""

    def loss_of(trainable, non_trainable, x, y):
        logits, _ = model.stateless_call(trainable, non_trainable, x, training=True)
        return loss_fn(y, logits), None

    gradient = autodiff.compiled_value_and_gradient(loss_of)
    return lambda x, y: gradient([v.value for v in model.trainable_variables],
                                 [v.value for v in model.non_trainable_variables], x, y)[2]


class TrainingHealth(Hook):
    """Logs, every `every_steps` steps, each weight matrix's update-to-weight norm
    ratio and gradient norm (the checks of CS231n / Karpathy's "A recipe for training
    neural networks": update/weight ratios near 1e-3 are healthy, far above means
    the learning rate is too high, far below too low).

    A sampled step runs as an execution of its own: the trainable weights with 2 or
    more dimensions (kernels) are copied before and after it: ratio =
    ||w_after - w_before|| / ||w_before||. The gradient is that of the data loss (no
    weight penalty) on a fixed probe batch at the weights before the step
    (`model.stateless_call`, so no state changes), compiled at the first sample.
    Costs host copies of the weights and a gradient per sample, and that compilation:
    the time counts toward the budget (off by default).

    Outputs:
        `rows`: dicts step, variable, weight_norm, update_norm, update_ratio, grad_norm
        (one per kernel per sample; the variable "(all)" holds global norms);
        epoch logs (hence the history and TensorBoard): `health_update_ratio_median`,
        `health_update_ratio_max`, `health_grad_norm` of the epoch's last sample;
        with `summary_dir`, per-kernel scalars as TensorBoard summaries.

    Args:
        probe_x, probe_y: a fixed training batch (model inputs and labels as the loss takes them).
        loss_fn: the training loss, a Keras loss on logits.
        every_steps: sample period in steps (>= 1).
        summary_dir: folder for TensorBoard summaries, or None.

    Raises:
        ValueError: `every_steps` < 1.
    """

    crosses_epochs = True  # the epoch logs carry the last sample, whenever it was

    def __init__(self, probe_x, probe_y, loss_fn, every_steps=50, summary_dir=None):
        if not (isinstance(every_steps, int) and every_steps >= 1):
            raise ValueError(f"every_steps must be a positive integer. Received: {every_steps!r}")
        self.probe_x, self.probe_y = probe_x, probe_y
        self.loss_fn = loss_fn
        self.every_steps = every_steps
        self.summary_dir = summary_dir
        self.rows = []
        self._before = None
        self._epoch_summary = None
        self._writer = None
        self._member_of = None
        self._gradient = None  # the probe's gradient function, made at the first sample

    def state_dict(self):
        return {"rows": self.rows, "epoch_summary": self._epoch_summary}

    def load_state_dict(self, state):
        self.rows = [dict(r) for r in state["rows"]]
        self._epoch_summary = state["epoch_summary"]

    def _kernels(self, model):
        return [(i, v) for i, v in enumerate(model.trainable_variables) if len(v.shape) >= 2]

    def _name(self, model, variable):
        """The variable's path; of an ensemble member's, prefixed `member<m>/` (members
        share layer names). The prefixes are looked up once per run."""
        if self._member_of is None:
            self._member_of = {id(v): m for m, backbone in enumerate(getattr(model, "member_backbones", list)())
                               for v in backbone.trainable_variables}
        member = self._member_of.get(id(variable))
        return variable.path if member is None else f"member{member}/{variable.path}"

    def limit(self, run):
        offset = run.budget.steps % self.every_steps
        return 1 if offset == 0 else self.every_steps - offset

    def before_execution(self, run):
        if run.budget.steps % self.every_steps == 0:
            run.engine.sync()
            model = run.engine.model
            self._before = [np.array(v) for _, v in self._kernels(model)]
            if self._gradient is None:
                self._gradient = _gradient_function(model, self.loss_fn)
            self._grads = self._gradient(self.probe_x, self.probe_y)

    def after_execution(self, run, steps, losses):
        if self._before is not None:
            run.engine.sync()
            self._record(run.engine.model, run.budget.steps - steps)
            self._before = None

    def _record(self, model, step):
        kernels = self._kernels(model)
        rows, total = [], np.zeros(3)
        for (index, variable), before in zip(kernels, self._before):
            after = np.asarray(variable, dtype=np.float64)
            before = before.astype(np.float64)
            weight, update = np.linalg.norm(before), np.linalg.norm(after - before)
            grad = np.linalg.norm(self._grads[index].astype(np.float64))
            total += (weight**2, update**2, grad**2)
            rows.append({"step": step, "variable": self._name(model, variable), "weight_norm": weight,
                         "update_norm": update, "update_ratio": update / weight if weight else np.nan,
                         "grad_norm": grad})
        all_grads = np.sqrt(sum(float(np.sum(np.square(g.astype(np.float64)))) for g in self._grads))
        weight, update, _ = np.sqrt(total)
        rows.append({"step": step, "variable": "(all)", "weight_norm": weight, "update_norm": update,
                     "update_ratio": update / weight if weight else np.nan, "grad_norm": all_grads})
        self.rows.extend(rows)
        ratios = [r["update_ratio"] for r in rows[:-1]]
        self._epoch_summary = {"health_update_ratio_median": float(np.nanmedian(ratios)),
                               "health_update_ratio_max": float(np.nanmax(ratios)),
                               "health_grad_norm": float(all_grads)}
        if self.summary_dir:
            self._write_summaries(step, rows)

    def _write_summaries(self, step, rows):
        import tensorflow as tf

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.summary_dir)
        with self._writer.as_default(step=step):
            for r in rows:
                name = r["variable"].replace("/", "_")
                tf.summary.scalar(f"update_ratio/{name}", r["update_ratio"])
                tf.summary.scalar(f"grad_norm/{name}", r["grad_norm"])
        self._writer.flush()

    def on_epoch_end(self, run, epoch, logs):
        if self._epoch_summary is not None:
            logs.update(self._epoch_summary)
            median = self._epoch_summary["health_update_ratio_median"]
            if not 1e-4 <= median <= 1e-2:
                logging.warning(
                    "epoch %d: median update/weight ratio %.2e is far from ~1e-3 (learning rate too %s?)",
                    epoch + 1, median, "high" if median > 1e-2 else "low")
