#!/usr/bin/env bash
# Short recorded CPU runs of Page's bag of tricks and each of its options, and of airbench
# (README, "Faster recipes"), on a 2-core CPU: ResNet-9 at a quarter width, batch 128 in 4 ghost batches
# of 32, 60 s, the HAET setting otherwise. They show that every option trains, evaluates
# and saves; CPU accuracies at 60 s are no ablation of the recipe (the GPU runs will be).
# Run from the repository root with the shared data at ../shared/data; nothing else
# should use the CPU meanwhile (budgets are wall-clock). Nothing is overwritten.
set -euo pipefail
export TF_CPP_MIN_LOG_LEVEL=3 PYTHONPATH=${PYTHONPATH:-$PWD}
DATA=../shared/data
LOGS=results/logs
OUT=results/cpu
mkdir -p "$LOGS"
BOT="--flagfile=flags/page_bag_of_tricks.flags --flagfile=flags/page_bag_of_tricks_haet.flags
     --data_dir=$DATA/cifar10 --width_multiplier=0.25 --batch_size=128 --ghost_batch_splits=4 --budget=60
     --results_dir=$OUT"
# airbench94 in the HAET setting at a quarter width, batch 128 (its learning rate x 128 / 1024).
AIR="--flagfile=flags/airbench94.flags --flagfile=flags/airbench94_haet.flags
     --data_dir=$DATA/cifar10 --width_multiplier=0.25 --batch_size=128 --budget=60
     --one_cycle_learning_rates=0.0375,0.1875,0.013125 --results_dir=$OUT"
run() {
  local name=$1 log k=1; shift
  log="$LOGS/$name.log"
  while [ -e "$log" ]; do log="$LOGS/$name.$k.log"; k=$((k + 1)); done
  echo "== $name -> $log"; "$@" > "$log" 2>&1; tail -n 1 "$log"
}
# shellcheck disable=SC2086
{
run bag_of_tricks python -m haet.train $BOT
run bag_of_tricks_conv_prep python -m haet.train $BOT --prep=conv
run bag_of_tricks_pool_after_bn python -m haet.train $BOT --nopool_before_bn
run bag_of_tricks_no_shift_multiplier python -m haet.train $BOT --bn_shift_lr_multiplier=1 --nobn_shift_weight_decay
run bag_of_tricks_no_ema python -m haet.train $BOT --ema_decay=0
run bag_of_tricks_ema_raw_statistics python -m haet.train $BOT --ema_statistics=raw
run bag_of_tricks_ema_recomputed_statistics python -m haet.train $BOT --ema_statistics=recompute
run bag_of_tricks_airbench_tta python -m haet.train $BOT --tta=airbench
run bag_of_tricks_validation_headline python -m haet.train $BOT --validation_size=500
run airbench94_haet python -m haet.train $AIR
}
