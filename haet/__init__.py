"""haet: train the strongest Keras image classifier that fits in N seconds.

`import haet` registers every custom layer, augmentation, learning-rate schedule and
optimizer with Keras (`keras.saving.register_keras_serializable(package="haet")`), so
that `keras.saving.load_model("model.keras")` loads a haet model after it, optimizer
state included. It also filters TensorFlow's native start-up logs by
`TF_CPP_MIN_LOG_LEVEL` (default 3 here; see `haet.console`).

`haet.fit(model, x, y, budget_seconds=...)` trains any compiled Keras model with
haet's training loop under a wall-clock budget (`haet.budgeted`).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from haet.console import native_logs_filtered  # noqa: E402

with native_logs_filtered():
    import keras  # noqa: F401  (loads the backend: TensorFlow logs its start-up here)

from haet import augment, layers, models, optimizers, schedules  # noqa: E402,F401  (registers the custom objects)
from haet.budgeted import FitResult, fit  # noqa: E402,F401  (haet.fit: any compiled Keras model under a budget)

__version__ = "0.1.0"
