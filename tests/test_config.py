"""Settings: fields assembled from the components, checks at construction, flags
generated from the fields, one parser."""

import dataclasses
import json
import os
import pickle

import pytest
from absl import flags as absl_flags

from conftest import REPO
from haet import config as config_lib
from haet.config import TrainConfig


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"dataset": "imagenet"}, "Unknown dataset 'imagenet'"),
        ({"model": "vgg"}, "Unknown model 'vgg'. Allowed: resnet20, resnet9, airbench, tiny_cnn"),
        ({"precision": "half"}, "Unknown precision 'half'. Allowed: auto, float32"),
        ({"fill_modes": ("nearest", "mirror")}, "Unknown fill mode 'mirror'"),
        ({"budget_seconds": 0}, "budget must be a positive number of seconds. Received: budget=0"),
        ({"budget_seconds": -5.0}, "Received: budget=-5.0"),
        ({"budget_seconds": float("inf")}, "Received: budget=inf"),
        ({"train_size": 5005}, "train_size=5005 is not a multiple of the 10 classes"),
        ({"train_size": 60000}, "train_size=60000 is larger than the 50000 training images"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"batch_size": 64, "train_size": 50}, "batch_size=64 is larger than train_size=50"),
        ({"learning_rates": (1e-3,)}, "learning rate schedule needs one more value"),
        ({"augment_strengths": (1.0, 0.5, 2.0, 0, 0, 0, 0)}, r"strength schedule values must be in \[0.0, 1.0\]"),
        ({"rotation_range": 400.0}, r"rotation_range must be a number in \[0, 180.0\] \(degrees\)"),
        ({"width_multiplier": 1.5}, "resnet20 needs an integer width_multiplier. Received: 1.5"),
        ({"model": "resnet9", "batch_size": 64, "ghost_batch_splits": 3}, "ghost_batch_splits=3 must divide batch_size=64"),
        ({"model": "resnet9", "ghost_batch_splits": 0}, "ghost_batch_splits must be a positive integer"),
        ({"model": "resnet9", "logit_scale": 0.0}, "logit_scale must be a positive number"),
        ({"model": "resnet9", "activation": "swishy"}, "Unknown activation 'swishy'"),
        ({"augmentation": "crop_flip_cutout", "cutout_size": 33}, "cutout_size=33 is larger than the 32x32 images"),
        ({"steps_per_execution": 0}, "steps_per_execution must be a positive integer"),
        ({"warmup": 0.1}, "--warmup applies to the shapes"),
        ({"lr_schedule": "cosine", "lr_schedule_unit": "epochs"}, "Unknown lr_schedule_unit 'epochs'"),
        ({"label_smoothing": 1.0}, r"label_smoothing must be in \[0, 1\)"),
        ({"keep_best": True}, "set --validation_size"),
        ({"validation_size": 55}, "validation_size=55 is not a multiple of the 10 classes"),
        ({"batch_size": "many"}, "--batch_size takes an integer. Received: 'many'"),
        ({"horizontal_flip": "sometimes"}, "--horizontal_flip takes true or false"),
    ],
)
def test_bad_settings_fail_at_construction_naming_the_value(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes)


