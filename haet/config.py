"""A training run's settings: `TrainConfig`, assembled from the components' fields.

Each component module declares the fields it reads (`haet.fields.Field`: name,
default, help with the unit, check): `haet.data`, `haet.models`, `haet.augment`,
`haet.schedules`, `haet.optimizers`, `haet.evaluation`; the run's own fields are
`RUN_FIELDS` below. `TrainConfig` is a frozen dataclass with all of them, in that
order, and checks itself when it is constructed (also by `dataclasses.replace`):
each value's type and range, then each component's checks, then the settings that
combine components. `python -m haet.config` prints every field with its default
and help.

The defaults are the UMBC HAET-2021 recipe (Hosseini, Prakash, Pirsiavash, Mohsenin,
"Training a 5000x32x32x3 RGB dataset on Nvidia Tesla V100 in 10 minutes", ICLR 2021
HAET workshop; xmhosseini/HAET2021) with our protocol: a stratified seeded
5,000-image subset, the full test set and the final model.
`flags/umbc_resnet20x6.flags` restates them for the command line.

Command-line flags are generated from the fields (`define_flags`); `ALIASES` names
the flags whose name differs from the field's, and `parse_value` is the one parser
of a setting written as text (flags, search spaces) or as JSON (run records).
"""

import dataclasses

import keras
from absl import flags

from haet import augment, data, engine, evaluation, fields, models, optimizers, schedules
from haet.device import PRECISIONS
from haet.fields import Field

RUN_FIELDS = (
    Field("budget_seconds", 600.0, "Training budget in seconds, from the start of training (compilation "
          "included); training stops at the first execution boundary after it.", fields.positive(unit=" of seconds")),
    Field("seed", 0, "Seed of the weights, the shuffling and the augmentation.", fields.at_least(0, integer=True)),
    Field("batch_size", 32, "Training examples per step.", fields.positive(integer=True)),
    Field("precision", "auto", f"One of {', '.join(PRECISIONS)}. auto: mixed_bfloat16 on Ampere or newer GPUs, "
          "mixed_float16 on older GPUs, float32 on CPU.", fields.one_of(PRECISIONS, "precision")),
    Field("epochs", 0.0, "> 0: train this many epochs (the budget still stops training); a fraction ends "
          "inside the last epoch, after ceil(epochs x steps per epoch) steps (airbench: 9.9); 0: the budget "
          "decides (one_cycle and step-unit schedules: planned by timing steps first).", fields.at_least(0)),
    Field("planner_probe_steps", 20, "Step-planned schedules with --epochs=0: training steps timed (after the "
          "compiling one) before planning; their updates are discarded.", fields.positive(integer=True)),
    Field("planner_pace_window", 0.25, "Step-planned schedules with --epochs=0: from the second epoch end "
          "on, after each execution, the planner projects the plan's end from the median step time (weighted "
          "by steps) of the latest executions covering this fraction of the steps done (5 to 256 executions), "
          "and plans fewer epochs when the plan would pass the budget by more than an epoch and 5% of the "
          "seconds left (steps that slowed down since the probe, time lost); never more. 0: off, the plan is "
          "kept (re-planned only at the first epoch end, for the time between epochs).", fields.in_range(0, 1)),
    Field("steps_per_execution", engine.DEFAULT_STEPS_PER_EXECUTION, "Most training steps per execution "
          "(see --execution_loop): the host waits for the device, reads the clock and writes schedule values "
          "only between executions; the budget overshoots by at most one execution.", fields.positive(integer=True)),
    Field("execution_loop", "auto", "JAX: fused (an execution is one compiled loop over its steps), dispatch "
          "(one compiled step after another, not waited for) or auto (fused on accelerators, dispatch on CPUs, "
          "where XLA runs a loop body several times slower).", fields.one_of(engine.EXECUTION_LOOPS,
                                                                             "execution_loop")),
    Field("span_epochs", True, "An execution runs on past epoch ends when no hook needs to see them "
          "(validation, Keras callbacks and more than one fill mode end executions with their epoch): in the "
          "HAET setting (9 steps an epoch at batch 512) the host waits once every --steps_per_execution steps "
          "instead of every epoch. Both backends."),
    Field("early_stopping_patience", 0, "Stop after this many epochs without a better validation accuracy; "
          "0: off.", fields.at_least(0, integer=True)),
    Field("keep_best", False, "End with the weights of the epoch with the best validation accuracy."),
    Field("evaluate_test", True, "Evaluate on the test set (False for model selection: needs "
          "--validation_size)."),
    Field("tensorboard", False, "Write TensorBoard logs to <run folder>/tensorboard."),
    Field("data_parallel", False, "Train data-parallel on all local devices (TensorFlow: MirroredStrategy; "
          "JAX: keras.distribution.DataParallel); --batch_size is the global batch."),
    Field("health_every_steps", 0, "> 0: every this many steps log each kernel's update/weight norm ratio and "
          "gradient norm (health.csv, history, TensorBoard); 0: off.", fields.at_least(0, integer=True)),
    Field("snapshot_ensemble", False, "Keep the weights at the end of each learning-rate cycle "
          "(cosine_restarts) and evaluate each and their ensemble."),
    Field("save_model", True, "Save the final model as model.keras."),
    Field("export", "none", "none, or saved_model: also write <run folder>/saved_model, a TensorFlow SavedModel "
          "whose serving signature takes uint8 images (N, H, W, C) and returns float32 logits (for TF "
          "Serving, TFLite converters; needs tensorflow, under either backend).",
          fields.one_of(("none", "saved_model"), "export")),
    Field("checkpoint_every", 120.0, "Seconds of budget between checkpoints (<run folder>/checkpoint.npz, "
          "for --resume), and one when training ends, before the evaluation (a resume then only evaluates; "
          "a completed run deletes it); budgets shorter than this get none unless stopped by a signal. Writing "
          "them pauses the budget's clock. 0: only when a signal stops the run.", fields.at_least(0, unit=" seconds")),
    Field("deterministic", False, "Deterministic ops on top of the seeds: TensorFlow's "
          "enable_op_determinism, XLA's --xla_gpu_deterministic_ops under JAX (set before JAX starts); "
          "slower on GPUs."),
)

