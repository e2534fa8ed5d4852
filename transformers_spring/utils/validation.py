"""Argument checks shared by the whole package: one helper per kind of check, so that the same mistake gets the same
error everywhere.

The rule every helper follows:

- a value of the **wrong type** (a str where an int belongs, a bool where a number belongs, ...) raises `TypeError`
  naming the field;
- a value of the **right type but out of range** (0 where an int >= 1 belongs, NaN, a string that is not one of the
  choices) raises `ValueError` naming the field.

Messages read "`top_k` must be an int >= 1, got 0." (the value for a `ValueError`, the type for a `TypeError`), so a
caller can match on the field's name. Bools are never numbers here: `True` is an `int` to Python, but `top_k=True` is
a mistake. NumPy scalars are accepted (they are registered with `numbers`) and returned as plain Python values, so
checked settings serialise to JSON.

This module imports only the standard library: low-level modules (`records`, `memory`, `persistence`) import it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection
from typing import Any


def _is_bool(value: Any) -> bool:
    # A NumPy bool scalar (`np.bool_`) is no subclass of bool; recognised by its dtype so that numpy need not load.
    if isinstance(value, bool):
        return True
    dtype = getattr(value, "dtype", None)
    return getattr(dtype, "kind", None) == "b" and getattr(value, "ndim", None) == 0


def _fmt(bound: float) -> str:
    # 1.0 reads as 1 in a range ("in [0, 1]"), as the messages always did.
    return str(int(bound)) if float(bound).is_integer() else str(bound)


def _range(minimum: float | None, maximum: float | None, min_inclusive: bool, max_inclusive: bool) -> str:
    if minimum is not None and maximum is not None:
        return f" in {'[' if min_inclusive else '('}{_fmt(minimum)}, {_fmt(maximum)}{']' if max_inclusive else ')'}"
    if minimum is not None:
        return f" {'>=' if min_inclusive else '>'} {_fmt(minimum)}"
    if maximum is not None:
        return f" {'<=' if max_inclusive else '<'} {_fmt(maximum)}"
    return ""


def _expected(kind: str, bounds: str, optional: bool, hint: str | None) -> str:
    return f"{kind}{bounds}{' or None' if optional else ''}{f' ({hint})' if hint else ''}"


def check_int(
    value: Any,
    name: str,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    optional: bool = False,
    hint: str | None = None,
) -> int | None:
    """Validates an int in `[minimum, maximum]` (either bound may be left open).

    Args:
        value (`Any`): the value to check.
        name (`str`): the field's name, for the message.
        minimum (`int`, *optional*): the smallest accepted value.
        maximum (`int`, *optional*): the largest accepted value.
        optional (`bool`, *optional*, defaults to `False`): whether None passes (and is returned).
        hint (`str`, *optional*): a note for the message, e.g. `"0 disables it"`.

    Returns:
        `int` or `None`: the value as a Python int.

    Raises:
        `TypeError`: not an int (a bool, a float such as `2.0`, a str ...).
        `ValueError`: an int out of range.
    """
    if optional and value is None:
        return None
    expected = _expected("an int", _range(minimum, maximum, True, True), optional, hint)
    if _is_bool(value) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be {expected}, got {type(value).__name__}.")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"`{name}` must be {expected}, got {value!r}.")
    return value


def check_float(
    value: Any,
    name: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    min_inclusive: bool = True,
    max_inclusive: bool = True,
    finite: bool = True,
    optional: bool = False,
    hint: str | None = None,
) -> float | None:
    """Validates a real number (an int is accepted, a bool is not) in a range.

    Args:
        value (`Any`): the value to check.
        name (`str`): the field's name, for the message.
        minimum (`float`, *optional*): the lower bound.
        maximum (`float`, *optional*): the upper bound.
        min_inclusive (`bool`, *optional*, defaults to `True`): whether `minimum` itself passes.
        max_inclusive (`bool`, *optional*, defaults to `True`): whether `maximum` itself passes.
        finite (`bool`, *optional*, defaults to `True`): whether NaN and ±inf are refused (NaN always fails a bound).
        optional (`bool`, *optional*, defaults to `False`): whether None passes (and is returned).
        hint (`str`, *optional*): a note for the message.

    Returns:
        `float` or `None`: the value as a Python float.

    Raises:
        `TypeError`: not a real number (a bool, a str, None when not `optional` ...).
        `ValueError`: a number out of range, or not finite when `finite`.
    """
    if optional and value is None:
        return None
    kind = "a finite float" if finite else "a float"
    expected = _expected(kind, _range(minimum, maximum, min_inclusive, max_inclusive), optional, hint)
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be {expected}, got {type(value).__name__}.")
    value = float(value)
    too_low = minimum is not None and not (value >= minimum if min_inclusive else value > minimum)
    too_high = maximum is not None and not (value <= maximum if max_inclusive else value < maximum)
    if too_low or too_high or (finite and not math.isfinite(value)):
        raise ValueError(f"`{name}` must be {expected}, got {value!r}.")
    return value


def check_bool(value: Any, name: str, optional: bool = False) -> bool | None:
    """Validates a real bool: `"no"`, `0` or `1` are not bools (`"false"` would read as true).

    Args:
        value (`Any`): the value to check.
        name (`str`): the field's name, for the message.
        optional (`bool`, *optional*, defaults to `False`): whether None passes (and is returned).

    Returns:
        `bool` or `None`: the value as a Python bool (a NumPy bool is converted).

    Raises:
        `TypeError`: anything but a bool.
    """
    if optional and value is None:
        return None
    if not _is_bool(value):
        raise TypeError(f"`{name}` must be a bool{' or None' if optional else ''}, got {type(value).__name__}.")
    return bool(value)


def check_choice(value: Any, name: str, choices: Collection[Any]) -> Any:
    """Validates one of a fixed set of values (e.g. a mode name).

    Args:
        value (`Any`): the value to check.
        name (`str`): the field's name, for the message.
        choices (`Collection`): the accepted values (typically strings; None may be one of them).

    Returns:
        The value.

    Raises:
        `TypeError`: a value of a type none of the choices has (`3` where a mode name belongs).
        `ValueError`: a value of the right type that is not one of the choices.
    """
    choices = tuple(choices)
    if not any(isinstance(value, type(choice)) for choice in choices):
        raise TypeError(f"`{name}` must be one of {choices}, got {type(value).__name__}.")
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")
    return value
