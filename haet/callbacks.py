"""Callbacks of the training toolkit: snapshot ensembles and the training-health monitor."""


import keras
import numpy as np
from absl import logging


class SnapshotKeeper(keras.callbacks.Callback):
    """Keeps copies of the model's weights at the ends of learning-rate cycles, for a
    snapshot ensemble (Huang et al. 2017, "Snapshot ensembles: train 1, get M for
    free": cosine cycles with restarts, one model kept at the end of each cycle).

    After each step `progress()` (the fraction of the run done, 0 to 1: elapsed
    budget or steps / planned steps) is compared with the next of `fractions`; on
    reaching it, the weights (`model.get_weights()`, batch-norm statistics
    included) are copied to the host. The last fraction is the run's end: its
    snapshot is taken when training ends, whatever stopped it.

    Attributes:
        snapshots: list of `(fraction, weights)`; `weights` a list of numpy arrays.

    Args:
        fractions: increasing fractions of the run in (0, 1], the last one 1.
        progress: callable returning the fraction of the run done.

    Raises:
        ValueError: fractions not increasing in (0, 1] or not ending at 1.
    """

    def __init__(self, fractions, progress):
        super().__init__()
        fractions = [float(f) for f in fractions]
        if (not fractions or fractions[-1] != 1.0 or any(not 0.0 < f <= 1.0 for f in fractions)
                or any(a >= b for a, b in zip(fractions, fractions[1:]))):
            raise ValueError(
                f"snapshot fractions must increase within (0, 1] and end at 1. Received: {fractions}")
        self.fractions = fractions
        self.progress = progress
        self.snapshots = []

    def _take(self, fraction):
        # Reading `self.model` syncs the JAX state: a handful of times a run.
        self.snapshots.append((fraction, [np.array(w) for w in self.model.get_weights()]))
        logging.info("snapshot %d kept at %.3f of the run", len(self.snapshots), fraction)

    def on_train_batch_end(self, batch, logs=None):
        while len(self.snapshots) < len(self.fractions) - 1:
            done = self.progress()
            if done < self.fractions[len(self.snapshots)]:
                break
            self._take(done)

    def on_train_end(self, logs=None):
        self._take(min(1.0, self.progress()))
