import pytest

from haet.device import describe_device, resolve_precision

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
