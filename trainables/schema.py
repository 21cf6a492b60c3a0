"""Typed, frozen settings: one shared checker for every stage's config.

A stage's settings are a frozen dataclass deriving from ``Settings``. Each field owns its default,
its type (from the annotation) and its rule (``setting(default, low=..., choices=...)``); the class
may add cross-field checks in ``check``. The same class is built from YAML (``parse``) and from
command-line flags generated from its fields (``add_flags`` / ``from_flags``), so file and CLI
cannot drift. Every failure is one ``InputError`` line naming the field, e.g.
``config.recipe.lr: must be > 0, got -1``.

The numeric rule, for every field of every class (present and future): a float must be finite
(NaN and infinities are refused, which a two-sided bound alone would let NaN through); an integer
must fit in 64 bits; a seed (``seed_setting``) lies in ``SEED_RANGE`` in every verb. Sizes are
checked against what the data holds where the data is known (``DataConfig``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import reprlib
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import yaml

_NONE = type(None)
INT64 = 2**63 - 1  # the largest integer any setting may hold (torch and numpy index with int64)
SEED_RANGE = (0, 2**32 - 1)  # every seed of every verb: what numpy, torch and Ray all accept
EXCERPT = 80  # characters of a bad value an error line echoes
MAX_YAML_BYTES = 1 << 20  # a config or sweep spec file is text of at most 1 MiB
MIN_YAML_VALUES = 10_000  # aliases may expand a YAML text to this many values, or to its length if larger
_SHORT = reprlib.Repr()  # Python 3.11's Repr takes its limits as attributes
_SHORT.maxlevel, _SHORT.maxdict, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxset = 3, 6, 6, 6, 6
_SHORT.maxstring = _SHORT.maxother = EXCERPT


class InputError(ValueError):
    """Bad input (a config field, a flag, a file); the message is one line that names it."""

    def __init__(self, field: str, problem: str | None = None):
        self.field, self.problem = (field, problem) if problem is not None else ("", field)
        super().__init__(f"{self.field}: {self.problem}" if self.field else self.problem)

    def within(self, prefix: str) -> InputError:
        """The same error with its field placed under ``prefix`` (``threshold`` -> ``prune.threshold``)."""
        if not prefix or not self.field or self.field.startswith("-"):
            return self
        return type(self)(f"{prefix}.{self.field}", self.problem)


def setting(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    low: float | None = None,
    gt: float | None = None,
    high: float | None = None,
    lt: float | None = None,
    choices: tuple | None = None,
    flag: bool = True,
    factory: Any = dataclasses.MISSING,
    required: bool = False,
) -> Any:
    """A field with its rule: ``low``/``high`` inclusive bounds, ``gt``/``lt`` exclusive ones,
    ``choices`` the allowed values; ``flag=False`` keeps it out of generated CLI flags;
    ``required`` fields must appear in a parsed mapping (the default only serves code)."""
    rule = {
        "help": help,
        "low": low,
        "gt": gt,
        "high": high,
        "lt": lt,
        "choices": choices,
        "flag": flag,
        "required": required,
    }
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=rule)
    return dataclasses.field(default=default, metadata=rule)


def seed_setting(default: int = 0, help: str = "seed") -> Any:
    """A seed field: an integer in ``SEED_RANGE``, the same in every verb and file."""
    return setting(default, help, low=SEED_RANGE[0], high=SEED_RANGE[1])


def check_seed(value: Any, where: str) -> int:
    """``value`` as a seed in ``SEED_RANGE`` (for hand-written flags; settings use ``seed_setting``)."""
    value = _coerce(where, value, int)
    _check_rule(where, value, {"low": SEED_RANGE[0], "high": SEED_RANGE[1]})
    return value


def check_int(value: Any, where: str, low: int, high: int) -> int:
    """``value`` as an integer in [low, high] (for hand-written flags), or one ``InputError`` line."""
    value = _coerce(where, value, int)
    _check_rule(where, value, {"low": low, "high": high})
    return value


def excerpt(value: Any) -> str:
    """A bounded ``repr(value)`` (never built whole: nested and shared values are cut while written),
    so an error line stays one short line whatever the value."""
    if isinstance(value, str) and len(value) > EXCERPT:
        return f"{value[:EXCERPT]!r}... ({len(value):,} characters)"
    text = _SHORT.repr(value)
    return text if len(text) <= 2 * EXCERPT else f"{text[: 2 * EXCERPT]}..."


def _count_values(data: Any, limit: int) -> int:
    """Scalars, lists and mappings in ``data`` with shared parts counted each time they appear, up to
    ``limit`` (the walk stops there, so a bomb costs no more than ``limit`` steps)."""
    count, todo = 0, [data]
    while todo and count <= limit:
        item = todo.pop()
        count += 1
        if isinstance(item, dict):
            todo += [*item.keys(), *item.values()]
        elif isinstance(item, (list, tuple)):
            todo += item
    return count


def parse_yaml(text: str, where: str) -> Any:
    """YAML text (a file's, or a flag's value) as plain data; a syntax error, or aliases that expand
    to more values than the text could hold without them (a "billion laughs" file), is an
    ``InputError`` naming ``where``."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InputError(where, f"not valid YAML ({str(exc).splitlines()[0][: 2 * EXCERPT]})") from None
    limit = max(len(text), MIN_YAML_VALUES)
    if _count_values(data, limit) > limit:
        raise InputError(where, f"YAML aliases (*name) expand it to more than {limit:,} values")
    return data


