from types import SimpleNamespace

import pytest

from haet.device import HostCpu, describe_device, resolve_precision

H100 = {"platform": "gpu", "name": "NVIDIA H100", "count": 1, "compute_capability": "9.0"}
V100 = {"platform": "gpu", "name": "Tesla V100", "count": 1, "compute_capability": "7.0"}
CPU = {"platform": "cpu", "name": "x86", "count": 1, "compute_capability": None}


@pytest.mark.parametrize("device, policy", [(H100, "mixed_bfloat16"), (V100, "mixed_float16"), (CPU, "float32")])
def test_auto_precision_fits_the_hardware(device, policy):
    assert resolve_precision("auto", device) == policy


def test_explicit_precision_wins_and_bad_names_are_rejected():
    assert resolve_precision("mixed_float16", CPU) == "mixed_float16"
    with pytest.raises(ValueError, match="Unknown precision 'fp8'. Allowed: auto, float32, mixed_float16, mixed_bfloat16"):
        resolve_precision("fp8", CPU)


def test_this_machine_is_described():
    device = describe_device()
    assert set(device) == {"platform", "name", "count", "compute_capability"}
    assert device["platform"] in ("cpu", "gpu", "tpu") and device["name"]


class _Host:
    """Fake per-CPU times (seconds), this process's CPU time and a wall clock."""

    def __init__(self, cpus=3):
        self.per_cpu = [dict(user=0.0, nice=0.0, system=0.0, irq=0.0, softirq=0.0, steal=0.0) for _ in range(cpus)]
        self.own = self.now = 0.0

    def cpu_times(self):
        return [SimpleNamespace(**times) for times in self.per_cpu]

    def meter(self, cpus, cpu_count=None):
        return HostCpu(clock=lambda: self.now, cpu_times=self.cpu_times, process_time=lambda: self.own, cpus=cpus,
                       cpu_count=lambda: cpu_count or len(self.per_cpu))


def test_host_cpu_counts_others_and_steal_on_the_cpus_the_run_may_use():
    host = _Host()
    meter = host.meter(cpus=[0, 1])
    assert meter.fields() is None  # not started
    meter.start()
    host.now, host.own = 10.0, 12.0  # this process: 1.2 CPUs for 10 s
    host.per_cpu[0].update(user=9.0, system=1.0, steal=0.5)
    host.per_cpu[1].update(user=6.0, nice=1.0, irq=0.5, softirq=0.5)
    host.per_cpu[2].update(user=10.0)  # outside the affinity mask: not counted
    fields = meter.fields()
    assert fields == {"cpus": 2, "seconds": 10.0, "own_cpu_seconds": 12.0, "other_cpu_seconds": 6.0,
                      "steal_seconds": 0.5, "other_load": 0.6, "steal_load": 0.05, "loaded": True, "processes": 1}
    meter.stop()
    host.now, host.per_cpu[1]["user"] = 20.0, 100.0  # after training: not counted
    assert meter.fields() == fields
    # A quarter of the CPUs (0.5 of 2) is still an idle enough host; more is not.
    quiet = host.meter(cpus=[2])
    quiet.start()
    host.now, host.own, host.per_cpu[2]["user"] = 30.0, 12.0, 12.5  # 2.5 s of others in 10 s: 0.25 of 1 CPU
    assert quiet.fields()["other_load"] == 0.25 and quiet.fields()["loaded"] is False
    host.per_cpu[2]["steal"] = 0.1
    assert quiet.fields()["loaded"] is True


def test_host_cpu_of_a_resumed_run_adds_the_earlier_processes():
    host = _Host()
    meter = host.meter(cpus=[0, 1])
    meter.start()
    host.now, host.own = 10.0, 10.0
    host.per_cpu[0]["user"] = 10.0
    earlier = {"cpus": 2, "seconds": 30.0, "own_cpu_seconds": 30.0, "other_cpu_seconds": 20.0, "steal_seconds": 0.0,
               "other_load": 0.667, "steal_load": 0.0, "loaded": True, "processes": 1}
    fields = meter.fields(earlier)
    assert (fields["seconds"], fields["other_cpu_seconds"], fields["processes"]) == (40.0, 20.0, 2)
    assert fields["other_load"] == 0.5 and fields["loaded"] is False
    # The whole run's load is not known when a process counted other CPUs (another
    # machine), measured nothing here (a CPU the times lack) or before (no figures).
    assert meter.fields({**earlier, "cpus": 16}, resumed=True) is None
    unread = host.meter(cpus=[5])
    unread.start()
    assert unread.fields(earlier, resumed=True) is None and unread.fields() is None
    assert meter.fields(None, resumed=True) is None and meter.fields(None)["processes"] == 1


def test_host_cpu_is_not_known_from_counters_that_go_backwards_or_an_empty_mask():
    host = _Host()
    meter = host.meter(cpus=[0])
    host.now, host.own, host.per_cpu[0]["user"] = 10.0, 5.0, 8.0
    meter.start()
    host.now, host.own, host.per_cpu[0]["user"] = 20.0, 6.0, 2.0  # busy time went down: not "quiet"
    assert meter.fields() is None
    host.per_cpu[0]["user"] = 18.0
    assert meter.fields()["other_cpu_seconds"] == 9.0
    empty = host.meter(cpus=[])
    empty.start()
    assert empty.fields() is None


def test_host_cpu_measures_nothing_it_cannot_match_or_read_and_never_fails():
    host = _Host(cpus=3)
    # 4 CPUs, one offline (psutil lists 3): CPUs 0 and 2 cannot be found among the listed.
    offline = host.meter(cpus=[0, 2], cpu_count=4)
    offline.start()
    assert offline.fields() is None
    # The mask holds every listed CPU (numbers 0, 2, 3 with 1 offline): all of them are counted.
    every = host.meter(cpus=[0, 2, 3], cpu_count=4)
    every.start()
    host.now, host.per_cpu[2]["user"] = 1.0, 0.5
    assert every.fields()["other_cpu_seconds"] == 0.5

    class AccessDenied(Exception):  # as psutil's: not an OSError
        pass

    def refused():
        raise AccessDenied("pid 1")

    sandboxed = HostCpu(cpu_times=refused, process_time=lambda: 0.0, cpus=[0])
    sandboxed.start()
    assert sandboxed.fields() is None
