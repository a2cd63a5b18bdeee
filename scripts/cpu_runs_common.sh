# Sourced by the recorded CPU-run scripts (recipes_cpu_runs.sh, ensembles_cpu_runs.sh): the
# environment, the folders, airbench94's HAET flags at a quarter width, and `run NAME COMMAND...`,
# which logs the command's output to a new results/logs/NAME[.k].log and prints its last line.
set -euo pipefail
export TF_CPP_MIN_LOG_LEVEL=3 PYTHONPATH=${PYTHONPATH:-$PWD}
DATA=../shared/data
LOGS=results/logs
OUT=results/cpu
mkdir -p "$LOGS"
# airbench94 in the HAET setting at a quarter width, batch 128 (its learning rate x 128 / 1024).
# shellcheck disable=SC2034
AIR="--flagfile=flags/airbench94.flags --flagfile=flags/airbench94_haet.flags
     --data_dir=$DATA/cifar10 --width_multiplier=0.25 --batch_size=128 --budget=60
     --one_cycle_learning_rates=0.0375,0.1875,0.013125 --results_dir=$OUT"
run() {
  local name=$1 log k=1; shift
  log="$LOGS/$name.log"
  while [ -e "$log" ]; do log="$LOGS/$name.$k.log"; k=$((k + 1)); done
  echo "== $name -> $log"; "$@" > "$log" 2>&1; tail -n 1 "$log"
}
