#!/usr/bin/env bash
# The training-toolkit runs recorded under results/ (README, "Training toolkit"), on a
# 2-core CPU with small budgets. Run from the repository root with the shared data at
# ../shared/data; nothing else should use the CPU meanwhile (budgets are wall-clock).
# Each step writes new folders (the searches' are named by the time they begin); nothing is
# overwritten. The records under results/search/ were made before the search moved to Optuna
# (README): this script, rerun, makes Optuna searches beside them.
set -euo pipefail
export TF_CPP_MIN_LOG_LEVEL=3 PYTHONPATH=${PYTHONPATH:-$PWD}
DATA=../shared/data
LOGS=results/logs
mkdir -p "$LOGS"
# ResNet-9 at a quarter width (CPU-sized), Page's recipe otherwise, cosine schedule with warmup.
R9="--flagfile=flags/page_resnet9.flags --data_dir=$DATA/cifar10 --width_multiplier=0.25 --batch_size=128
    --ghost_batch_splits=4 --ema_decay=0 --tta=none --lr_schedule=cosine --lr_schedule_unit=steps --warmup=0.2"
# Logs are never overwritten: a rerun writes NAME.1.log, NAME.2.log, ...
run() {
  local name=$1 log k=1; shift
  log="$LOGS/$name.log"
  while [ -e "$log" ]; do log="$LOGS/$name.$k.log"; k=$((k + 1)); done
  echo "== $name -> $log"; "$@" > "$log" 2>&1; tail -n 3 "$log"
}

# 1. Random search of learning rate and weight decay, 6 trials of 60 s on a 1,000-image validation split.
BEGUN=$(date -u +%Y%m%dT%H%M%SZ)
SEARCH=results/search/cifar10_resnet9x0.25_cosine_60s_$BEGUN
run search_lr_wd python -m haet.search $R9 --validation_size=1000 --budget=60 --sampler=random --trials=6 \
  --space=learning_rate=loguniform:0.02:2,weight_decay=loguniform:1e-5:1e-3 --search_dir=$SEARCH
read -r LR WD < <(python -c "
import csv; rows=[r for r in csv.DictReader(open('$SEARCH/trials.csv')) if r['state']=='complete']
b=max(rows, key=lambda r: float(r['validation_accuracy'])); print(b['learning_rate'], b['weight_decay'])")
echo "best learning rate $LR, weight decay $WD"

# 2. Grid over learning-rate shapes at the chosen values (validation split again).
run search_shapes python -m haet.search $R9 --learning_rate=$LR --weight_decay=$WD --validation_size=1000 \
  --budget=60 --sampler=grid --space="lr_schedule=choice:cosine|linear|inverse_sqrt|constant|step" \
  --search_dir=results/search/cifar10_resnet9x0.25_lr_shapes_60s_$BEGUN

# 3. The chosen values on all 5,000 images, test set, three seeds (also the ensemble's members).
for SEED in 0 1 2; do
  run "chosen_seed$SEED" python -m haet.train $R9 --learning_rate=$LR --weight_decay=$WD --budget=60 \
    --seed=$SEED --results_dir=results/cpu
done
MEMBERS=$(ls -d results/cpu/*_cifar105000_resnet9x0.25_60s_tensorflow_seed[012] | tail -n 3 | paste -sd,)
run ensemble_of_3 python -m haet.ensemble --runs=$MEMBERS --results_dir=results/ensembles

# 4. Snapshot ensemble within one 60 s budget: 3 cosine cycles after the warmup.
run snapshot_ensemble python -m haet.train $R9 --lr_schedule=cosine_restarts --lr_cycles=3 --snapshot_ensemble \
  --learning_rate=$LR --weight_decay=$WD --budget=60 --results_dir=results/cpu

# 5. Health monitor + TensorBoard at the chosen learning rate and at 10x it.
run health_chosen python -m haet.train $R9 --learning_rate=$LR --weight_decay=$WD --budget=60 \
  --health_every_steps=10 --tensorboard --results_dir=results/cpu
LR10=$(python -c "print(10 * $LR)")
run health_10x python -m haet.train $R9 --learning_rate=$LR10 --weight_decay=$WD --budget=60 \
  --health_every_steps=10 --tensorboard --results_dir=results/cpu

# 6. Transfer: MNIST digits 0-4 -> digits 5-9, from scratch vs fine-tuned (scripts/transfer_cpu_runs.sh).
bash scripts/transfer_cpu_runs.sh

# 7. Data-parallel on 2 logical CPU devices (JAX) vs 1 device, same global batch and budget.
run jax_1device env KERAS_BACKEND=jax python -m haet.train $R9 --learning_rate=$LR --weight_decay=$WD --budget=60 \
  --results_dir=results/cpu
run jax_2devices env KERAS_BACKEND=jax XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m haet.train $R9 \
  --learning_rate=$LR --weight_decay=$WD --budget=60 --data_parallel --results_dir=results/cpu
# 8. Model selection on a validation split: keep the best epoch, stop after 2 epochs without progress.
run keep_best python -m haet.train $R9 --learning_rate=$LR --weight_decay=$WD --budget=60 --validation_size=1000 \
  --keep_best --early_stopping_patience=2 --results_dir=results/cpu
echo done
