"""Train under a wall-clock budget: `python -m haet.train --budget=600`.

With no other flag this runs the UMBC HAET-2021 recipe (widened ResNet-20, Adam at
batch 32, wall-clock learning rate and augmentation schedules) on a stratified
5,000-image CIFAR-10 subset, evaluates on the 10,000 test images and writes a run
folder under --results_dir. The recipe is also spelled out, with its sources, in
`flags/umbc_resnet20x6.flags`. Examples:

    python -m haet.train --budget=600 --data_dir=../shared/data/cifar10
    KERAS_BACKEND=jax python -m haet.train --budget=60 --width_multiplier=1
"""

import dataclasses

from absl import app, flags

from haet.augment import FILL_MODES
from haet.data import DATASETS
from haet.device import PRECISIONS
from haet.models import MODELS
from haet.schedules import LR_SHAPES
from haet.training import TrainConfig, load_training_data, train

_D = TrainConfig()

flags.DEFINE_float("budget", _D.budget_seconds,
                   "Training budget in seconds, from the first step (compilation included).")
flags.DEFINE_enum("dataset", _D.dataset, sorted(DATASETS) + ["folder"],
                  "Dataset; folder: --data_dir/{train,test}/<class>/*.png.")
flags.DEFINE_string("data_dir", _D.data_dir,
                    "Folder with train.npz/test.npz (or the CIFAR python archives); "
                    "unset: tensorflow-datasets.")
flags.DEFINE_string("results_dir", "results/runs", "A new run folder is made under it.")
flags.DEFINE_integer("train_size", _D.train_size,
                     "Training images, the same number per class.")
flags.DEFINE_integer("subset_seed", _D.subset_seed, "Seed choosing the training subset.")
flags.DEFINE_integer("seed", _D.seed, "Seed of weights, shuffling and augmentation.")
flags.DEFINE_enum("model", _D.model, sorted(MODELS), "Model.")
flags.DEFINE_float("width_multiplier", _D.width_multiplier,
                   "Channels x this (resnet20: an integer; filters (16, 32, 64) x it).")
flags.DEFINE_float("dropout_rate", _D.dropout_rate, "resnet20: dropout rate at each site.")
flags.DEFINE_float("weight_decay", _D.weight_decay, "L2 factor on kernels: loss += wd * sum(w**2).")
flags.DEFINE_string("activation", _D.activation, "resnet9: celu or a Keras activation name.")
flags.DEFINE_float("celu_alpha", _D.celu_alpha, "resnet9: CELU alpha.")
flags.DEFINE_integer("ghost_batch_splits", _D.ghost_batch_splits,
                     "resnet9: batch-norm groups per batch (1: plain batch norm).")
flags.DEFINE_bool("frozen_bn_scale", _D.frozen_bn_scale, "resnet9: batch-norm scales fixed at 1.")
flags.DEFINE_float("logit_scale", _D.logit_scale, "resnet9: logits multiplied by this.")
flags.DEFINE_string("input_normalization", _D.input_normalization,
                    "pixel_mean (subtract the per-pixel mean) or channel_standardize.")
flags.DEFINE_integer("batch_size", _D.batch_size, "Training examples per step.")
flags.DEFINE_integer("eval_batch_size", _D.eval_batch_size, "Test examples per step.")
# Strings, not enums: a bad value gets haet's own error naming what is allowed.
flags.DEFINE_string("precision", _D.precision,
                    f"One of {', '.join(PRECISIONS)}. auto: mixed_bfloat16 on Ampere or newer "
                    "GPUs, mixed_float16 on older GPUs, float32 on CPU.")
flags.DEFINE_string("optimizer", _D.optimizer, "adam, or sgd (Nesterov momentum).")
flags.DEFINE_float("momentum", _D.momentum, "sgd: momentum.")
flags.DEFINE_float("label_smoothing", _D.label_smoothing, "Label smoothing of the cross-entropy.")
flags.DEFINE_string("lr_schedule", _D.lr_schedule,
                    "wall_clock: --learning_rates piecewise constant over the budget fraction; "
                    "one_cycle: piecewise linear over the planned steps; or a shape from "
                    "--learning_rate: " + ", ".join(LR_SHAPES) + ".")
