"""Train under a wall-clock budget: `python -m haet.train --budget=600`.

With no other flag this runs the UMBC HAET-2021 recipe (widened ResNet-20, Adam at
batch 32, wall-clock learning rate and augmentation schedules) on a stratified
5,000-image CIFAR-10 subset, evaluates on the 10,000 test images and writes a run
folder under --results_dir. The recipe is also spelled out, with its sources, in
`flags/umbc_resnet20x6.flags`. Examples:

    python -m haet.train --budget=600 --data_dir=../shared/data/cifar10
    KERAS_BACKEND=jax python -m haet.train --budget=60 --width_multiplier=1
"""

from absl import app, flags

from haet.augment import FILL_MODES
from haet.data import DATASETS
from haet.device import PRECISIONS
from haet.models import MODELS
from haet.training import TrainConfig, train

_D = TrainConfig()

flags.DEFINE_float("budget", _D.budget_seconds,
                   "Training budget in seconds, from the first step (compilation included).")
flags.DEFINE_enum("dataset", _D.dataset, sorted(DATASETS), "Dataset.")
flags.DEFINE_string("data_dir", _D.data_dir,
                    "Folder with train.npz/test.npz (or cifar-10-python.tar.gz); "
                    "unset: tensorflow-datasets.")
flags.DEFINE_string("results_dir", "results/runs", "A new run folder is made under it.")
flags.DEFINE_integer("train_size", _D.train_size,
                     "Training images, the same number per class.")
flags.DEFINE_integer("subset_seed", _D.subset_seed, "Seed choosing the training subset.")
flags.DEFINE_integer("seed", _D.seed, "Seed of weights, shuffling and augmentation.")
flags.DEFINE_enum("model", _D.model, sorted(MODELS), "Model.")
flags.DEFINE_integer("width_multiplier", _D.width_multiplier,
                     "Filters per stage = (16, 32, 64) x this.")
flags.DEFINE_float("dropout_rate", _D.dropout_rate, "Dropout rate at each dropout site.")
flags.DEFINE_float("weight_decay", _D.weight_decay, "L2 factor on convolution kernels.")
flags.DEFINE_integer("batch_size", _D.batch_size, "Training examples per step.")
flags.DEFINE_integer("eval_batch_size", _D.eval_batch_size, "Test examples per step.")
# Not an enum: a bad value gets haet's own error naming what is allowed.
flags.DEFINE_string("precision", _D.precision,
                    f"One of {', '.join(PRECISIONS)}. auto: mixed_bfloat16 on Ampere or newer "
                    "GPUs, mixed_float16 on older GPUs, float32 on CPU.")
flags.DEFINE_list("learning_rate_boundaries", [str(b) for b in _D.learning_rate_boundaries],
                  "Fractions of the budget where the learning rate steps.")
flags.DEFINE_list("learning_rates", [str(v) for v in _D.learning_rates],
                  "Adam learning rate in each interval (one more than boundaries).")
flags.DEFINE_bool("augment", _D.augment, "Random affine augmentation in training.")
flags.DEFINE_float("shift_range", _D.shift_range, "Max shift, fraction of the image size.")
flags.DEFINE_float("zoom_range", _D.zoom_range, "Zoom factors in [1 - z, 1 + z].")
flags.DEFINE_float("rotation_range", _D.rotation_range, "Max rotation in degrees.")
flags.DEFINE_float("shear_range", _D.shear_range, "Max shear angle in degrees.")
flags.DEFINE_bool("horizontal_flip", _D.horizontal_flip, "Random left-right flips.")
flags.DEFINE_list("fill_modes", list(_D.fill_modes),
                  f"Fill modes drawn from each epoch; of {', '.join(FILL_MODES)}.")
flags.DEFINE_list("augment_strength_boundaries",
                  [str(b) for b in _D.augment_strength_boundaries],
                  "Fractions of the budget where the augmentation strength steps.")
flags.DEFINE_list("augment_strengths", [str(v) for v in _D.augment_strengths],
                  "Strength in [0, 1] multiplying every range, per interval.")
flags.DEFINE_bool("save_model", _D.save_model, "Save the final model as model.keras.")

FLAGS = flags.FLAGS


def _floats(name, values):
    try:
        return tuple(float(v) for v in values)
    except ValueError:
        raise app.UsageError(f"--{name} takes comma-separated numbers. Received: {values}")


def config_from_flags():
    """The `TrainConfig` the command-line flags describe."""
    return TrainConfig(
        budget_seconds=FLAGS.budget,
        dataset=FLAGS.dataset,
        data_dir=FLAGS.data_dir,
        train_size=FLAGS.train_size,
        subset_seed=FLAGS.subset_seed,
        seed=FLAGS.seed,
        model=FLAGS.model,
        width_multiplier=FLAGS.width_multiplier,
        dropout_rate=FLAGS.dropout_rate,
        weight_decay=FLAGS.weight_decay,
        batch_size=FLAGS.batch_size,
        eval_batch_size=FLAGS.eval_batch_size,
        precision=FLAGS.precision,
        learning_rate_boundaries=_floats("learning_rate_boundaries", FLAGS.learning_rate_boundaries),
        learning_rates=_floats("learning_rates", FLAGS.learning_rates),
        augment=FLAGS.augment,
        shift_range=FLAGS.shift_range,
        zoom_range=FLAGS.zoom_range,
        rotation_range=FLAGS.rotation_range,
        shear_range=FLAGS.shear_range,
        horizontal_flip=FLAGS.horizontal_flip,
        fill_modes=tuple(FLAGS.fill_modes),
        augment_strength_boundaries=_floats("augment_strength_boundaries",
                                            FLAGS.augment_strength_boundaries),
        augment_strengths=_floats("augment_strengths", FLAGS.augment_strengths),
        save_model=FLAGS.save_model,
    )


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
