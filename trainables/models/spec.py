"""Model specs: the registry of model families, the field checks they share, and `resolve_family_spec`.

Each built-in family's file (cct.py, vgg.py, efficientnet.py) declares its defaults, presets, checks
and model class next to the model and registers them (`register_family`); a new preset is one entry
in its family's `PRESETS`. A spec is a plain JSON-serialisable dict. `resolve_family_spec` expands
`{"preset": NAME, **overrides}` or `{"family": NAME, ...}` into a complete spec (`resolve_spec` in
`models/__init__.py` sends `{"factory": ...}` and `{"torchvision": ...}` specs to external.py) and checks every field, so a bad value fails with one
line naming the field (`model.heads: must be >= 1, got 0`) before any tensor is allocated.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from trainables.schema import InputError


class SpecError(InputError):
    """A model spec is invalid; the message starts with the offending field, e.g. `model.heads:`."""


@dataclass(frozen=True)
class TapInfo:
    """What a tap holds: `conv` maps (B, C, H, W) or `token` sequences (B, N, D).

    `heads` / `head_dim` are set for per-head attention outputs (D = heads * head_dim, head-major).
    """

    kind: str
    heads: int | None = None
    head_dim: int | None = None


@dataclass(frozen=True)
class Family:
    """A model family: its defaults (every key a spec may set), named presets (overrides of the
    defaults), the check that completes and validates a spec in place, and the model class."""

    name: str
    defaults: dict[str, Any]
    presets: dict[str, dict[str, Any]]
    validate: Callable[[dict[str, Any]], None]
    model: type


FAMILIES: dict[str, Family] = {}
PRESETS: dict[str, dict[str, Any]] = {}  # every family's presets by name, each with its "family"


def register_family(family: Family) -> None:
    """Make ``family`` and its presets resolvable (its file calls this when imported)."""
    for name, preset in family.presets.items():
        if name in PRESETS and PRESETS[name]["family"] != family.name:
            raise ValueError(f"preset {name!r} is already {PRESETS[name]['family']}'s")
        PRESETS[name] = {"family": family.name, **preset}
    FAMILIES[family.name] = family


def resolve_family_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Return the complete, validated spec for a preset plus overrides, or for a family spec."""
    if not isinstance(spec, dict):
        raise SpecError(f"model: expected a mapping, got {type(spec).__name__}")
    out: dict[str, Any] = {}
    if "preset" in spec:
        name = spec["preset"]
        if name not in PRESETS:
            raise SpecError(f"model.preset: unknown preset {name!r} (known: {', '.join(PRESETS)})")
        out.update(copy.deepcopy(PRESETS[name]), preset=name)
        if "family" in spec and spec["family"] != out["family"]:
            raise SpecError(
                f"model.family: {spec['family']!r} conflicts with preset {name!r} (family {out['family']!r})"
            )
    out.update(copy.deepcopy(spec))
    family = out.get("family")
    if family not in FAMILIES:
        raise SpecError(f"model.family: unknown family {family!r} (known: {', '.join(FAMILIES)})")
    defaults = FAMILIES[family].defaults
    unknown = [k for k in out if k not in defaults and k not in ("family", "preset")]
    if unknown:
        raise SpecError(f"model.{unknown[0]}: unknown key for family {family}")
    out = {"family": family, **({"preset": out["preset"]} if "preset" in out else {}), **copy.deepcopy(defaults), **out}
    FAMILIES[family].validate(out)
    return out


# ---------------------------------------------------------------- field checks the families share (in place)


def check_int(spec: dict, key: str, low: int) -> None:
    value = spec[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"model.{key}: must be an integer, got {value!r}")
    if value < low:
        raise SpecError(f"model.{key}: must be >= {low}, got {value}")


def check_float(spec: dict, key: str, low: float, high: float, high_open: bool = False) -> None:
    """Check a number in [low, high] (or [low, high)) and store it as a float."""
    value = spec[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(f"model.{key}: must be a number, got {value!r}")
    if value < low or value > high or (high_open and value == high):
        bounds = f"[{low}, {high})" if high_open else f"[{low}, {high}]"
        raise SpecError(f"model.{key}: must be in {bounds}, got {value}")
    spec[key] = float(value)


def check_bool(spec: dict, key: str) -> None:
    if not isinstance(spec[key], bool):
        raise SpecError(f"model.{key}: must be true or false, got {spec[key]!r}")


def check_choice(spec: dict, key: str, choices: tuple[str, ...]) -> None:
    if spec[key] not in choices:
        raise SpecError(f"model.{key}: must be one of {', '.join(choices)}, got {spec[key]!r}")


def check_common(spec: dict) -> None:
    check_int(spec, "num_classes", 1)
    check_int(spec, "image_size", 1)
    check_int(spec, "in_channels", 1)
