"""The number grammar of settings: ``"0.5"``, ``"1e-3"``, fractions like ``"4/255"``.

One grammar for presets, the command line and the attack registry's ``Param.parse``;
a leaf module (it imports nothing of advtune but the error type), so the registry does
not import :mod:`advtune.presets` upwards.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from advtune.errors import UserError

__all__ = ["NUMBER_RE", "parse_int", "parse_number", "parse_number_list", "parse_value"]

_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
NUMBER_RE = re.compile(rf"^\s*({_NUMBER})\s*(?:/\s*({_NUMBER})\s*)?$")


def parse_number(value: str | float, *, what: str = "number") -> float:
    """Parse ``"0.5"``, ``"1e-3"`` or a fraction like ``"4/255"`` into a finite float.

    Raises:
        UserError: naming the value when it is not a finite number.
    """
    if isinstance(value, bool):
        raise UserError(f"invalid {what} {value!r}: expected a number")
    if isinstance(value, (int, float)):
        result = float(value)
    else:
        match = NUMBER_RE.match(str(value))
        if not match:
            raise UserError(f"invalid {what} {value!r}: expected a number like 0.5 or 4/255")
        result = float(match.group(1))
        if match.group(2) is not None:
            denominator = float(match.group(2))
            if denominator == 0:
                raise UserError(f"invalid {what} {value!r}: division by zero")
            result /= denominator
    if not math.isfinite(result):
        raise UserError(f"invalid {what} {value!r}: not a finite number")
    return result


def parse_int(value: str | int, *, what: str = "integer") -> int:
    """Parse an integer; fractions and floats are accepted when they are whole (``"20/2"``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    number = parse_number(value, what=what)
    if number != int(number):
        raise UserError(f"invalid {what} {value!r}: expected a whole number")
    return int(number)


def parse_number_list(value: str | float | Sequence[Any], *, what: str = "number") -> list[float]:
    """Parse ``"1/255,2/255,4/255"`` (or a number, or a list) into a list of floats."""
    if isinstance(value, (list, tuple)):
        items = list(value)
    elif isinstance(value, str):
        items = [part for part in value.split(",")]
    else:
        items = [value]
    if not items or any(isinstance(i, str) and not i.strip() for i in items):
        raise UserError(f"invalid {what} list {value!r}: empty item")
    return [parse_number(item, what=what) for item in items]


def parse_value(text: str) -> Any:
    """Type a ``--param KEY=VALUE`` value: int, float (fractions too), bool, None or str."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    if re.fullmatch(r"[+-]?\d+", text.strip()):
        return int(text)
    if NUMBER_RE.match(text):
        return parse_number(text)
    return text
