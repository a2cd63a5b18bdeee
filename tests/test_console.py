from haet import console

START = """WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
I0000 00:00:1795386286.025514   24754 port.cc:153] oneDNN custom operations are on.
I0000 00:00:1795384246.662025   18542 cpu_feature_guard.cc:227] This TensorFlow binary is optimized.
To enable the following instructions: AVX2 AVX512F, in other operations, rebuild TensorFlow.
E0000 00:00:1795386001.037686   23739 cuda_platform.cc:52] failed call to cuInit: UNKNOWN ERROR (303)
/site-packages/foo.py:3: DeprecationWarning: something of ours
  warnings.warn(...)
F0000 00:00:1.0 1 x.cc:1] fatal"""


def test_native_log_lines_are_filtered_by_level_and_the_rest_kept():
    assert console.kept_lines(START, 3) == [
        "/site-packages/foo.py:3: DeprecationWarning: something of ours", "  warnings.warn(...)",
        "F0000 00:00:1.0 1 x.cc:1] fatal"]
    at_error = console.kept_lines(START, 2)  # TensorFlow's 2: errors only
    assert any("cuInit" in line for line in at_error) and not any("cpu_feature_guard" in line for line in at_error)
    assert not any("To enable the following" in line for line in at_error) and "  warnings.warn(...)" in at_error
    at_warning = console.kept_lines(START, 1)
    assert any("cuInit" in line for line in at_warning) and not any("port.cc" in line for line in at_warning)
    assert console.kept_lines(START, 0) == START.splitlines()


def test_the_user_setting_wins(monkeypatch):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "1")
    assert console.min_log_level() == 1
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL")
    assert console.min_log_level() == 3


def test_progress_lines_and_a_compilation_warning_on_the_budget_clock(caplog):
    import logging

    from conftest import FakeClock, FakeEngine
    from haet.budget import WallClockBudget
    from haet.loop import Training

    clock = FakeClock()
    engine = FakeEngine(clock, size=40, batch_size=4, step_seconds=1.0, steps_per_execution=5, compile_seconds=30.0)
    budget = WallClockBudget(100.0, clock=clock)
    with caplog.at_level(logging.INFO):
        Training(engine, budget, [budget]).fit()
    messages = [r.getMessage() for r in caplog.records]
    warnings = [m for m in messages if "more than a quarter of the 100 s budget" in m]
    assert len(warnings) == 1 and "took 31.0 s" in warnings[0]
    progress = [m for m in messages if "% of the 100 s budget" in m]
    # One line every 10 s of training (a twentieth of the budget, at least 10 s), with its numbers.
    assert 6 <= len(progress) <= 11 and "s left | epoch" in progress[0] and "lr " in progress[0]