def read_text_file(path: str | Path, what: str) -> str:
    """A small UTF-8 text file's content: missing, a folder, larger than ``MAX_YAML_BYTES`` or
    binary is one ``InputError`` naming ``what`` and the path."""
    path = Path(path)
    where = f"{what} {path}"
    if path.is_dir():
        raise InputError(where, "is a folder, not a file")
    if not path.is_file():
        raise InputError(where, "not found")
    if path.stat().st_size > MAX_YAML_BYTES:
        raise InputError(where, f"is {path.stat().st_size:,} bytes; a YAML config is at most {MAX_YAML_BYTES:,}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(where, "is not a text file (not UTF-8: binary?)") from None
    except OSError as exc:
        raise InputError(where, f"cannot be read ({exc.strerror})") from None
    if "\0" in text:
        raise InputError(where, "is not a text file (holds NUL bytes: binary?)")
    return text


def read_yaml(path: str | Path, what: str = "config file") -> dict:
    """A YAML file holding a mapping (``read_text_file``, ``parse_yaml``); errors name the file."""
    where = f"{what} {path}"
    data = parse_yaml(read_text_file(path, what), where)
    if not isinstance(data, dict):
        raise InputError(where, "must hold a mapping at the top level")
    return data


class Settings:
    """Base of every frozen settings dataclass (see the module docstring)."""

    SECTION: ClassVar[str] = ""  # where the settings live in a file, used to name fields in errors

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _coerce(f.name, getattr(self, f.name), hints[f.name])
            _check_rule(f.name, value, f.metadata)
            object.__setattr__(self, f.name, value)
        self.check()

    def check(self) -> None:
        """Cross-field checks and derived defaults; raise ``InputError(field, problem)``."""

    @classmethod
    def parse(cls, raw: Any, where: str | None = None):
        """Build from a mapping (YAML, JSON): unknown keys, wrong types and broken rules raise one line."""
        where = cls.SECTION if where is None else where
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise InputError(where or "settings", f"must be a mapping, got {excerpt(raw)}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        for key in raw:
            if key not in known:
                raise InputError(f"{key}", f"unknown key (known: {', '.join(known)})").within(where)
        for name, f in known.items():
            if f.metadata.get("required") and name not in raw:
                raise InputError(name, "required").within(where)
        hints = typing.get_type_hints(cls)
        values = {}
        for name, value in raw.items():
            nested = _settings_class(hints[name])
            optional = _unwrap(hints[name])[1]  # an optional nested section given as null stays off
            if nested is not None and (isinstance(value, Mapping) or (value is None and not optional)):
                base = _custom_defaults(known[name], nested)  # what the field's default sets differently
                value = nested.parse({**base, **(value or {})}, f"{where}.{name}" if where else name)
            values[name] = value
        try:
            return cls(**values)
        except InputError as exc:
            raise exc.within(where) from None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-ready values (nested settings as mappings, tuples as lists)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def merged(self, changes: Mapping[str, Any]):
        """A checked copy with a nested mapping of changes applied (``{"data": {"data_dir": ...}}``)."""
        return type(self).parse(_deep_merge(self.to_dict(), changes))

    def replace(self, **changes: Any):
        """A checked copy with some fields changed."""
        try:
            return dataclasses.replace(self, **changes)
        except InputError as exc:
            raise exc.within(self.SECTION) from None

    # ------------------------------------------------------------ command-line flags

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
        """One ``--field-name`` flag per scalar field, nested settings' fields included under their
        own names (lists are comma-separated, booleans take ``--x``/``--no-x``); flags not given
        keep the field's default."""
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in skip or not f.metadata.get("flag", True):
                continue
            nested = _settings_class(hints[f.name])
            if nested is not None:
                nested.add_flags(parser, skip)
                continue
            base, optional = _unwrap(hints[f.name])
            kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "dest": f.name}
            default = "none" if f.default is None else f.default
            text = f.metadata.get("help", "")
            kwargs["help"] = text if "default" in text else f"{text} (default: {default})".strip()
            if base is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            elif base in (tuple, list):
                kwargs["type"] = _comma_list(_item_hint(hints[f.name]) or str, optional)
                kwargs["metavar"] = "A,B"
            elif base in (int, float, str):
                kwargs["type"] = _typed(base, optional)
            else:
                continue
            parser.add_argument(f"--{f.name.replace('_', '-')}", **kwargs)

    @classmethod
    def from_flags(cls, args: argparse.Namespace, **fixed: Any):
        """The settings from parsed ``add_flags`` arguments (plus ``fixed`` values); errors name the flag."""
        given = cls._given(args)
        try:
            return cls.parse({**given, **fixed}, where="")
        except InputError as exc:
            field = exc.field.split(".")[-1]
            flag = f"--{field.replace('_', '-')}" if hasattr(args, field) else exc.field
            raise InputError(flag, exc.problem) from None

    @classmethod
    def _given(cls, args: argparse.Namespace) -> dict[str, Any]:
        hints = typing.get_type_hints(cls)
        given: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            nested = _settings_class(hints[f.name])
            if nested is not None:
                sub = nested._given(args)
                if sub:
                    given[f.name] = sub
            elif hasattr(args, f.name):
                given[f.name] = getattr(args, f.name)
        return given


def _custom_defaults(f: dataclasses.Field, nested: type) -> dict[str, Any]:
    """Fields where a nested settings field's default differs from its class's own defaults
    (``analysis: AnalysisConfig(train_size=5000)`` -> ``{"train_size": 5000}``), which a partial
    mapping keeps."""
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if not isinstance(default, Settings):
        return {}
    plain, mine = nested().to_dict(), default.to_dict()
    return {k: v for k, v in mine.items() if plain[k] != v}


def refuse(exc: BaseException) -> int:
    """Print ``exc`` as the one line ``error: ...`` on stderr and return exit code 2: how every command
    line refuses bad input (an ``InputError``, a library's error that names a bad input such as
    MLflow's, whose first line is kept, or an ``OSError`` on a path the user gave)."""
    text = str(getattr(exc, "message", None) or exc).strip()
    print(f"error: {text.splitlines()[0] if text else type(exc).__name__}", file=sys.stderr)
    return 2


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose every refusal is one line, ``error: argument --x: ...``, exit 2 (not
    argparse's usage block); subcommand parsers inherit it. ``--help`` still prints the usage."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message.splitlines()[0] if message else 'bad arguments'}\n")


def output_folder(path: str | Path, flag: str = "--out") -> Path:
    """``path`` as a folder that can be created or written, checked before any work starts."""
    if not str(path).strip():
        raise InputError(flag, "empty path; give a folder")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(flag, f"{path} exists and is not a folder")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(flag, f"{path} cannot be written ({existing} is not a writable folder)")
    return path


def output_file(path: str | Path, flag: str = "--out") -> Path:
    """``path`` as a file that can be written: not empty, not a folder, in a folder that can be
    created or written, not a read-only file; checked before any work starts."""
    if not str(path).strip():
        raise InputError(flag, "empty path; give a file")
    path = Path(path)
    if path.is_dir():
        raise InputError(flag, f"{path} is a folder; give a file")
    output_folder(path.parent, flag)
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(flag, f"{path} cannot be written (read-only file)")
    return path


def _typed(base: type, optional: bool):
    def convert(text: str):
        if optional and text.lower() in ("none", "null"):
            return None
        try:
            return base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {base.__name__}, got {text!r}") from None

    convert.__name__ = base.__name__
    return convert


def _comma_list(item: type, optional: bool):
    convert_item = _typed(item, optional=False)

    def convert(text: str) -> list | None:
        if optional and text.lower() in ("none", "null"):  # else "none" is an item (a method named none)
            return None
        return [convert_item(part.strip()) for part in text.split(",") if part.strip()]

    convert.__name__ = f"comma-separated {item.__name__}"
    return convert


def _unwrap(hint: Any) -> tuple[Any, bool]:
    """(base type, optional) of an annotation such as ``int | None`` or ``tuple[str, ...]``."""
    args = typing.get_args(hint)
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        optional = _NONE in args
        rest = [a for a in args if a is not _NONE]
        hint = rest[0] if len(rest) == 1 else tuple(rest)
    if isinstance(hint, tuple):
        return hint, optional
    return typing.get_origin(hint) or hint, optional


def _item_hint(hint: Any) -> Any:
    """The element type of ``tuple[X, ...]`` (also inside ``| None``), else None."""
    for candidate in (hint, *typing.get_args(hint)):
        if typing.get_origin(candidate) is tuple:
            args = typing.get_args(candidate)
            return args[0] if args else None
    return None


def _settings_class(hint: Any) -> type | None:
    base, _ = _unwrap(hint)
    return base if isinstance(base, type) and issubclass(base, Settings) else None


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """``value`` checked against the annotation; ints become floats, lists of a tuple field tuples."""
    base, optional = _unwrap(hint)
    if value is None:
        if optional or base is Any:
            return None
        raise InputError(name, f"must be {_type_name(base)}, got None")
    if base is Any:
        return value
    bases = base if isinstance(base, tuple) else (base,)
    for kind in bases:
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an integer beyond float's range
                number = math.inf
            if not math.isfinite(number):
                raise InputError(name, f"must be a finite number, got {excerpt(value)}")
            return number
        if kind is int and isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT64:
            raise InputError(name, f"must fit in 64 bits (at most {INT64:,} in size), got {excerpt(value)}")
        if kind is tuple and isinstance(value, (list, tuple)):
            item = _item_hint(hint)
            return (
                tuple(value) if item is None else tuple(_coerce(f"{name}[{i}]", v, item) for i, v in enumerate(value))
            )
        if kind is bool and isinstance(value, bool):
            return value
        if kind is not bool and isinstance(value, kind) and not (isinstance(value, bool) and kind is int):
            return value
    raise InputError(name, f"must be {_type_name(base)}{' or null' if optional else ''}, got {excerpt(value)}")


def _type_name(base: Any) -> str:
    if isinstance(base, tuple):
        return " or ".join(_type_name(b) for b in base)
    return {tuple: "a list", list: "a list", dict: "a mapping"}.get(base, getattr(base, "__name__", str(base)))


def _check_rule(name: str, value: Any, rule: Mapping[str, Any]) -> None:
    if value is None or not rule:
        return
    choices = rule.get("choices")
    if choices is not None and value not in choices:
        raise InputError(name, f"must be one of {', '.join(map(str, choices))}, got {excerpt(value)}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    low, gt, high, lt = rule.get("low"), rule.get("gt"), rule.get("high"), rule.get("lt")
    if (gt is not None or low is not None) and (lt is not None or high is not None):
        bad = (
            (gt is not None and value <= gt)
            or (low is not None and value < low)
            or (lt is not None and value >= lt)
            or (high is not None and value > high)
        )
        if bad:
            left = f"({_bound(gt)}" if gt is not None else f"[{_bound(low)}"
            right = f"{_bound(lt)})" if lt is not None else f"{_bound(high)}]"
            raise InputError(name, f"must be in {left}, {right}, got {value}")
        return
    for bound, ok, text in (
        (low, lambda b: value >= b, ">="),
        (gt, lambda b: value > b, ">"),
        (high, lambda b: value <= b, "<="),
        (lt, lambda b: value < b, "<"),
    ):
        if bound is not None and not ok(bound):
            raise InputError(name, f"must be {text} {_bound(bound)}, got {value}")


def _bound(value: float) -> str:
    """A rule's bound as written: integers in full (4294967295), other numbers short (1e-05)."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _deep_merge(base: dict, changes: Mapping[str, Any]) -> dict:
    out = dict(base)
    for key, value in changes.items():
        out[key] = (
            _deep_merge(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), dict) else value
        )
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, Settings):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
