"""Run by test_distribute.py in a fresh process: two SGD steps of haet's engine on a fixed
global batch, on 1 device or data-parallel on 2 logical CPU devices, with a moving
average of the weights (and batch-norm statistics); saves the weights, the averages and
the per-step losses.

    python tests/data_parallel_step.py REPLICAS OUT.npz [batchnorm | ensemble] [nospan]

With "batchnorm" the model has a batch-norm layer after its convolution; with
"ensemble" it is an ensemble of two such networks (each member's batch of 16 split
over the replicas). The epochs are one step each and run as one execution of two
steps across the epoch end (the second epoch's metrics start afresh inside it), or
with "nospan" one execution an epoch.
"""

import os
import sys

import numpy as np

replicas, out = int(sys.argv[1]), sys.argv[2]
batchnorm = "batchnorm" in sys.argv[3:]
ensemble = "ensemble" in sys.argv[3:]
span = "nospan" not in sys.argv[3:]
if os.environ.get("KERAS_BACKEND", "tensorflow") == "tensorflow":
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import contextlib  # noqa: E402

import keras  # noqa: E402

from haet import distribute, models  # noqa: E402
from haet.averaging import ExponentialMovingAverage  # noqa: E402
from haet.engine import make_engine  # noqa: E402

x = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 3)).astype("uint8")
y = np.arange(16) % 4
context = distribute.data_parallel(16) if replicas > 1 else contextlib.nullcontext({"replicas": 1, "xla": True})
with context as parallel:
    def network(seed, uint8=True):
        inputs = keras.Input((8, 8, 3), dtype="uint8" if uint8 else "float32")
        h = keras.layers.Rescaling(1 / 255)(inputs) if uint8 else inputs
        # An L2 penalty in the ensemble: Keras divides it by the replicas under MirroredStrategy.
        h = keras.layers.Conv2D(6, 3, activation="relu", kernel_initializer=keras.initializers.GlorotUniform(seed),
                                kernel_regularizer=keras.regularizers.L2(0.05) if ensemble else None)(h)
        if batchnorm:
            h = keras.layers.BatchNormalization()(h)
        h = keras.layers.GlobalAveragePooling2D()(h)
        logits = keras.layers.Dense(4, kernel_initializer=keras.initializers.GlorotUniform(seed + 1))(h)
        return keras.Model(inputs, logits, name=f"member{seed}")

    if ensemble:
        model = models.ensemble_with_input_pipeline([network(1, False), network(3, False)], mean=[0.0, 0.0, 0.0])
    else:
        model = network(1)
    model.compile(optimizer=keras.optimizers.SGD(0.5, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=parallel["xla"])
    average = ExponentialMovingAverage(0.5, warmup=False)
    engine = make_engine(model, x, y, 16, steps_per_execution=2, averages=[average], span_epochs=span)
    losses = []
    if span:
        engine.start_epoch(0)
        losses.extend(engine.run(2))
    else:
        for epoch in range(2):  # one step an epoch: the whole batch of 16
            engine.start_epoch(epoch)
            losses.extend(engine.run(1))
    ends = engine.take_ended_epochs()
    assert [e.epoch for e in ends] == [0, 1], ends
    # Each epoch's loss is its own step's (the metrics restart at each epoch).
    np.testing.assert_allclose([e.logs["loss"] for e in ends], losses, rtol=1e-6)
    engine.sync()
    assert parallel["replicas"] == replicas, parallel
np.savez(out, loss=np.array(losses), *[np.asarray(v) for v in [*model.trainable_variables, *average.averages]])
print("devices", len(distribute.local_devices()), "replicas", parallel["replicas"])
