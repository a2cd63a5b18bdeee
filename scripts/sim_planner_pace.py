"""Simulates the step planner on a fake clock with noisy step times: how often following
the pace (`--planner_pace_window`) shrinks a plan that would have fitted, and how often
the budget cuts a plan short without it.

Each execution's steps take a base time times a factor drawn uniformly in
[1 - jitter, 1 + jitter] (seeded); the settings are a few epoch and execution shapes
(see SETTINGS). No model runs: `tests/conftest.py`'s FakeEngine advances the clock.

    python scripts/sim_planner_pace.py [--jitter=0.1] [--seeds=40]
"""

import argparse
import collections
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from conftest import FakeClock, FakeEngine  # noqa: E402
from haet.budget import StepPlanner, WallClockBudget  # noqa: E402
from haet.loop import Hook, Training  # noqa: E402

# name: (seconds a step, images, batch, steps per execution, executions across epochs,
#        budget seconds, probe steps, seconds between epochs)
SETTINGS = {
    "10 steps an epoch, an execution an epoch, 30 s": (0.04, 40, 4, 10, False, 30.0, 20, 0.0),
    "98 steps an epoch, executions of 16, 100 s": (0.05, 392, 4, 16, False, 100.0, 20, 0.0),
    "9 steps an epoch, executions of 64 across epochs, 10 s": (0.01, 36, 4, 64, True, 10.0, 20, 0.0),
    "4 steps an epoch, an execution an epoch, 100.5 s": (1.0, 16, 4, 4, False, 100.5, 3, 0.0),
    "10 steps an epoch + 0.02 s between epochs, 30 s": (0.04, 40, 4, 10, False, 30.0, 20, 0.02),
}


class _PlannedSteps:
    name = "planned_steps"


def simulate(setting, seed, jitter, window):
    """One run; returns (planned epochs at the end, stopped_by, train seconds)."""
    base, size, batch, per_execution, spans, budget_seconds, probe, between = setting
    factors = np.random.default_rng(seed).uniform(1 - jitter, 1 + jitter, 1_000_000)
    clock = FakeClock()
    engine = FakeEngine(clock, size=size, batch_size=batch, steps_per_execution=per_execution, spans_epochs=spans,
                        step_seconds=lambda step: base * factors[len(engine.executions)])

    class Between(Hook):
        crosses_epochs = True

        def on_epoch_end(self, run, epoch, logs):
            clock.t += between

    budget = WallClockBudget(budget_seconds, clock=clock)
    planner = StepPlanner(budget, _PlannedSteps(), engine.steps_per_epoch, probe, pace_window=window)
    run = Training(engine, budget, [Between(), budget, planner]).fit()
    return planner.planned_epochs, run.stopped_by, budget.train_seconds()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jitter", type=float, default=0.1, help="step-time noise, a fraction (0.1: +-10%%)")
    parser.add_argument("--seeds", type=int, default=40)
    parser.add_argument("--window", type=float, default=0.25, help="--planner_pace_window to compare with 0")
    args = parser.parse_args()
    for name, setting in SETTINGS.items():
        shrunk, lost, cut_with, cut_without = 0, collections.Counter(), 0, 0
        for seed in range(args.seeds):
            epochs, stopped, _ = simulate(setting, seed, args.jitter, args.window)
            kept_epochs, kept_stopped, _ = simulate(setting, seed, args.jitter, 0.0)
            cut_with += stopped == "budget"
            cut_without += kept_stopped == "budget"
            if kept_stopped == "planned" and epochs < kept_epochs:
                shrunk += 1
                lost[kept_epochs - epochs] += 1
        print(f"{name} (~{kept_epochs} epochs planned): cut by the budget {cut_with}/{args.seeds} following the "
              f"pace, {cut_without}/{args.seeds} without; plans that fitted but were shrunk: {shrunk}/{args.seeds}"
              f" (epochs lost: {dict(sorted(lost.items()))})")


if __name__ == "__main__":
    main()
