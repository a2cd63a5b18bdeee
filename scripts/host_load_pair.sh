#!/bin/bash
# A quiet and a loaded CPU run of the same flags (airbench94's HAET flagfiles at width 0.125,
# batch 32, 500 images, 30 s, TensorFlow): the loaded one has two busy-loop processes, one per
# core of a 2-core machine, from 5 s after the planner's "planned" line until the run exits.
# Each run folder gets its log (train.log), the loaded one the load's start and stop times
# (load.txt). Its record's host_cpu says how busy the others kept the CPUs; the report keeps
# it apart as LOADED HOST.
#
#   bash scripts/host_load_pair.sh        # from the repository root; about 3 minutes
set -euo pipefail
export TF_CPP_MIN_LOG_LEVEL=3 PYTHONPATH=${PYTHONPATH:-$PWD}
OUT=results/cpu
args=(--flagfile=flags/airbench94.flags --flagfile=flags/airbench94_haet.flags --width_multiplier=0.125
      --batch_size=32 --train_size=500 --budget=30 --data_dir=../shared/data/cifar10 "--results_dir=$OUT")
tmp=$(mktemp -d)
l1="" l2=""
# The busy loops never outlive the script (an interrupt, an error).
trap 'kill $l1 $l2 2> /dev/null || true' EXIT INT TERM
for mode in quiet loaded; do
  log="$tmp/$mode.log"
  python -m haet.train "${args[@]}" > "$log" 2>&1 &
  pid=$!
  if [ "$mode" = loaded ]; then
    until grep -q "planned" "$log" || ! kill -0 "$pid" 2> /dev/null; do sleep 0.2; done
    sleep 5
    python3 -c 'while True: pass' & l1=$!
    python3 -c 'while True: pass' & l2=$!
    echo "load started $(date +%s.%N)" > "$tmp/load.txt"
  fi
  rc=0; wait "$pid" || rc=$?
  echo "rc=$rc" >> "$log"
  if [ "$mode" = loaded ]; then
    kill "$l1" "$l2" 2> /dev/null || true; l1="" l2=""
    echo "load stopped $(date +%s.%N)" >> "$tmp/load.txt"
  fi
  folder=$(sed -n 's/.*-> \(results\/cpu\/[^ ]*\)$/\1/p' "$log" | tail -n 1)
  if [ -n "$folder" ]; then
    cp "$log" "$folder/train.log"
    if [ "$mode" = loaded ]; then
      { echo "# two busy-loop processes (python3 -c 'while True: pass', one per core) started 5 s after the" \
             "planner's 'planned' line and stopped after the run exited (scripts/host_load_pair.sh; unix times)"
        cat "$tmp/load.txt"; } > "$folder/load.txt"
    fi
  fi
  echo "$mode: ${folder:-no run folder (see $log)}, rc=$rc"
done