flags.DEFINE_string("lr_schedule_unit", _D.lr_schedule_unit,
                    "Shapes only: budget (elapsed fraction of the wall-clock budget) or steps "
                    "(fraction of the planned steps).")
flags.DEFINE_float("learning_rate", _D.learning_rate, "Shapes: peak learning rate.")
flags.DEFINE_float("warmup", _D.warmup,
                   "Shapes: fraction of the run with a linear warmup from 0 to --learning_rate.")
flags.DEFINE_float("final_learning_rate", _D.final_learning_rate,
                   "cosine, cosine_restarts, linear: learning rate at the end (of each cycle).")
flags.DEFINE_float("lr_decay_factor", _D.lr_decay_factor,
                   "step: learning rate x this at each of --learning_rate_boundaries.")
flags.DEFINE_integer("lr_cycles", _D.lr_cycles, "cosine_restarts: number of equal cycles.")
flags.DEFINE_float("inverse_sqrt_timescale", _D.inverse_sqrt_timescale,
                   "inverse_sqrt: lr / sqrt(1 + t / timescale), t and timescale fractions of the run.")
flags.DEFINE_integer("lr_scaling_reference_batch", _D.lr_scaling_reference_batch,
                     "> 0: every learning rate x batch_size / this (linear scaling rule); 0: off.")
flags.DEFINE_list("learning_rate_boundaries", list(_D.learning_rate_boundaries),
                  "wall_clock, step: fractions of the run where the learning rate steps.")
flags.DEFINE_list("learning_rates", list(_D.learning_rates),
                  "wall_clock: learning rate in each interval (one more than boundaries).")
flags.DEFINE_list("one_cycle_knots", list(_D.one_cycle_knots),
                  "one_cycle: knots as fractions of the planned steps, 0 to 1.")
flags.DEFINE_list("one_cycle_learning_rates", list(_D.one_cycle_learning_rates),
                  "one_cycle: learning rate at each knot.")
flags.DEFINE_integer("epochs", _D.epochs,
                     "> 0: train this many epochs (the budget still stops training); "
                     "0: the budget decides (one_cycle: planned by timing the first steps).")
flags.DEFINE_integer("planner_probe_steps", _D.planner_probe_steps,
                     "one_cycle planning: steps timed after the first before planning.")
flags.DEFINE_float("ema_decay", _D.ema_decay, "Per-step EMA momentum of the weights; 0: off.")
flags.DEFINE_string("tta", _D.tta, "Test-time augmentation: none, flip or flip_translate.")
flags.DEFINE_string("augmentation", _D.augmentation, "affine, crop_flip_cutout or none.")
flags.DEFINE_float("shift_range", _D.shift_range, "affine: max shift, fraction of the image size.")
flags.DEFINE_float("zoom_range", _D.zoom_range, "affine: zoom factors in [1 - z, 1 + z].")
flags.DEFINE_float("rotation_range", _D.rotation_range, "affine: max rotation in degrees.")
flags.DEFINE_float("shear_range", _D.shear_range, "affine: max shear angle in degrees.")
flags.DEFINE_bool("horizontal_flip", _D.horizontal_flip, "Random left-right flips.")
flags.DEFINE_list("fill_modes", list(_D.fill_modes),
                  f"affine: fill modes drawn from each epoch; of {', '.join(FILL_MODES)}.")
flags.DEFINE_list("augment_strength_boundaries", list(_D.augment_strength_boundaries),
                  "affine: fractions of the budget where the augmentation strength steps.")
flags.DEFINE_list("augment_strengths", list(_D.augment_strengths),
                  "affine: strength in [0, 1] multiplying every range, per interval.")
