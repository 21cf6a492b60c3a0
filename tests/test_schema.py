"""The shared settings checker: one typed config per stage, built alike from YAML and from flags."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from analysis.committees.selection import CommitteeConfig
from analysis.pruning.job import PruneConfig, PrunePlan
from analysis.units.pipeline import AnalysisConfig
from trainables.config import JobConfig, prepare
from trainables.data import DataConfig
from trainables.schema import InputError, Settings

STAGES = (JobConfig, DataConfig, AnalysisConfig, PruneConfig, PrunePlan, CommitteeConfig)


@pytest.mark.parametrize("cls", STAGES)
def test_every_setting_has_a_default_and_round_trips(cls):
    config = cls()
    assert dataclasses.is_dataclass(config) and isinstance(config, Settings)
    assert cls.parse(config.to_dict()) == config
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(config, dataclasses.fields(cls)[0].name, None)


@pytest.mark.parametrize("cls", (AnalysisConfig, PruneConfig, CommitteeConfig))
def test_flags_and_yaml_build_the_same_settings(cls):
    parser = argparse.ArgumentParser()
    cls.add_flags(parser)
    assert cls.from_flags(parser.parse_args([])) == cls()  # no flag: every default
    flags = {
        AnalysisConfig: (
            ["--taps", "a,b", "--threshold", "0.4", "--no-save-matrices", "--train-size", "100"],
            {"taps": ["a", "b"], "threshold": 0.4, "save_matrices": False, "train_size": 100},
        ),
        PruneConfig: (
            ["--method", "random", "--level", "0.5", "--train-size", "64", "--readout-epochs", "3"],
            {"method": "random", "level": 0.5, "analysis": {"train_size": 64, "readout_epochs": 3}},
        ),
        CommitteeConfig: (
            ["--size", "3", "--method", "diverse", "--mechanism-weight", "0.2"],
            {"size": 3, "method": "diverse", "mechanism_weight": 0.2},
        ),
    }
    argv, raw = flags[cls]
    assert cls.from_flags(parser.parse_args(argv)) == cls.parse(raw)


def test_every_field_is_a_flag_or_declared_file_only():
    """A new field reaches the CLI without another edit: each scalar field has its flag."""
    for cls in (AnalysisConfig, PruneConfig, CommitteeConfig):
        parser = argparse.ArgumentParser()
        cls.add_flags(parser)
        dests = {a.dest for a in parser._actions}
        for f in dataclasses.fields(cls):
            nested = f.name == "analysis"
            assert nested or f.name in dests or not f.metadata.get("flag", True), (cls.__name__, f.name)


def test_errors_name_the_field_in_file_and_flag_form():
    with pytest.raises(InputError, match=r"^config\.recipe\.lr: must be > 0, got -1"):
        prepare({"recipe": {"lr": -1}})
    with pytest.raises(InputError, match=r"^config\.data\.train_size: must be >= 1, got -5"):
        prepare({"data": {"name": "synthetic", "train_size": -5}})
    with pytest.raises(InputError, match=r"^config\.epochs: must be int, got 'two'"):
        prepare({"epochs": "two"})
    with pytest.raises(InputError, match=r"^config\.bf16: must be one of auto, True, False, got 'yes'"):
        prepare({"bf16": "yes"})
    with pytest.raises(InputError, match=r"^sweep\.analyze\.threshold: must be in \(0, 1\), got 1\.5"):
        AnalysisConfig.parse({"threshold": 1.5}, "sweep.analyze")
    parser = argparse.ArgumentParser()
    CommitteeConfig.add_flags(parser)
    with pytest.raises(InputError, match=r"^--diversity-weight: must be >= 0, got -1\.0"):
        CommitteeConfig.from_flags(parser.parse_args(["--diversity-weight", "-1"]))


def test_resolution_fills_recipe_defaults_and_sizes_the_model_to_the_data():
    cfg = prepare(
        {
            "recipe": {"name": "sgd_cosine"},
            "model": {"preset": "cct_tiny"},
            "data": {"name": "synthetic", "num_classes": 7, "image_size": 16},
        }
    )
    assert (cfg.recipe.lr, cfg.recipe.weight_decay, cfg.recipe.warmup_epochs) == (0.05, 5e-4, 1)
    assert cfg.model["family"] == "cct" and (cfg.model["num_classes"], cfg.model["image_size"]) == (7, 16)
    assert prepare(cfg) is cfg  # resolved once: a JobConfig passes through
    assert prepare(cfg.to_dict()) == cfg  # config.json rebuilds the same job
    with pytest.raises(InputError, match="model.num_classes: 5 differs from the data's 7 classes"):
        prepare(
            {
                "model": {"preset": "cct_tiny", "num_classes": 5},
                "data": {"name": "synthetic", "num_classes": 7, "image_size": 16},
            }
        )
    merged = cfg.merged({"data": {"train_size": 10}, "device": "cpu"})
    assert merged.data.train_size == 10 and merged.device == "cpu" and merged.recipe == cfg.recipe


def test_sweep_spec_sections_use_the_same_checker(tmp_path):
    from orchestrator.sweeps.spec import SpecFile

    with pytest.raises(InputError, match=r"^sweep\.name: required"):
        SpecFile.parse({"data": {}, "axes": {}})
    with pytest.raises(InputError, match=r"^sweep\.search\.num_samples: must be >= 1, got 0"):
        SpecFile.parse({"name": "a", "data": {}, "axes": {}, "search": {"num_samples": 0}})
    with pytest.raises(InputError, match=r"^sweep\.resources\.cpus: must be > 0, got 0"):
        SpecFile.parse({"name": "a", "data": {}, "axes": {}, "resources": {"cpus": 0}})
    spec = SpecFile.parse(
        {"name": "a", "data": {"name": "synthetic"}, "axes": {"seed": [0]}, "resources": {"gpus": 0.25}}
    )
    assert spec.resources.gpus == 0.25 and spec.search.mode == "grid" and spec.max_failures == 2
