#!/usr/bin/env bash
# Short recorded CPU runs of Page's bag of tricks and each of its options, and of airbench
# (README, "Faster recipes"), on a 2-core CPU: ResNet-9 at a quarter width, batch 128 in 4 ghost batches
# of 32, 60 s, the HAET setting otherwise. They show that every option trains, evaluates
# and saves; CPU accuracies at 60 s are no ablation of the recipe (the GPU runs will be).
# Run from the repository root with the shared data at ../shared/data; nothing else
# should use the CPU meanwhile (budgets are wall-clock). Nothing is overwritten.
# shellcheck source=scripts/cpu_runs_common.sh
source "$(dirname "$0")/cpu_runs_common.sh"
BOT="--flagfile=flags/page_bag_of_tricks.flags --flagfile=flags/page_bag_of_tricks_haet.flags
     --data_dir=$DATA/cifar10 --width_multiplier=0.25 --batch_size=128 --ghost_batch_splits=4 --budget=60
     --results_dir=$OUT"
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
# --pytorch_init (set in both flagfiles since 6434423) against the he_uniform kernels before it.
run bag_of_tricks_he_uniform python -m haet.train $BOT --nopytorch_init
run airbench94_haet_he_uniform python -m haet.train $AIR --nopytorch_init
}
