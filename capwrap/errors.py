"""Errors raised by capwrap.

Every error names the problem and the fix. They all derive from :class:`CapwrapError`, and
also from the closest built-in exception (``ValueError``, ``FileNotFoundError``, ...) so code
that already catches those keeps working.

Examples:
    >>> from capwrap.errors import closest_matches
    >>> closest_matches("blocks.0.hook_resid_pots", ["blocks.0.hook_resid_post", "hook_embed"])
    ['blocks.0.hook_resid_post']
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

__all__ = [
    "CapwrapError",
    "CapwrapWarning",
    "ConfigError",
    "HookNameError",
    "CheckpointError",
    "StoreError",
    "TrainingDivergedError",
    "as_list",
    "check_fields",
    "closest_matches",
    "whole_number",
    "real_number",
    "lookup",
]

V = TypeVar("V")


class CapwrapError(Exception):
    """Base class of every error capwrap raises on purpose."""


class CapwrapWarning(UserWarning):
    """Something capwrap did as asked but that is likely not what was meant (an adapter merged into
    another base than the one it names); the command line prints it as ``capwrap: warning: ...``."""


class ConfigError(CapwrapError, ValueError):
    """An argument or configuration value is invalid."""


class HookNameError(ConfigError):
    """A hook name or pattern matches no hook point of the model."""


class CheckpointError(CapwrapError, OSError):
    """A checkpoint is missing, corrupt, unsafe to load, or of an unsupported kind."""


class StoreError(CapwrapError, OSError):
    """A :class:`~capwrap.recording.RunStore` cannot be created, opened or appended to."""


class TrainingDivergedError(CapwrapError, RuntimeError):
    """The loss became NaN or infinite; ``step`` says at which optimizer step."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


