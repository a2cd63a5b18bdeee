"""Which accelerator this process trains on, and the precision policy that fits it."""

import contextlib
import dataclasses
import platform

import keras

PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_device():
    """The device training runs on, as a dict.

    Keys: `platform` ("gpu", "tpu" or "cpu"), `name` (e.g. "NVIDIA H100 80GB HBM3" or
    the CPU model), `count` (devices of that platform visible to the backend),
    `compute_capability` (e.g. "9.0" for GPUs, else None).
    """
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        devices = jax.devices()
        d = devices[0]
        capability = getattr(d, "compute_capability", None)
        if d.platform == "cpu":
            return {"platform": "cpu", "name": _cpu_name(), "count": 1, "compute_capability": None}
        return {
            "platform": d.platform,
            "name": d.device_kind,
            "count": len(devices),
            "compute_capability": str(capability) if capability else None,
        }
    if backend == "tensorflow":
        import tensorflow as tf

        from haet.console import native_logs_filtered

        with native_logs_filtered():  # TensorFlow starts its devices here (cuInit)
            gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            details = tf.config.experimental.get_device_details(gpus[0])
            capability = details.get("compute_capability")
            return {
                "platform": "gpu",
                "name": details.get("device_name", gpus[0].name),
                "count": len(gpus),
                "compute_capability": ".".join(map(str, capability)) if capability else None,
            }
    return {"platform": "cpu", "name": _cpu_name(), "count": 1, "compute_capability": None}


def resolve_precision(precision, device):
    """The Keras dtype policy name for `precision` on `device` (from `describe_device`).

    "auto": mixed_bfloat16 on GPUs of compute capability >= 8.0 (Ampere and newer)
    and on TPUs, mixed_float16 on older GPUs (e.g. V100, 7.0), float32 on CPUs,
    where 16-bit math is emulated and slower.

    Raises:
        ValueError: if `precision` is not one of `PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ValueError(
            f"Unknown precision {precision!r}. Allowed: {', '.join(PRECISIONS)}."
        )
    if precision != "auto":
        return precision
    if device["platform"] == "tpu":
        return "mixed_bfloat16"
    if device["platform"] == "gpu":
        major = int(str(device.get("compute_capability") or "0").split(".")[0])
        return "mixed_bfloat16" if major >= 8 else "mixed_float16"
    return "float32"


XLA_DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"


def enable_determinism():
    """Deterministic ops for the current backend, on top of the seeds; a dict of what
    was set, for the record.

    TensorFlow: `tf.config.experimental.enable_op_determinism()` (for the rest of the
    process: TensorFlow has no public way back). JAX: `XLA_FLAGS` gets
    `--xla_gpu_deterministic_ops=true`, which XLA reads when JAX starts its
    backends; the CPU backend is deterministic without it.

    Raises:
        ValueError: JAX already started a GPU backend without the flag (set
            `XLA_FLAGS` before the process starts, or pass --deterministic on the
            command line, which sets it before JAX starts).
    """
    import os

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
        return {"tensorflow": "enable_op_determinism"}
    if backend == "jax":
        xla_flags = os.environ.get("XLA_FLAGS", "")
        if XLA_DETERMINISTIC_FLAG not in xla_flags:
            import jax
            from jax._src import xla_bridge

            if xla_bridge.backends_are_initialized() and any(d.platform == "gpu" for d in jax.devices()):
                raise ValueError(
                    "deterministic=True needs XLA_FLAGS to contain "
                    f"{XLA_DETERMINISTIC_FLAG} before JAX starts its GPU backend; it has started. Set "
                    f"XLA_FLAGS='{XLA_DETERMINISTIC_FLAG}' in the environment of the process.")
            os.environ["XLA_FLAGS"] = f"{xla_flags} {XLA_DETERMINISTIC_FLAG}".strip()
        return {"xla_flags": XLA_DETERMINISTIC_FLAG}
    raise ValueError(f"deterministic=True is supported under the jax and tensorflow backends, not {backend!r}.")


@contextlib.contextmanager
def run_settings(precision="auto", seed=0, data_parallel_batch=None, deterministic=False):
    """The process-global settings of a run, restored when the block ends.

    Inside the block: the Keras dtype policy `resolve_precision(precision, device)`;
    every random seed (`keras.utils.set_random_seed(seed)`: Python, NumPy, the
    backend, Keras' global generator); and, with `data_parallel_batch` set, data-parallel
    training on all local devices (`haet.distribute.data_parallel`, whose checks need
    the global batch size). On exit the previous policy and distribution are set
    again, and Python's and NumPy's global random states are put back (the
    backend's global seed cannot be read back). With `deterministic`,
    `enable_determinism()` first (it stays in force).

    Yields:
        `RunSettings`: `device` (`describe_device()`), `precision` (the policy name),
        `parallel` (None, or the dict of `haet.distribute.data_parallel`),
        `deterministic` (None, or what `enable_determinism` set).

    Raises:
        ValueError: an unknown precision, or a data-parallel setting the devices
            cannot take (before anything is changed).
    """
    import random

    import numpy as np

    from haet import distribute

    determinism = enable_determinism() if deterministic else None
    device = describe_device()
    policy = resolve_precision(precision, device)
    previous_policy = keras.mixed_precision.global_policy()
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with contextlib.ExitStack() as stack:
        parallel = None
        if data_parallel_batch is not None:
            parallel = stack.enter_context(distribute.data_parallel(data_parallel_batch))
        keras.mixed_precision.set_global_policy(policy)
        try:
            from haet.console import native_logs_filtered

            with native_logs_filtered():  # it imports TensorFlow when installed, under any backend
                keras.utils.set_random_seed(seed)
            yield RunSettings(device, policy, parallel, determinism)
        finally:
            keras.mixed_precision.set_global_policy(previous_policy)
            random.setstate(python_state)
            np.random.set_state(numpy_state)


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What `run_settings` set: the device description, the dtype policy name and the
    data-parallel engine (or None)."""

    device: dict
    precision: str
    parallel: dict | None
    deterministic: dict | None = None
