#!/usr/bin/env bash
# The throughput benchmarks behind results/bench/ (this CPU machine, both backends):
# ResNet-9 width 0.25 at batch 128 (Page's recipe) and ResNet-20 x1 at batch 32 (the UMBC
# recipe), each against the keras.fit baseline (haet's loop before its engine), and a
# tiny model with a step of a few milliseconds across steps per execution.
#   bash scripts/bench_cpu.sh [../shared/data/cifar10]
set -euo pipefail
cd "$(dirname "$0")/.."
data="${1:-../shared/data/cifar10}"
out=results/bench
mkdir -p "$out/logs"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
for backend in tensorflow jax; do
  run() {  # name, then flags
    local name=$1; shift
    KERAS_BACKEND=$backend python3 -m haet.bench --data_dir="$data" --json="$out/${stamp}_${name}_${backend}_cpu.json" "$@" \
      2>&1 | tee "$out/logs/${stamp}_${name}_${backend}_cpu.log" | grep -v '^[IW][0-9]'
  }
  run resnet9x0.25_b128 --flagfile=flags/page_resnet9.flags --width_multiplier=0.25 --batch_size=128 \
      --ghost_batch_splits=4 --ema_decay=0 --tta=none --end_to_end_budget=60 --keras_fit --bench_steps=10
  run resnet20x1_b32 --width_multiplier=1 --batch_size=32 --end_to_end_budget=60 --keras_fit --bench_steps=20
  run tiny_cnn_b4 --model=tiny_cnn --width_multiplier=0.25 --augmentation=none --optimizer=sgd \
      --lr_schedule=constant --learning_rate=0.05 --input_normalization=channel_standardize --batch_size=4 \
      --steps_per_executions=1,4,16,64 --end_to_end_budget=30 --keras_fit --bench_steps=100
done