def closest_matches(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The ``n`` entries of ``choices`` that look most like ``name`` (for "did you mean")."""
    return difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)


def lookup(mapping: Mapping[str, V], name: str, missing: str, otherwise: str) -> V:
    """``mapping[name]``; a missing ``name`` raises a :class:`ConfigError` that says ``missing`` and
    then the closest names ("did you mean"), or ``otherwise`` when none is close.

    Examples:
        >>> lookup({"L0H1": 1}, "L0H1", "no head", "")
        1
        >>> lookup({"L0H1": 1, "L1H0": 2}, "L0H2", "no head 'L0H2'", "heads look like 'L0H1'")
        Traceback (most recent call last):
        ...
        capwrap.errors.ConfigError: no head 'L0H2'; did you mean ['L0H1', 'L1H0']?
    """
    try:
        return mapping[name]
    except KeyError:
        hint = closest_matches(name, mapping)
        raise ConfigError(missing + (f"; did you mean {hint}?" if hint else f"; {otherwise}")) from None


def whole_number(value: Any, what: str, minimum: int = 0) -> int:
    """``value`` as an ``int`` (NumPy and torch integers included; ``bool`` and floats refused), at
    least ``minimum``, or a :class:`ConfigError` that names ``what`` it should be.

    Examples:
        >>> import numpy as np
        >>> whole_number(np.int64(5), "n")
        5
        >>> whole_number(2.5, "top_n", minimum=1)
        Traceback (most recent call last):
        ...
        capwrap.errors.ConfigError: top_n must be a whole number >= 1, got 2.5
    """
    import operator

    try:
        number = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        number = None
    if number is None or number < minimum:
        raise ConfigError(f"{what} must be a whole number >= {minimum}, got {value!r}")
    return number


def real_number(
    value: Any,
    what: str,
    minimum: float | None = None,
    below: float | None = None,
    hint: str = "",
    above: float | None = None,
) -> float:
    """``value`` as a ``float`` (NumPy floats and integers included; ``bool``, tensors, strings and
    NaN or infinite values refused), at least ``minimum``, more than ``above`` and less than
    ``below`` where given, or a :class:`ConfigError` ``"{what} must be ..., got {value!r}{hint}"``.

    Examples:
        >>> real_number(1, "retain_weight", minimum=0)
        1.0
        >>> real_number(float("nan"), "retain_weight", minimum=0)
        Traceback (most recent call last):
        ...
        capwrap.errors.ConfigError: retain_weight must be a finite number >= 0, got nan
        >>> real_number(True, "momentum", minimum=0, below=1, hint="; 0.9 is usual")
        Traceback (most recent call last):
        ...
        capwrap.errors.ConfigError: momentum must be a number in [0, 1), got True; 0.9 is usual
        >>> real_number(0, "NPO's beta", above=0)
        Traceback (most recent call last):
        ...
        capwrap.errors.ConfigError: NPO's beta must be a finite number > 0, got 0
    """
    if minimum is not None and above is not None:
        raise ValueError("real_number takes minimum (inclusive) or above (exclusive), not both")
    number = isinstance(value, numbers.Real) and not isinstance(value, bool) and _finite(value)
    if not (
        number
        and (minimum is None or value >= minimum)
        and (above is None or value > above)
        and (below is None or value < below)
    ):
        raise ConfigError(f"{what} must be {_real_range(minimum, below, above)}, got {value!r}{hint}")
    return float(value)


def _finite(value: numbers.Real) -> bool:
    """Whether ``value`` is finite as a float (an int too large for one is not)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _real_range(minimum: float | None, below: float | None, above: float | None = None) -> str:
    """What :func:`real_number` asks for, in words: ``a number in [0, 1)``, ``a finite number >= 0``,
    ``a number in (0, 1)``, ``a finite number > 0``."""
    opening = "[" if minimum is not None else "("
    low = minimum if minimum is not None else above
    if low is not None and below is not None:
        return f"a number in {opening}{low}, {below})"
    if below is not None:
        return f"a finite number < {below}"
    if low is None:
        return "a finite number"
    return f"a finite number {'>=' if minimum is not None else '>'} {low}"


def as_list(value: Any, what: str, hint: str = "") -> list[Any]:
    """``value``'s items as a list, or a :class:`ConfigError` ``"{what}, got {value!r}{hint}"`` where one
    value (a number, a string, an object) stands where a list of them is wanted.

    Examples:
        >>> as_list((0, 5), "ks is a list of unit counts")
        [0, 5]
        >>> as_list(5, "ks is a list of unit counts")
        Traceback (most recent call last):
        ...
        capwrap.errors.ConfigError: ks is a list of unit counts, got 5
    """
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ConfigError(f"{what}, got {value!r}{hint}")
    return list(value)


def check_fields(cls: type, data: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` if ``data`` (a dict read back into the dataclass ``cls``, e.g. from
    a JSON file a user edited) has fields ``cls`` does not, naming them and the valid ones, or a
    value of another type than its field's (a number, a whole number, true/false, a string, one of a
    ``Literal``'s values; fields of other types are left to ``cls``).

    Examples:
        >>> import dataclasses
        >>> Point = dataclasses.make_dataclass("Point", [("x", float), ("y", float)])
        >>> check_fields(Point, {"x": 1, "z": 2})
        Traceback (most recent call last):
        ...
        capwrap.errors.ConfigError: unknown Point fields ['z']; valid fields: ['x', 'y']
        >>> check_fields(Point, {"x": "0.5"})
        Traceback (most recent call last):
        ...
        capwrap.errors.ConfigError: Point field 'x' must be a number, got '0.5' (a str)
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{cls.__name__}: expected an object of fields, got {data!r} (a {type(data).__name__})")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields {unknown}; valid fields: {sorted(known)}")
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):  # annotations that cannot be resolved here: names only
        return
    for name, value in data.items():
        wanted = _unmet_type(hints.get(name, Any), value)
        if wanted is not None:
            raise ConfigError(
                f"{cls.__name__} field {name!r} must be {wanted}, got {value!r} (a {type(value).__name__})"
            )


#: What a value of a simple field type must be, in words, and the check.
_SIMPLE_TYPES: dict[Any, tuple[str, Callable[[Any], bool]]] = {
    float: ("a number", lambda v: isinstance(v, int | float) and not isinstance(v, bool)),
    int: ("a whole number", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    bool: ("true or false", lambda v: isinstance(v, bool)),
    str: ("a string", lambda v: isinstance(v, str)),
    type(None): ("null", lambda v: v is None),
}


def _unmet_type(annotation: Any, value: Any) -> str | None:
    """What ``value`` should be to fit ``annotation`` (in words), or None if it fits or the
    annotation is not a simple one (:data:`_SIMPLE_TYPES`, ``Literal``, unions of them)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        options = typing.get_args(annotation)
        return None if value in options else f"one of {list(options)}"
    if origin in (typing.Union, types.UnionType):
        wants = [_unmet_type(arg, value) for arg in typing.get_args(annotation)]
        return None if None in wants else " or ".join(wants)  # type: ignore[arg-type]
    if annotation in _SIMPLE_TYPES:
        words, fits = _SIMPLE_TYPES[annotation]
        return None if fits(value) else words
    return None
