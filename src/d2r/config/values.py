"""One value of a config: "8/255" and other numbers parsed, eps shown, `--set` text read, and a
value coerced to its field's type and range, or a one-line ValueError naming the key."""

from __future__ import annotations

import dataclasses
import math
import re
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml

_FRACTION = re.compile(r"^\s*([0-9.eE+-]+)\s*/\s*([0-9.eE+-]+)\s*$")


def parse_number(text: str) -> float:
    """'8/255' -> 0.0313..., '0.031' -> 0.031; ValueError otherwise."""
    match = _FRACTION.match(text)
    if match:
        num, den = float(match.group(1)), float(match.group(2))
        if den == 0:
            raise ValueError(f"{text!r}: division by zero")
        return num / den
    return float(text)


def format_eps(eps: float | None) -> str:
    """The inverse of parse_number for radii: the decimal where four digits give the number
    back (0.031, 0.2, 1: never "51/255" or "255/255"), else k/255 for eps that are one (8/255,
    to 1e-6), else four digits; "—" when there is none."""
    if eps is None:
        return "—"
    text, k = f"{eps:.4g}", round(eps * 255)
    if float(text) == eps or not (k and abs(eps - k / 255) < 1e-6):
        return text
    return f"{k}/255"


def parse_value(text: str) -> Any:
    """A `--set` value: YAML scalars/lists ('3', 'true', '[1, 2]', 'null') or a fraction '8/255'."""
    if _FRACTION.match(text):
        try:
            return parse_number(text)
        except ValueError:  # '1/0', './.': left as text, so the error names the key
            return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def coerce(key: str, value: Any, like: Any) -> Any:
    """Convert `value` to the type of the default `like`, or raise a one-line error. null is
    only valid where the default is None (an optional setting)."""
    if like is None:
        return value
    if value is None:
        raise ValueError(f"config key {key!r}: expected {type(like).__name__}, got null")
    if isinstance(value, str) and isinstance(like, (int, float)) and not isinstance(like, bool):
        try:
            value = parse_number(value)
        except ValueError:
            raise ValueError(f"config key {key!r}: expected a number, got {value!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"config key {key!r}: must be a finite number, got {value}")
    if isinstance(like, bool):
        if not isinstance(value, bool):
            raise ValueError(f"config key {key!r}: expected true or false, got {value!r}")
        return value
    if isinstance(like, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(like, int) and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(like, list) and isinstance(value, tuple):
        value = list(value)
    if type(value) is not type(like):
        raise ValueError(
            f"config key {key!r}: expected {type(like).__name__}, got {type(value).__name__} "
            f"{value!r}"
        )
    if isinstance(like, list) and like:  # e.g. train.decay_at: each item as the example's
        value = [coerce(f"{key}[{i}]", v, like[0]) for i, v in enumerate(value)]
    return value


def _check_finite(key: str, value: Any) -> None:
    """nan/inf would only surface as a NaN loss hours later: refused in every option, lists too."""
    if isinstance(value, list):
        for item in value:
            _check_finite(key, item)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"config key {key!r}: must be a finite number, got {value}")


def _check_field(key: str, f: dataclasses.Field, hint: Any, value: Any) -> None:
    """A section field's range (from `_num`) and choices (from a Literal annotation)."""
    _check_finite(key, value)
    choices = _literal_choices(hint)
    if choices and not isinstance(value, bool) and value not in choices:
        raise ValueError(f"config key {key!r}: choose one of {', '.join(choices)}, got {value!r}")
    if not f.metadata.get("range") or value is None:
        return
    below = f.metadata["below"]
    for v in value if isinstance(value, list) else [value]:
        if f.metadata["positive"] and v <= 0:
            raise ValueError(f"config key {key!r}: must be > 0, got {v}")
        if v < 0:
            raise ValueError(f"config key {key!r}: must be >= 0, got {v}")
        if below is not None and v >= below:
            raise ValueError(f"config key {key!r}: must be < {below:g}, got {v}")


def _literal_choices(hint: Any) -> tuple[Any, ...]:
    union = get_origin(hint) in (Union, UnionType)
    literals = [a for a in (get_args(hint) if union else (hint,)) if get_origin(a) is Literal]
    return tuple(c for lit in literals for c in get_args(lit))


def _typed(key: str, value: Any, hint: Any) -> Any:
    """`value` converted to the annotated type `hint` (int, float, str, bool, list[float], a
    Literal of strings, or a union of those with None), or a one-line error."""
    options = get_args(hint) if get_origin(hint) in (Union, UnionType) else (hint,)
    if value is None and type(None) in options:  # an optional setting switched off
        return None
    kinds = [o for o in options if o is not type(None)]
    if isinstance(value, bool) and bool in kinds:  # "auto"-or-switch fields take true/false
        return value
    return coerce(key, value, _example(kinds[0]))


def _example(kind: Any) -> Any:
    """A value of the annotated type, for `coerce` (which converts to the type of an example)."""
    if get_origin(kind) is Literal:
        return get_args(kind)[0]
    if get_origin(kind) is list:
        return [_example(get_args(kind)[0])]
    return kind()
