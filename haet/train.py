"""Train under a wall-clock budget: `python -m haet.train --budget=600`.

With no other flag this runs the UMBC HAET-2021 recipe (widened ResNet-20, Adam at
batch 32, wall-clock learning rate and augmentation schedules) on a stratified
5,000-image CIFAR-10 subset, evaluates on the 10,000 test images and writes a run
folder under --results_dir. The recipe is also spelled out, with its sources, in
`flags/umbc_resnet20x6.flags`. Every training flag comes from a field of
`haet.config.TrainConfig` (`python -m haet.config` lists them). Examples:

    python -m haet.train --budget=600 --data_dir=../shared/data/cifar10
    python -m haet.train --flagfile=flags/page_resnet9.flags --data_dir=../shared/data/cifar10
    KERAS_BACKEND=jax python -m haet.train --budget=60 --width_multiplier=1
"""

from absl import app, flags

from haet import config as config_lib
from haet.training import train

config_lib.define_flags()
flags.DEFINE_string("results_dir", "results/runs", "A new run folder is made under it.")

FLAGS = flags.FLAGS


def config_from_flags(**overrides):
    """The `TrainConfig` of the parsed command-line flags.

    Raises:
        app.UsageError: a setting that does not check, with its message.
    """
    try:
        return config_lib.config_from_flags(FLAGS, **overrides)
    except ValueError as e:
        raise app.UsageError(str(e)) from None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    train(config_from_flags(), results_dir=FLAGS.results_dir)


if __name__ == "__main__":
    app.run(main)
