#!/usr/bin/env bash
# The transfer-learning runs recorded under results/cpu (README, "Transfer learning"), on a
# 2-core CPU: MNIST digits 0-4 (5,000 images, 60 s) -> digits 5-9 with 500 images in 30 s,
# from scratch vs fine-tuned (all stages trained / first two stages frozen) at a 10x lower
# learning rate. Run from the repository root with the shared data at ../shared/data;
# nothing else should use the CPU meanwhile (budgets are wall-clock). Part 6 of
# toolkit_cpu_runs.sh; each run writes a new folder, nothing is overwritten.
source "$(dirname "$0")/cpu_runs_common.sh"
M9="--flagfile=flags/page_resnet9.flags --flagfile=flags/resnet9_mnist.flags --data_dir=$DATA/mnist
    --width_multiplier=0.25 --batch_size=128 --ghost_batch_splits=4 --ema_decay=0 --epochs=0
    --lr_schedule=cosine --lr_schedule_unit=steps --warmup=0.2 --results_dir=$OUT"
# shellcheck disable=SC2086
run mnist04_source python -m haet.train $M9 --classes=0,1,2,3,4 --train_size=5000 --budget=60 --learning_rate=0.4
SOURCE=$(ls -d $OUT/*_mnist5000_resnet9x0.25_60s_tensorflow_seed0 | tail -n 1)/model.keras
# shellcheck disable=SC2086
run mnist59_scratch python -m haet.train $M9 --classes=5,6,7,8,9 --train_size=500 --budget=30 --learning_rate=0.4
# shellcheck disable=SC2086
run mnist59_finetune python -m haet.train $M9 --classes=5,6,7,8,9 --train_size=500 --budget=30 --learning_rate=0.04 \
  --init_from="$SOURCE"
# shellcheck disable=SC2086
run mnist59_finetune_freeze2 python -m haet.train $M9 --classes=5,6,7,8,9 --train_size=500 --budget=30 \
  --learning_rate=0.04 --init_from="$SOURCE" --freeze_stages=2