flags.DEFINE_integer("crop_padding", _D.crop_padding, "crop_flip_cutout: crop offsets in pixels.")
flags.DEFINE_integer("cutout_size", _D.cutout_size, "crop_flip_cutout: cutout square in pixels; 0: off.")
flags.DEFINE_integer("precomputed_augmentation_epochs", _D.precomputed_augmentation_epochs,
                     "crop_flip_cutout: > 0 augments this many copies of the training set before "
                     "training (counted in the budget) instead of on the fly.")
flags.DEFINE_integer("validation_size", _D.validation_size,
                     "Class-balanced images held out of the training subset to validate on "
                     "after each epoch; 0: none.")
flags.DEFINE_integer("early_stopping_patience", _D.early_stopping_patience,
                     "Stop after this many epochs without a better validation accuracy; 0: off.")
flags.DEFINE_bool("keep_best", _D.keep_best,
                  "End with the weights of the epoch with the best validation accuracy.")
flags.DEFINE_bool("evaluate_test", _D.evaluate_test,
                  "Evaluate on the test set (off for model selection: needs --validation_size).")
flags.DEFINE_bool("tensorboard", _D.tensorboard, "Write TensorBoard logs to <run folder>/tensorboard.")
flags.DEFINE_bool("data_parallel", _D.data_parallel,
                  "Train data-parallel on all local devices (TensorFlow: MirroredStrategy; JAX: "
                  "keras.distribution.DataParallel); --batch_size is the global batch.")
flags.DEFINE_integer("health_every_steps", _D.health_every_steps,
                     "> 0: every this many steps log each kernel's update/weight norm ratio and "
                     "gradient norm (health.csv, history, TensorBoard); 0: off.")
flags.DEFINE_bool("snapshot_ensemble", _D.snapshot_ensemble,
                  "Keep the weights at the end of each learning-rate cycle (cosine_restarts) and "
                  "evaluate each and their ensemble.")
flags.DEFINE_list("classes", list(_D.classes),
                  "Class ids to keep, relabelled 0..k-1 in this order (e.g. 5,6,7,8,9); empty: all.")
flags.DEFINE_string("init_from", _D.init_from,
                    "A saved model.keras to fine-tune: same --model and --width_multiplier, new head "
                    "for this dataset's classes; use a lower learning rate.")
flags.DEFINE_integer("freeze_stages", _D.freeze_stages,
                     "--init_from: leading backbone stages kept frozen (resnet9: prep, layer1, "
                     "layer2, layer3; resnet20: stem, stage1, stage2, stage3).")
flags.DEFINE_bool("save_model", _D.save_model, "Save the final model as model.keras.")

FLAGS = flags.FLAGS

# TrainConfig field -> flag name, where they differ (the flag carries the unit's usual name).
_FLAG_NAMES = {"budget_seconds": "budget"}


def config_from_flags():
    """The `TrainConfig` the command-line flags describe (list flags -> tuples)."""
    values = {}
    for field in dataclasses.fields(TrainConfig):
        name = _FLAG_NAMES.get(field.name, field.name)
        value = FLAGS[name].value
        if isinstance(field.default, tuple):
            kind = type(field.default[0]) if field.default else int
            try:
                value = tuple(kind(v) for v in value)
            except ValueError:
                raise app.UsageError(f"--{name} takes comma-separated numbers. Received: {value}")
        values[field.name] = value
    return TrainConfig(**values)


def config_and_data_from_flags():
    """The validated `TrainConfig` of the flags and its data, for commands that reuse
    the training flags (`haet.sanity`, `haet.lr_find`).

    Returns:
        `(config, dataset, x_train, y_train, subset_sha256)`.
    """
    config = config_from_flags()
    config.validate()
    return (config, *load_training_data(config))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = config_from_flags()
    try:
        config.validate()
    except ValueError as e:
        raise app.UsageError(str(e))
    train(config, results_dir=FLAGS.results_dir)


if __name__ == "__main__":
    app.run(main)
