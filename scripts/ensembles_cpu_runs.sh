#!/usr/bin/env bash
# Recorded CPU measurements of --ensemble_members (README, "Ensembles in one budget") on a
# 2-core CPU: the step of N members as N branches against N separate steps (and, under JAX,
# a vmapped member), then airbench94 in the HAET setting at a quarter width and 60 s with
# 1, 2 and 4 members. They show that ensembles train, evaluate and save under both backends
# and what a CPU makes of them; the GPU decides the mechanism and the recipe (the campaign's
# "ensembles" stage). Run from the repository root with the shared data at ../shared/data;
# nothing else should use the CPU meanwhile (budgets are wall-clock). Nothing is overwritten.
# shellcheck source=scripts/cpu_runs_common.sh
source "$(dirname "$0")/cpu_runs_common.sh"
mkdir -p results/bench
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
BENCH="--flagfile=flags/page_bag_of_tricks.flags --flagfile=flags/page_bag_of_tricks_haet.flags
       --width_multiplier=0.25 --batch_size=128 --ghost_batch_splits=4 --members=1,2,4 --bench_steps=5"
# shellcheck disable=SC2086
{
run ensembles_bench_tensorflow python scripts/bench_ensembles.py $BENCH --json=results/bench/ensembles_cpu_tensorflow_$STAMP.json
run ensembles_bench_jax env KERAS_BACKEND=jax python scripts/bench_ensembles.py $BENCH --json=results/bench/ensembles_cpu_jax_$STAMP.json
run airbench94_haet_members1 python -m haet.train $AIR
run airbench94_haet_members2 python -m haet.train $AIR --ensemble_members=2
run airbench94_haet_members4 python -m haet.train $AIR --ensemble_members=4
}
