"""Which accelerator this process trains on, and the precision policy that fits it."""

import contextlib
import dataclasses
import platform
import time

import keras
from absl import logging

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



# Others' CPU use, as a share of the CPUs a run may use, from which the report keeps its
# runs apart: a quarter of them (half a core of a 2-core machine, 4 cores of a 16-core one).
LOADED_SHARE = 0.25


def _psutil_cpu_times():
    import psutil

    return psutil.cpu_times(percpu=True)


def _psutil_process_time():
    import psutil

    times = psutil.Process().cpu_times()
    return times.user + times.system


def _psutil_affinity():
    import psutil

    process = psutil.Process()
    return process.cpu_affinity() if hasattr(process, "cpu_affinity") else range(psutil.cpu_count() or 1)


def _psutil_cpu_count():
    import psutil

    return psutil.cpu_count()


class HostCpu:
    """What the host's CPUs did while a run trained: this process's CPU time, the CPU
    time of everything else on the CPUs it may run on, and the time a hypervisor gave
    other machines (steal). Timings taken on a loaded host are not those of the
    device alone: two busy loops beside a run on a 2-core machine halve its pace.

    Read with psutil: per-CPU times (busy: user, nice, system, irq, softirq; steal)
    summed over the CPUs of the process's affinity mask, and the process's own CPU
    time (all its threads). Other processes' time is the busy time less this
    process's, so in a container limited by a CPU quota rather than an affinity mask
    it also counts work on CPUs the container may not get. psutil lists the online
    CPUs in order, not by number: with some CPUs offline the mask can be read only
    when it holds every listed CPU. Nothing is measured, and `fields()` returns None
    (the run goes on), without psutil (the GPU machine unless its wheel is carried:
    `scripts/gpu_campaign.py prepare`), when psutil refuses (a sandbox), or when the
    mask cannot be matched to the listed CPUs.

    Usage: `start()` where training starts, `stop()` where it ends, `fields()` for
    the record (between `start` and `stop`, or up to now before `stop`).

    Args:
        clock: wall clock (seconds; tests pass a fake).
        cpu_times: per-CPU times, a list of objects with `user`, `nice`, `system`,
            `irq`, `softirq` and `steal` attributes in seconds (missing ones count 0);
            default `psutil.cpu_times(percpu=True)`.
        process_time: this process's CPU seconds (user + system, all threads).
        cpus: CPU numbers to count (default: the process's affinity mask).
    """

    def __init__(self, clock=time.perf_counter, cpu_times=_psutil_cpu_times, process_time=_psutil_process_time,
                 cpus=None, cpu_count=_psutil_cpu_count):
        self.clock, self.cpu_times, self.process_time, self.cpu_count = clock, cpu_times, process_time, cpu_count
        self.cpus = None
        try:
            self.cpus = sorted(_psutil_affinity() if cpus is None else cpus) or None  # an empty mask: unknown
        except Exception as e:  # noqa: BLE001 (no psutil, or psutil refused: measure nothing, never fail the run)
            logging.info("the host's CPU load is not measured (%s: %s)", type(e).__name__, e)
        self._start = self._stop = None

    def _rows(self, per_cpu):
        """The entries of `per_cpu` (psutil's list of the online CPUs, in order) for the
        CPUs counted, or None when they cannot be told apart."""
        if len(self.cpus) == len(per_cpu):
            return per_cpu  # the mask holds every listed CPU, whatever their numbers
        if len(per_cpu) == self.cpu_count() and all(n < len(per_cpu) for n in self.cpus):
            return [per_cpu[n] for n in self.cpus]  # every CPU online: position is number
        return None

    def _read(self):
        """(wall seconds, own CPU seconds, busy CPU seconds, steal seconds) now, or None
        when they cannot be read (no psutil, psutil refused, an unmatched mask)."""
        if self.cpus is None:
            return None
        try:
            rows = self._rows(self.cpu_times())
            if rows is None:
                return None
            busy = sum(getattr(t, name, 0.0) for t in rows for name in ("user", "nice", "system", "irq", "softirq"))
            steal = sum(getattr(t, "steal", 0.0) for t in rows)
            return self.clock(), self.process_time(), busy, steal
        except Exception:  # noqa: BLE001 (psutil.Error, NotImplementedError...: measure nothing, never fail the run)
            return None

    def start(self):
        self._start, self._stop = self._read(), None

    def stop(self):
        if self._start is not None and self._stop is None:
            self._stop = self._read()

    def fields(self, previous=None, resumed=False):
        """The record's `host_cpu`: `cpus` (CPUs counted), `seconds` (wall seconds
        measured), `own_cpu_seconds`, `other_cpu_seconds` (other processes, on those
        CPUs), `steal_seconds`, `other_load` and `steal_load` (those per wall second,
        in CPUs, like a load average), `loaded` (others and steal together took more
        than `LOADED_SHARE` of the CPUs), `processes` (processes measured). None when
        nothing was measured.

        `previous`: the `host_cpu` of a resumed run's earlier processes, summed with
        this one's; `resumed`: whether there were earlier processes. The whole run's
        load is not known (None) when any process measured nothing (`previous` None
        with `resumed`), when counters went backwards, or when the processes counted
        a different number of CPUs.
        """
        if resumed and not previous:
            return None
        end = self._stop or (self._read() if self._start is not None else None)
        if self._start is None or end is None:
            return None
        wall, own, busy, steal = (b - a for a, b in zip(self._start, end))
        if wall <= 0 or own < 0 or busy < 0 or steal < 0:
            return None  # counters that went backwards (a reset, a migrated VM): nothing can be told
        totals = {"seconds": wall, "own_cpu_seconds": own, "other_cpu_seconds": max(0.0, busy - own),
                  "steal_seconds": steal}
        processes = 1
        if previous:
            if previous.get("cpus") != len(self.cpus):
                return None
            totals = {k: v + (previous.get(k) or 0.0) for k, v in totals.items()}
            processes += previous.get("processes") or 1
        seconds = totals["seconds"]
        other_load = totals["other_cpu_seconds"] / seconds if seconds > 0 else 0.0
        steal_load = totals["steal_seconds"] / seconds if seconds > 0 else 0.0
        return {"cpus": len(self.cpus), **{k: round(v, 3) for k, v in totals.items()},
                "other_load": round(other_load, 3), "steal_load": round(steal_load, 3),
                "loaded": bool(other_load + steal_load > LOADED_SHARE * len(self.cpus)), "processes": processes}
