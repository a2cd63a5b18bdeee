"""The pieces a run's settings are made of, shared by every component module.

- `Field`: one setting (name, default, help text with its unit, an optional check of
  its value). Each component module (`haet.data`, `haet.models`, `haet.augment`,
  `haet.schedules`, `haet.optimizers`, `haet.evaluation`) declares the fields it
  reads in a tuple `FIELDS`; `haet.config` assembles them into `TrainConfig` and
  generates the command-line flags from them.
- `Kind`: one entry of a component table (`MODELS`, `AUGMENTATIONS`,
  `LR_SCHEDULES`, `OPTIMIZERS`...): the function that builds it, the config fields
  it takes as keyword arguments, and the check of a config that selects it.

So a new model, schedule or augmentation is a function and a table entry (with
any new fields) in its module, plus a flagfile: nothing else changes.
"""

import dataclasses
import math
import numbers
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class Field:
    """One setting of a run.

    Attributes:
        name: the config attribute (also the flag name, unless `haet.config.ALIASES`
            gives the flag another one).
        default: the default value; its type is the field's type (a tuple is a
            list setting whose elements have type `item_type`; None means a string
            that may be unset).
        help: what it does, with its unit (seconds, pixels, degrees, fraction...).
        check: optional `check(value, name)` raising ValueError for a bad value.
        item_type: element type of a tuple field (default: the type of the
            default's first element, else str).
    """

    name: str
    default: object
    help: str
    check: Callable | None = None
    item_type: type | None = None

    @property
    def type(self):
        """The Python type of the value: bool, int, float, str or tuple."""
        return str if self.default is None else type(self.default)

    @property
    def element_type(self):
        if self.item_type is not None:
            return self.item_type
        return type(self.default[0]) if self.default else str


@dataclasses.dataclass(frozen=True)
class Kind:
    """One entry of a component table.

    Attributes:
        build: the function that builds it (a model, a layer, a schedule...).
        args: names of config fields passed to `build` as keyword arguments.
        check: optional `check(config)` raising ValueError when the config cannot
            use this kind as set (e.g. a width the model cannot take); an
            augmentation's check also takes the dataset's image shape.
        help: one line shown in the flag's help.
        uses: the config fields this kind reads, where fewer than `args` (a builder
            shared by several kinds takes fields only some of them read); None: `args`.
    """

    build: Callable
    args: tuple = ()
    check: Callable | None = None
    help: str = ""
    uses: tuple | None = None

    @property
    def fields_used(self):
        """The config fields this kind reads (`uses`, else `args`)."""
        return self.args if self.uses is None else self.uses


def choose(table, what, name):
    """The `Kind` named `name` in `table` (or `name`, when `table` is a tuple of names).

    Raises:
        ValueError: `Unknown {what} {name!r}. Allowed: ...`.
    """
    if name not in table:
        raise ValueError(f"Unknown {what} {name!r}. Allowed: {', '.join(table)}.")
    return table[name] if isinstance(table, dict) else name


def build(table, what, name, config, **extra):
    """Calls the builder of `table[name]` with the config fields it takes and `extra`."""
    kind = choose(table, what, name)
    return kind.build(**{arg: getattr(config, arg) for arg in kind.args}, **extra)


def ignored_settings(config, tables, defaults, read_elsewhere=()):
    """The settings of `config` that change nothing: a value other than its default
    in a field that some kind of `tables` reads but none of the kinds `config`
    chooses does (e.g. `momentum` with `optimizer=adam`).

    Args:
        config: the run's config.
        tables: `(table, selector)` pairs, `selector` the config field naming the
            kind (e.g. `(OPTIMIZERS, "optimizer")`).
        defaults: field name -> default value.
        read_elsewhere: fields read outside the tables whatever the kinds (never ignored).

    Returns:
        dict field name -> the selector whose choice does not read it (e.g.
        "optimizer"), in the order of `defaults`.
    """
    chosen = {selector: table[getattr(config, selector)] for table, selector in tables}
    read = set().union(*(kind.fields_used for kind in chosen.values()), read_elsewhere)
    ignored = {}
    for table, selector in tables:
        for name in set().union(*(kind.fields_used for kind in table.values())) - read:
            if getattr(config, name) != defaults[name]:
                ignored.setdefault(name, selector)
    return {name: ignored[name] for name in defaults if name in ignored}


def table_help(table):
    """`name (help), name (help)...` of a table, for a flag's help text."""
    return "; ".join(f"{name}: {kind.help}" if kind.help else name for name, kind in table.items())


# Value checks for `Field.check`: each returns `check(value, name)`.
def is_number(value):
    """Whether `value` is a finite real number (not a bool): an int or float, or a
    NumPy integer or floating scalar (what arrays and NumPy arithmetic give)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def at_least(low, integer=False, unit=""):
    """A check that the value is a number >= `low` (an integer if `integer`)."""
    what = "an integer" if integer else "a number"

    def check(value, name):
        if not (is_number(value) and value >= low and (not integer or isinstance(value, numbers.Integral))):
            raise ValueError(f"{name} must be {what} >= {low:g}{unit}. Received: {name}={value!r}")

    return check


def positive(integer=False, unit=""):
    """A check that the value is a number > 0 (an integer if `integer`)."""
    what = "a positive integer" if integer else "a positive number"

    def check(value, name):
        if not (is_number(value) and value > 0 and (not integer or isinstance(value, numbers.Integral))):
            raise ValueError(f"{name} must be {what}{unit}. Received: {name}={value!r}")

    return check


def in_range(low, high, high_open=False, unit=""):
    """A check that the value is a number in [low, high] (or [low, high))."""
    bracket = ")" if high_open else "]"

    def check(value, name):
        ok = is_number(value) and low <= value and (value < high if high_open else value <= high)
        if not ok:
            raise ValueError(f"{name} must be in [{low:g}, {high:g}{bracket}{unit}. Received: {name}={value!r}")

    return check


def one_of(table_or_names, what=None):
    """A check that the value is a key of a table (or one of the names)."""

    def check(value, name):
        choose(table_or_names, what or name, value)

    return check