SECTIONS = (
    ("run", RUN_FIELDS), ("data", data.FIELDS), ("model", models.FIELDS), ("augmentation", augment.FIELDS),
    ("learning rate", schedules.FIELDS), ("optimizer", optimizers.FIELDS), ("evaluation", evaluation.FIELDS),
)
FIELDS = {f.name: f for _, section in SECTIONS for f in section}

# Flag name -> config field, where they differ (the flag carries the unit's usual name).
ALIASES = {"budget": "budget_seconds"}
FLAG_NAMES = {field: flag for flag, field in ALIASES.items()}


def field_of(name):
    """The `Field` of a config field or flag name (aliases resolved).

    Raises:
        ValueError: no such setting.
    """
    name = ALIASES.get(name, name)
    if name not in FIELDS:
        raise ValueError(f"{name!r} is not a training setting (see python -m haet.config).")
    return FIELDS[name]


_TRUE, _FALSE = ("true", "1", "yes", "t", "y"), ("false", "0", "no", "f", "n")


def parse_value(field, value):
    """`value` (text, or a Python/JSON value) as the type of `field`.

    Text: booleans from true/false/1/0/yes/no, numbers, and lists as comma-separated
    text (or a list of texts); JSON: lists become tuples, integers of float fields
    floats.

    Raises:
        ValueError: text that is not of the field's type, naming the field.
    """
    kind = field.type
    if value is None or (isinstance(value, str) and kind is str):
        return value
    try:
        if kind is tuple:
            items = value.split(",") if isinstance(value, str) else value
            items = [item.strip() if isinstance(item, str) else item for item in items]
            return tuple(_parse_scalar(field.element_type, item) for item in items if item != "")
        return _parse_scalar(kind, value)
    except (TypeError, ValueError):
        what = (f"comma-separated values ({field.element_type.__name__})" if kind is tuple else
                {bool: "true or false", int: "an integer", float: "a number"}.get(kind, "text"))
        raise ValueError(f"--{flag_name(field.name)} takes {what}. Received: {value!r}") from None


def _parse_scalar(kind, value):
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise ValueError(value)
    if kind is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(value)
        return int(value)
    if kind is float:
        if isinstance(value, bool):
            raise ValueError(value)
        return float(value)
    return value if isinstance(value, str) else str(value)


def flag_name(name):
    """The flag of config field `name` (`budget` for `budget_seconds`)."""
    return FLAG_NAMES.get(name, name)


