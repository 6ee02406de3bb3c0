"""Declarative checks of options and settings, run before any work (scikit-learn's parameter
constraints, in small).

Each settings class (or command) writes its rules once, as data::

    CONSTRAINTS = {"batch_size": Interval(int, 1), "guidance": Interval(float, 0), "mode": OneOf("a", "b")}

and :func:`check_values` raises one :class:`~havir.errors.InvalidInputError` naming the first
value that breaks its rule, what was expected, what arrived and where to fix it. Numbers are
refused when NaN or infinite (``float("nan")`` passes every comparison-based range check, which
is how ``--guidance nan`` once wrote black images), and booleans are not integers here.

The readers :func:`read_json` and :func:`reading_hdf5` do the same for files HAVIR wrote: a
missing, damaged, non-UTF-8 or incomplete file is one line naming it and the command to rerun.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path
from typing import TYPE_CHECKING, Any

from havir.errors import HavirError, InvalidInputError, MissingInputError

if TYPE_CHECKING:
    import h5py


@dataclass(frozen=True)
class Interval:
    """A finite number of ``kind`` (``int``; or ``float``, which takes whole numbers too, as
    TOML's ``learning_rate = 1`` is one) between ``low`` and ``high``.

    Either bound may be ``None`` (unbounded); ``closed`` says which bounds are allowed values:
    ``"both"``, ``"left"``, ``"right"`` or ``"neither"``. ``optional`` also allows ``None``
    (an option left unset).
    """

    kind: type
    low: float | None = None
    high: float | None = None
    closed: str = "both"
    optional: bool = False

    def allows(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(value, Integral if self.kind is int else Real):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (value == self.low and self.closed in ("right", "neither"))):
            return False
        if self.high is not None and (value > self.high or (value == self.high and self.closed in ("left", "neither"))):
            return False
        return True

    def __str__(self) -> str:
        what = "a whole number" if self.kind is int else "a finite number"
        low_op = ">=" if self.closed in ("both", "left") else ">"
        high_op = "<=" if self.closed in ("both", "right") else "<"
        if self.low is not None and self.high is not None:
            left, right = ("[" if low_op == ">=" else "("), ("]" if high_op == "<=" else ")")
            bounds = f" in {left}{self.low:g}, {self.high:g}{right}"
        elif self.low is not None:
            bounds = f" {low_op} {self.low:g}"
        elif self.high is not None:
            bounds = f" {high_op} {self.high:g}"
        else:
            bounds = ""
        return what + bounds + (" (or unset)" if self.optional else "")


@dataclass(frozen=True)
class OneOf:
    """One of a fixed set of choices (compared with ``==``)."""

    choices: tuple

    def __init__(self, *choices):
        object.__setattr__(self, "choices", tuple(choices))

    def allows(self, value: Any) -> bool:
        return any(type(value) is type(choice) and value == choice for choice in self.choices)

    def __str__(self) -> str:
        return "one of " + ", ".join(str(choice) for choice in self.choices)


@dataclass(frozen=True)
class ListOf:
    """A non-empty list whose every item satisfies ``item``."""

    item: Interval | OneOf

    def allows(self, value: Any) -> bool:
        return isinstance(value, (list, tuple)) and len(value) > 0 and all(self.item.allows(v) for v in value)

    def __str__(self) -> str:
        return f"a non-empty list of {self.item}"


@dataclass(frozen=True)
class AnyOf:
    """A value that any of ``rules`` allows (``"full"`` or a positive integer)."""

    rules: tuple

    def __init__(self, *rules):
        object.__setattr__(self, "rules", tuple(rules))

    def allows(self, value: Any) -> bool:
        return any(rule.allows(value) for rule in self.rules)

    def __str__(self) -> str:
        return " or ".join(str(rule) for rule in self.rules)


@dataclass(frozen=True)
class KeyOf:
    """A name in ``registry`` (a dict that may grow after this rule is made: a decoder class
    registered later is allowed too)."""

    registry: Mapping[str, Any]

    def allows(self, value: Any) -> bool:
        return isinstance(value, str) and value in self.registry

    def __str__(self) -> str:
        return "one of " + ", ".join(self.registry)


@dataclass(frozen=True)
class Matches:
    """A string that the regular expression ``pattern`` matches whole; ``shown`` says it in words."""

    pattern: str
    shown: str

    def allows(self, value: Any) -> bool:
        return isinstance(value, str) and re.fullmatch(self.pattern, value) is not None

    def __str__(self) -> str:
        return self.shown


Rule = Interval | OneOf | ListOf | AnyOf | KeyOf | Matches


def check_values(
    values: Mapping[str, Any],
    constraints: Mapping[str, Rule],
    *,
    name: Callable[[str], str] = str,
    fix: str = "",
) -> None:
    """Raise :class:`InvalidInputError` for the first of ``values`` that breaks its rule.

    Parameters
    ----------
    values : setting name -> value; names without a rule are not checked.
    constraints : setting name -> rule.
    name : how the user wrote the setting (``"batch_size"`` -> ``"--batch-size"`` for an option).
    fix : where to change it, appended to the message (e.g. ``"fix it in config.toml"``).
    """
    for key, rule in constraints.items():
        if key in values and not rule.allows(values[key]):
            raise InvalidInputError(
                f"{name(key)} must be {rule}, got {values[key]!r}" + (f": {fix}" if fix else "")
            )


def option_name(key: str) -> str:
    """The command-line spelling of a setting: ``"text_share"`` -> ``"--text-share"``."""
    return "--" + key.replace("_", "-")


def check_options(constraints: Mapping[str, Rule], **values: Any) -> None:
    """Check a command's options by their keyword names, reporting them as ``--option-name``."""
    check_values(values, constraints, name=option_name)


def read_json(path: Path, *, what: str, fix: str, keys: tuple[str, ...] = ()) -> dict:
    """Read a JSON object that HAVIR wrote (a run record, a prepared subject's record...).

    Every way the file can be wrong (missing, not UTF-8, not JSON, not an object, lacking one of
    ``keys``) is one :class:`~havir.errors.HavirError` naming ``what``, the file and ``fix``.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{what} not found: {path}: {fix}")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise InvalidInputError(f"{what} {path} is not UTF-8 text (byte {err.start}): {fix}") from err
    except json.JSONDecodeError as err:
        raise InvalidInputError(f"{what} {path} is not valid JSON ({err.msg} at line {err.lineno}): {fix}") from err
    if not isinstance(data, dict):
        raise InvalidInputError(f"{what} {path} holds a JSON {type(data).__name__}, not an object: {fix}")
    missing = [key for key in keys if key not in data]
    if missing:
        raise InvalidInputError(f"{what} {path} lacks the keys {', '.join(missing)}: {fix}")
    return data


@contextmanager
def reading_hdf5(path: Path, *, what: str, fix: str) -> Iterator[h5py.File]:
    """Open an HDF5 file for reading; a damaged file, or a dataset or attribute missing from it
    (h5py's ``OSError`` and ``KeyError``, raised at open or inside the block), becomes one
    :class:`~havir.errors.InvalidInputError` naming ``what``, the file and ``fix``."""
    import h5py  # here: the command line imports this module, and h5py takes 0.15 s

    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{what} not found: {path}: {fix}")
    try:
        with h5py.File(path, "r") as h5:
            yield h5
    except KeyError as err:
        reason = str(err.args[0]) if err.args else "a missing key"
        raise InvalidInputError(f"{what} {path} lacks {reason}: {fix}") from err
    except OSError as err:
        if isinstance(err, HavirError):
            raise
        raise InvalidInputError(f"{what} {path} is damaged or not HDF5 ({err}): {fix}") from err
