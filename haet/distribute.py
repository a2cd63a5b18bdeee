"""Data-parallel training on every local accelerator (or logical CPU device).

The backend's own engine does the work; haet only opens it around model building:
- TensorFlow: `tf.distribute.MirroredStrategy` (one model copy per device, gradients
  all-reduced). Batch norm keeps per-replica statistics. The whole-step XLA
  compilation is turned off under it: TF's XLA cannot compile a step whose
  mirrored variables live on several devices ("tf.Variable on a different device",
  tensorflow.org/xla/known_issues); the per-op kernels run instead.
- JAX: `keras.distribution.DataParallel` (the batch sharded across devices, the
  weights replicated, one XLA program). Batch norm here sees the *global* batch
  (XLA computes the statistics across shards); for per-device statistics use ghost
  batch norm with `ghost_batch_splits` a multiple of the device count (resnet9).
With N devices, each step still takes `batch_size` examples in all (`batch_size / N`
per device). For a larger global batch, scale the learning rate with
`--lr_scaling_reference_batch` (linear scaling rule) and add `--warmup` (Goyal et
al. 2017, "Accurate, large minibatch SGD: training ImageNet in 1 hour").

The CPU tests run this on 2 logical devices: TensorFlow's
`tf.config.set_logical_device_configuration`, JAX's
`XLA_FLAGS=--xla_force_host_platform_device_count=2`; both must be set before the
backend starts.
"""

import contextlib

import keras


def local_devices():
    """Names of the devices data-parallel training would use: the accelerators, else the CPUs."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_logical_devices("GPU")
        return [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
    if backend == "jax":
        import jax

        return [str(d) for d in jax.devices()]
    raise NotImplementedError(f"Data-parallel training supports tensorflow and jax, not {backend!r}.")


@contextlib.contextmanager
def data_parallel(batch_size):
    """Context in which models built and compiled train data-parallel on all local devices.

    Yields:
        dict with `replicas` (int), `engine` (str) and `xla` (bool: whether the training
        step may be XLA-compiled as a whole under this engine).

    Raises:
        ValueError: fewer than 2 devices, or `batch_size` not divisible by their count.
    """
    devices = local_devices()
    if len(devices) < 2:
        raise ValueError(
            f"--data_parallel needs at least 2 devices; this machine has {devices}. On a CPU, "
            "test with 2 logical devices (see haet.distribute).")
    if batch_size % len(devices):
        raise ValueError(f"batch_size={batch_size} must be divisible by the {len(devices)} devices "
                         f"({devices}) so that each gets the same share.")
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        strategy = tf.distribute.MirroredStrategy(devices)
        with strategy.scope():
            yield {"replicas": strategy.num_replicas_in_sync, "engine": "tf.distribute.MirroredStrategy",
                   "xla": False}
        return
    previous = keras.distribution.distribution()
    keras.distribution.set_distribution(keras.distribution.DataParallel())
    try:
        yield {"replicas": len(devices), "engine": "keras.distribution.DataParallel", "xla": True}
    finally:
        keras.distribution.set_distribution(previous)