# The component tables a config chooses from, with the field that chooses.
COMPONENT_TABLES = ((models.MODELS, "model"), (augment.AUGMENTATIONS, "augmentation"),
                    (schedules.LR_SCHEDULES, "lr_schedule"), (optimizers.OPTIMIZERS, "optimizer"))
# Fields a table lists for some kinds that are also read outside the tables, for every
# kind: the optimizer applies bn_shift_lr_multiplier to the batch-norm shifts of any model.
READ_ELSEWHERE = frozenset({"bn_shift_lr_multiplier"})


class _Base:
    """Methods of `TrainConfig` (the fields are generated from `FIELDS`)."""

    def __post_init__(self):
        for name, field in FIELDS.items():
            value = getattr(self, name)
            typed = parse_value(field, value)
            if typed is not value:
                object.__setattr__(self, name, typed)
            _check_type(field, typed)
            if field.check and typed is not None:
                field.check(typed, name if name not in FLAG_NAMES else flag_name(name))
        info = data.check_config(self)
        models.check_config(self)
        augment.check_config(self, info.image_shape)
        schedules.check_config(self)
        _check_run(self, info)

    def ignored_settings(self):
        """The settings that change nothing in this run: a value other than the default
        in a field that only kinds this config does not choose read (`--momentum`
        with `--optimizer=adam`, `--learning_rate` under `--lr_schedule=wall_clock`,
        `--dropout_rate` with `--model=resnet9`...). A config may hold them (a record,
        `haet.fit`); the command lines warn of them (`warn_ignored_settings`) and a run's
        record lists them.

        Returns:
            dict flag name -> the flag whose choice does not read it (e.g.
            {"momentum": "optimizer"}); empty when every setting counts.
        """
        defaults = {name: field.default for name, field in FIELDS.items()}
        ignored = fields.ignored_settings(self, COMPONENT_TABLES, defaults, read_elsewhere=READ_ELSEWHERE)
        return {flag_name(name): flag_name(selector) for name, selector in ignored.items()}

    def run_name(self):
        """The run folder's name: dataset, training size, model, width (and ensemble size),
        budget, backend, seed."""
        ensemble = f"_ensemble{self.ensemble_members}" if self.ensemble_members > 1 else ""
        return (f"{self.dataset}{self.train_size}_{self.model}x{self.width_multiplier:g}{ensemble}_"
                f"{self.budget_seconds:g}s_{keras.backend.backend()}_seed{self.seed}")


def ignored_settings_warning(config):
    """The warning the command lines print about the settings of `config` that change
    nothing (`TrainConfig.ignored_settings`), or None when every setting counts.

    Such a setting is not refused: a recipe's flagfile sets values for its own kinds,
    and a command line that changes a kind (`--lr_schedule=cosine` after Page's
    one-cycle flagfile) leaves them behind. It is said once at the start, and the run's
    record keeps it (`ignored_settings`).
    """
    ignored = config.ignored_settings()
    if not ignored:
        return None

    def shown(flag):
        value = getattr(config, ALIASES.get(flag, flag))
        return ",".join(map(str, value)) if isinstance(value, tuple) else value

    parts = [f"--{flag}={shown(flag)} (--{selector}={shown(selector)} does not use it)"
             for flag, selector in ignored.items()]
    return (f"{'; '.join(parts)}: {'this setting changes' if len(parts) == 1 else 'these settings change'} "
            "nothing in this run (the flag's help names the kinds that read it).")


def warn_ignored_settings(config):
    """Logs `ignored_settings_warning(config)` (absl WARNING), if any; returns it."""
    from absl import logging

    text = ignored_settings_warning(config)
    if text:
        logging.warning("%s", text)
    return text


def _check_type(field, value):
    if value is None and field.default is None:
        return
    kind = field.type
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise ValueError(f"{field.name} must be of type {kind.__name__}. Received: {field.name}={value!r}")


