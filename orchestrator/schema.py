"""Schema checks shared by the sweep spec's sections: each failure is one line naming the field."""
from __future__ import annotations

import copy
from typing import Any

from trainables.schema import InputError


class SweepError(InputError):
    """A sweep spec is invalid; the message starts with the field, e.g. ``sweep.axes.heads:``."""


def check_fields(raw: Any, schema: dict, where: str) -> dict:
    """``raw`` checked against ``{key: (allowed types, default)}`` (a default of ``...`` marks a required
    key); unknown keys and wrong types raise SweepError. Returns the values with defaults filled in."""
    if not isinstance(raw, dict):
        raise SweepError(f"{where}: must be a mapping")
    for key in raw:
        if key not in schema:
            raise SweepError(f"{where}.{key}: unknown key (known: {', '.join(schema)})")
    out = {}
    for key, (types, default) in schema.items():
        if key not in raw:
            if default is ...:
                raise SweepError(f"{where}.{key}: required")
            out[key] = copy.deepcopy(default)
            continue
        value = raw[key]
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise SweepError(f"{where}.{key}: must be {names}, got {value!r}")
        out[key] = value
    return out


def check_choice(value: str, choices: tuple[str, ...], where: str) -> str:
    if value not in choices:
        raise SweepError(f"{where}: must be one of {', '.join(choices)}, got {value!r}")
    return value


def check_positive(value: float, where: str, strict: bool) -> None:
    if value < 0 or (strict and value == 0):
        raise SweepError(f"{where}: must be {'> 0' if strict else '>= 0'}, got {value}")


def check_min(value: int | None, low: int, where: str) -> None:
    """An optional integer that must be at least ``low``."""
    if value is not None and value < low:
        raise SweepError(f"{where}: must be >= {low}, got {value}")