def test_replace_checks_too_and_values_are_normalized():
    config = TrainConfig(learning_rates=[1e-3, 1e-4, 1e-5], width_multiplier=6, classes=["1", 2])
    assert config.learning_rates == (1e-3, 1e-4, 1e-5) and isinstance(config.width_multiplier, float)
    assert config.classes == (1, 2)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        dataclasses.replace(config, batch_size=-1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.batch_size = 64


def test_record_round_trip_and_pickle():
    config = TrainConfig(model="resnet9", width_multiplier=0.5, batch_size=64, ghost_batch_splits=4, classes=(3, 5))
    flags = json.loads(json.dumps(dataclasses.asdict(config)))
    assert config_lib.config_from_record(flags) == config
    assert config_lib.config_from_record({**flags, "a_field_of_the_future": 1}) == config
    assert pickle.loads(pickle.dumps(config)) == config
    assert config_lib.config_from_record({"batch_size": 64}) == TrainConfig(batch_size=64)


@pytest.mark.parametrize("field, text, value", [
    ("batch_size", "64", 64),
    ("budget_seconds", "1e2", 100.0),
    ("horizontal_flip", "False", False),
    ("keep_best", "yes", True),
    ("learning_rates", "1e-3, 1e-4,1e-5", (1e-3, 1e-4, 1e-5)),
    ("classes", "", ()),
    ("fill_modes", ["wrap", "reflect"], ("wrap", "reflect")),
    ("data_dir", None, None),
    ("model", "resnet9", "resnet9"),
])
def test_one_parser_for_text_and_json(field, text, value):
    assert config_lib.parse_value(config_lib.field_of(field), text) == value


def test_every_field_has_a_flag_with_its_help_default_and_the_alias():
    values = absl_flags.FlagValues()
    config_lib.define_flags(values)
    for name, field in config_lib.FIELDS.items():
        flag = values[config_lib.flag_name(name)]
        assert flag.help == field.help and flag.default == field.default, name
    assert "budget" in values and "budget_seconds" not in values
    values(["prog", "--budget=30", "--learning_rates=1,0.1,0.01", "--nohorizontal_flip", "--model=resnet9",
            "--batch_size=64", "--ghost_batch_splits=4"])
    config = config_lib.config_from_flags(values)
    assert config.budget_seconds == 30.0 and config.learning_rates == (1.0, 0.1, 0.01)
    assert config.horizontal_flip is False and config.ghost_batch_splits == 4
    with pytest.raises(absl_flags.IllegalFlagValueError, match="--batch_size takes an integer"):
        values(["prog", "--batch_size=1.5"])
    assert config_lib.field_of("budget").name == "budget_seconds"
    with pytest.raises(ValueError, match="'nope' is not a training setting"):
        config_lib.field_of("nope")


def test_help_carries_units_and_describe_lists_every_field():
    text = config_lib.describe()
    for name in config_lib.FIELDS:
        assert f"--{config_lib.flag_name(name)}=" in text
    assert "seconds" in config_lib.field_of("budget").help
    assert "degrees" in config_lib.field_of("rotation_range").help
    assert "pixels" in config_lib.field_of("cutout_size").help


def _flagfile_values(path):
    values = {}
    for line in open(path):
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.lstrip("-").partition("=")
            values[name] = value if value else "true"
    return values


def test_default_flags_are_the_umbc_flagfile():
    recipe = _flagfile_values(os.path.join(REPO, "flags", "umbc_resnet20x6.flags"))
    assert {"budget", "width_multiplier", "learning_rates", "augment_strengths"} <= set(recipe)
    defaults = TrainConfig()
    for name, text in recipe.items():
        field = config_lib.field_of(name)
        assert config_lib.parse_value(field, text) == getattr(defaults, field.name), name


# Each shipped flagfile, alone or after the one it is an overlay of.
_RECIPE_FLAGFILES = [
    ["umbc_resnet20x6.flags"],
    ["page_resnet9.flags"],
    ["page_resnet9.flags", "page_resnet9_full_cifar10.flags"],
    ["page_resnet9.flags", "resnet9_mnist.flags"],
    ["page_bag_of_tricks.flags"],
    ["page_bag_of_tricks.flags", "page_bag_of_tricks_haet.flags"],
    ["airbench94.flags"],
    ["airbench94.flags", "airbench94_haet.flags"],
]


def test_every_flagfile_in_flags_is_checked():
    """A flagfile added to flags/ is checked only once it is listed above."""
    listed = {name for files in _RECIPE_FLAGFILES for name in files}
    assert listed == {name for name in os.listdir(os.path.join(REPO, "flags")) if name.endswith(".flags")}


@pytest.mark.parametrize("flagfiles", _RECIPE_FLAGFILES)
def test_every_recipe_flagfile_parses_and_checks(flagfiles):
    values = absl_flags.FlagValues()
    config_lib.define_flags(values)
    values(["prog"] + [f"--flagfile={os.path.join(REPO, 'flags', f)}" for f in flagfiles])
    config = config_lib.config_from_flags(values)
    assert config.ignored_settings() == {} and config_lib.ignored_settings_warning(config) is None  # all count
    first_line = open(os.path.join(REPO, "flags", flagfiles[-1])).readline()
    assert first_line.startswith("# python -m haet.train --flagfile=flags/")


def test_settings_that_change_nothing_are_named_for_the_warning_of_the_command_lines():
    assert TrainConfig().ignored_settings() == {}
    config = TrainConfig(momentum=0.5, learning_rate=0.1, dropout_rate=0.1, model="resnet9", width_multiplier=0.25,
                         augmentation="crop_flip_cutout", shift_range=0.1, lr_schedule="cosine", lr_cycles=3,
                         final_learning_rate=0.01)
    # momentum: Adam; dropout: not ResNet-9; shift: not crop_flip_cutout; cycles: not plain cosine.
    assert config.ignored_settings() == {"dropout_rate": "model", "shift_range": "augmentation",
                                         "lr_cycles": "lr_schedule", "momentum": "optimizer"}
    assert config_lib.ignored_settings_warning(config) == (
        "--dropout_rate=0.1 (--model=resnet9 does not use it); --shift_range=0.1 (--augmentation=crop_flip_cutout "
        "does not use it); --lr_cycles=3 (--lr_schedule=cosine does not use it); --momentum=0.5 (--optimizer=adam "
        "does not use it): these settings change nothing in this run (the flag's help names the kinds that read it).")
    # The same values count where the chosen kinds read them; defaults never count as set.
    assert dataclasses.replace(config, dropout_rate=0.25, shift_range=0.2, lr_schedule="cosine_restarts",
                               optimizer="sgd").ignored_settings() == {}
    assert TrainConfig(learning_rate=0.1, budget_seconds=5).ignored_settings() == {"learning_rate": "lr_schedule"}
    assert TrainConfig(learning_rates=(0.1, 0.01, 0.001), lr_schedule="constant").ignored_settings() == {
        "learning_rates": "lr_schedule"}
    # The optimizer scales the batch-norm shifts of any model: never ignored.
    assert TrainConfig(bn_shift_lr_multiplier=4.0).ignored_settings() == {}
    assert TrainConfig(budget_seconds=30, lr_schedule="constant", final_learning_rate=1e-4).ignored_settings() == {
        "final_learning_rate": "lr_schedule"}