def _check_run(config, info):
    """Settings that combine components."""
    train_images = config.train_size - config.validation_size
    if config.batch_size > config.train_size:
        raise ValueError(f"batch_size={config.batch_size} is larger than train_size={config.train_size}: pass a "
                         f"--batch_size of at most {config.train_size}, or a larger --train_size.")
    if config.validation_size and config.batch_size > train_images:
        raise ValueError(
            f"validation_size={config.validation_size} leaves fewer than batch_size={config.batch_size} of the "
            f"train_size={config.train_size} images for training.")
    if (config.early_stopping_patience or config.keep_best) and not config.validation_size:
        raise ValueError(
            "early stopping and keep_best select on validation accuracy: set --validation_size (images held "
            "out of the training subset), e.g. --validation_size=500.")
    if config.keep_best and config.ema_decay:
        raise ValueError("keep_best and ema_decay each choose the final weights (best validation snapshot vs. "
                         "the moving average); set one of them.")
    if config.snapshot_ensemble and (config.ema_decay or config.keep_best):
        raise ValueError("snapshot_ensemble keeps the raw weights at each cycle end; it cannot be combined with "
                         "ema_decay or keep_best, which replace the final weights.")
    if config.lookahead and not config.epochs:
        schedule = schedules.learning_rate_schedule(config)
        if schedule.unit != "steps" or not getattr(schedule, "needs_plan", True):
            raise ValueError("lookahead ramps its momentum over the run's planned steps: set --epochs, or a "
                             "step-planned schedule (e.g. --lr_schedule=one_cycle).")
    if not config.evaluate_test and not config.validation_size:
        raise ValueError("evaluate_test=False needs --validation_size: a run must be scored on something.")
    if config.export == "saved_model":
        try:
            import tensorflow  # noqa: F401
        except ImportError:
            raise ValueError("--export=saved_model writes a TensorFlow SavedModel: pip install tensorflow.") from None
    if config.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard.") from None


def _dataclass_field(field):
    default = dataclasses.field(default=field.default, metadata={"field": field})
    return field.name, field.type if field.default is not None else (str | None), default


TrainConfig = dataclasses.make_dataclass(
    "TrainConfig", [_dataclass_field(f) for f in FIELDS.values()], bases=(_Base,), frozen=True)
TrainConfig.__module__ = __name__  # for pickle and repr (make_dataclass takes `module` from Python 3.12)
TrainConfig.__doc__ = (
    "Everything a training run depends on, checked at construction (ValueError naming the value).\n\n"
    "Fields by section (`python -m haet.config` prints defaults and help):\n"
    + "\n".join(f"- {title}: {', '.join(f.name for f in section)}" for title, section in SECTIONS))


def config_from_record(flags, **overrides):
    """The `TrainConfig` of a run record's `flags` dict (lists back to tuples), with
    `overrides` by field name; fields the record lacks take their defaults, names
    this version does not know are dropped.

    Raises:
        ValueError: a value that does not check.
    """
    return TrainConfig(**{**{k: v for k, v in flags.items() if k in FIELDS}, **overrides})


def define_flags(flag_values=None):
    """Defines one absl flag per field (`ALIASES` for the flag names), with the field's
    help and default, parsed by `parse_value`. Idempotent per `flag_values`."""
    flag_values = flags.FLAGS if flag_values is None else flag_values
    for name, field in FIELDS.items():
        flag = flag_name(name)
        if flag in flag_values:
            continue
        if field.type is bool:
            flags.DEFINE_bool(flag, field.default, field.help, flag_values=flag_values)
        else:
            serializer = flags.ListSerializer(",") if field.type is tuple else None
            flags.DEFINE(_FieldParser(field), flag, field.default, field.help, flag_values=flag_values,
                         serializer=serializer)


def config_from_flags(flag_values=None, **overrides):
    """The `TrainConfig` of the parsed flags (and `overrides`, by field name).

    Raises:
        ValueError: a setting that does not check.
    """
    flag_values = flags.FLAGS if flag_values is None else flag_values
    values = {name: flag_values[flag_name(name)].value for name in FIELDS}
    return TrainConfig(**{**values, **overrides})


class _FieldParser(flags.ArgumentParser):
    """absl parser of one field's flag: `parse_value`, errors naming the flag."""

    def __init__(self, field):
        self.field = field

    def parse(self, argument):
        return parse_value(self.field, argument)

    def flag_type(self):
        kind = self.field.type
        return "list" if kind is tuple else kind.__name__


def describe():
    """Every field by section: name (the flag's), default and help, as text."""
    lines = []
    for title, section in SECTIONS:
        lines.append(f"{title}:")
        for f in section:
            default = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
            lines.append(f"  --{flag_name(f.name)}={default}  {f.help}")
    return "\n".join(lines)


def main(argv):
    """`python -m haet.config`: prints `describe()`; it takes no flags or arguments
    of its own (`haet.cli.run` refuses them: exit status 2)."""
    del argv
    print(describe())


if __name__ == "__main__":
    from haet import cli

    cli.run(main)
