"""The numeric rule (trainables/schema.py), walked over every numeric field of every settings class
and every numeric flag of every command line, so a new field or flag is covered without a new test."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import typing
from pathlib import Path

import pytest

from trainables.schema import SEED_RANGE, InputError, Settings, _unwrap

SETTINGS_MODULES = (
    "trainables.augment",
    "trainables.data",
    "trainables.config",
    "analysis.units.pipeline",
    "analysis.pruning.job",
    "analysis.committees.selection",
    "orchestrator.sweeps.spec",
)
SIGNED = {"Distribution.low", "Distribution.high"}  # the only numeric settings that may be negative


def settings_classes() -> list[type]:
    for name in SETTINGS_MODULES:
        importlib.import_module(name)
    found, todo = [], list(Settings.__subclasses__())
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += cls.__subclasses__()
    return sorted(found, key=lambda c: c.__name__)


def numeric_fields() -> list[tuple[type, str, type]]:
    fields = []
    for cls in settings_classes():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            base, _ = _unwrap(hints[f.name])
            if base in (int, float):
                fields.append((cls, f.name, base))
    return fields


FIELDS = numeric_fields()
HUGE = {int: 10**25, float: 10**400}  # beyond int64; beyond float's range


def test_the_walk_sees_every_settings_class():
    names = {cls.__name__ for cls, _, _ in FIELDS}
    assert {
        "JobConfig",
        "DataConfig",
        "RecipeConfig",
        "AnalysisConfig",
        "PruneConfig",
        "CommitteeConfig",
        "SpecFile",
        "SearchConfig",
        "ResourcesConfig",
        "RandAugmentConfig",
    } <= names
    assert len(FIELDS) >= 60


@pytest.mark.parametrize("cls,name,kind", FIELDS, ids=[f"{c.__name__}.{n}" for c, n, _ in FIELDS])
def test_every_numeric_setting_refuses_nan_infinities_negatives_and_huge_values(cls, name, kind):
    bad = [math.nan, math.inf, -math.inf, HUGE[kind], -HUGE[kind]]
    if f"{cls.__name__}.{name}" not in SIGNED:
        bad.append(-1)
    for value in bad:
        with pytest.raises(InputError) as refused:
            cls(**{name: value})
        assert refused.value.field == name, (value, str(refused.value))
        assert len(str(refused.value)) < 200 and "\n" not in str(refused.value)


def test_every_seed_has_the_one_documented_range():
    seeds = [(cls, name) for cls, name, _ in FIELDS if name.endswith("seed")]
    assert len(seeds) >= 6
    for cls, name in seeds:
        cls(**{name: SEED_RANGE[1]})
        with pytest.raises(InputError, match=rf"must be in \[0, {SEED_RANGE[1]}\]"):
            cls(**{name: SEED_RANGE[1] + 1})


def test_a_bad_value_is_echoed_as_a_bounded_excerpt():
    from trainables.config import prepare

    with pytest.raises(InputError) as refused:
        prepare({"epochs": "x" * 10**6})
    assert len(str(refused.value)) < 200 and "1,000,000 characters" in str(refused.value)


# ---------------------------------------------------------------- every numeric flag of every command


def _commands() -> dict[str, tuple[argparse.ArgumentParser, typing.Callable[[list[str]], int], list[str]]]:
    """Each command line: its parser, its entry point, and arguments that make the rest of it valid."""
    from analysis.pruning.cli import build_parser as prune_parser
    from analysis.pruning.cli import main as prune_main
    from analysis.units.run import build_parser as analysis_parser
    from analysis.units.run import main as analysis_main
    from orchestrator.cli import build_parser as orchestrator_parser
    from orchestrator.cli import main as orchestrator_main

    sub = {a.dest: a for a in orchestrator_parser()._actions if isinstance(a, argparse._SubParsersAction)}["command"]
    commands = {
        "analysis.units": (analysis_parser(), analysis_main, ["--run-dir", "RUN", "--out", "OUT"]),
        "analysis.pruning": (prune_parser(), prune_main, ["--parent", "RUN", "--out", "OUT"]),
    }
    positional = {
        "analyze": ["RUN"],
        "prune": ["RUN"],
        "committee": ["--experiment", "none"],
        "report": ["none"],
        "dashboard": ["none"],
    }
    for verb, parser in sub.choices.items():
        commands[f"orchestrator {verb}"] = (
            parser,
            lambda argv, verb=verb: orchestrator_main([verb, *argv]),
            positional.get(verb, []),
        )
    return commands


def numeric_flags() -> list[tuple[str, str, str]]:
    """(command, flag, int or float) of every flag that takes a number."""
    flags = []
    for command, (parser, _, _) in _commands().items():
        for action in parser._actions:
            kind = getattr(action.type, "__name__", "")
            if kind in ("int", "float") and action.option_strings:
                flags.append((command, action.option_strings[0], kind))
    return flags


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


FLAGS = numeric_flags()


def test_the_flag_walk_sees_every_command():
    commands = {c for c, _, _ in FLAGS}
    assert {
        "analysis.units",
        "analysis.pruning",
        "orchestrator analyze",
        "orchestrator prune",
        "orchestrator committee",
    } <= commands, commands


@pytest.mark.parametrize("command,flag,kind", FLAGS, ids=[f"{c}:{f}" for c, f, _ in FLAGS])
def test_every_numeric_flag_refuses_nan_infinity_negative_and_huge_in_one_line(
    command, flag, kind, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    _, entry, rest = _commands()[command]
    rest = [str(tmp_path / "missing") if a in ("RUN", "OUT") else a for a in rest]
    for value in ("nan", "inf", "-inf", "-1", "1e400" if kind == "float" else str(10**25)):
        try:
            code = entry([*rest, flag, value])
        except SystemExit as exit_:
            code = exit_.code
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and flag in err[0], (value, err)
        assert _tree(tmp_path) == []


def test_a_comma_list_flag_reads_none_as_the_method_named_none():
    from orchestrator.cli import build_parser

    assert build_parser().parse_args(["prune", "x", "--methods", "none"]).methods == ["none"]
    assert build_parser().parse_args(["prune", "x", "--methods", "none,andc"]).methods == ["none", "andc"]
