"""The training job configuration: defaults, merging and validation.

A job config is a plain nested dict (YAML on disk). Every key must be known; values are
type-checked against the defaults, so a typo fails with one line naming the field before any work.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

# The model spec is validated by trainables.models.resolve_spec; everything else is checked here.
DEFAULT_CONFIG: dict[str, Any] = {
    "model": {"preset": "cct_narrow"},
    "data": {
        "name": "cifar100",
        "data_dir": None,
        "torchvision_root": None,
        "train_size": None,
        "val_size": 5000,
        "test_size": None,
        "val_seed": 0,
        "num_classes": 10,
        "image_size": 32,
        "synthetic_seed": 0,
        "synthetic_noise": 40.0,
        "normalize": "dataset",
        "augment": {"flip": True, "translate": 4, "crop_scale": None, "mixup": 0.0, "cutmix": 0.0},
    },
    "recipe": {
        "name": "adamw_cosine",
        "lr": None,
        "weight_decay": None,
        "warmup_epochs": None,
        "min_lr": 1e-5,
        "momentum": 0.9,
        "step_epochs": 20,
        "step_gamma": 0.6,
    },
    "epochs": 5,
    "batch_size": 128,
    "eval_batch_size": 500,
    "seed": 0,
    "label_smoothing": 0.1,
    "device": "auto",
    "bf16": "auto",
    "channels_last": "auto",
    "compile": False,
    "checkpoint": True,
    "latency": {"large_batch": 256, "repeats": 20},
}

# Recipe defaults from methods.md section 4, filled where the user leaves a field null.
RECIPE_DEFAULTS = {
    "adamw_cosine": {"lr": 6e-4, "weight_decay": 0.06, "warmup_epochs": 10},
    "sgd_step": {"lr": 0.05, "weight_decay": 1e-3, "warmup_epochs": 0},
    # SGD Nesterov with warm-up and cosine decay: the CNN recipe for short CPU-scale schedules.
    "sgd_cosine": {"lr": 0.05, "weight_decay": 5e-4, "warmup_epochs": 1},
}
CHOICES = {
    "recipe.name": tuple(RECIPE_DEFAULTS),
    "device": ("auto", "cpu", "cuda"),
    "data.normalize": ("dataset", "unit"),
}
# Fields whose default is None but which take a value of this type.
OPTIONAL_TYPES = {
    "data.data_dir": str,
    "data.torchvision_root": str,
    "data.train_size": int,
    "data.test_size": int,
    "data.augment.crop_scale": list,
    "recipe.lr": float,
    "recipe.weight_decay": float,
    "recipe.warmup_epochs": int,
}
TRI_STATE = ("bf16", "channels_last")  # "auto", true or false


class ConfigError(ValueError):
    """A config field is unknown or has a bad value; the message names the field."""


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path}: not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: must hold a mapping at the top level")
    return data


def resolve_config(user: dict) -> dict:
    """Merge a user config over the defaults, validate it, and fill recipe defaults."""
    if "model" in user and not isinstance(user["model"], dict):
        raise ConfigError("config.model: must be a mapping (a preset name or a full spec)")
    cfg = _merge(DEFAULT_CONFIG, user, "")
    if "model" in user:
        cfg["model"] = copy.deepcopy(user["model"])
    recipe = cfg["recipe"]
    for key, value in RECIPE_DEFAULTS[recipe["name"]].items():
        if recipe[key] is None:
            recipe[key] = value
    for key in ("epochs", "batch_size", "eval_batch_size"):
        if cfg[key] < 1:
            raise ConfigError(f"config.{key}: must be >= 1, got {cfg[key]}")
    if not 0 <= cfg["label_smoothing"] < 1:
        raise ConfigError(f"config.label_smoothing: must be in [0, 1), got {cfg['label_smoothing']}")
    if recipe["lr"] <= 0:
        raise ConfigError(f"config.recipe.lr: must be > 0, got {recipe['lr']}")
    scale = cfg["data"]["augment"]["crop_scale"]
    if scale is not None and not (len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
        raise ConfigError(f"config.data.augment.crop_scale: must be [low, high] within (0, 1], got {scale}")
    return cfg


def _merge(default: dict, user: dict, prefix: str) -> dict:
    if not isinstance(user, dict):
        raise ConfigError(f"config.{prefix.rstrip('.')}: must be a mapping")
    out = copy.deepcopy(default)
    for key, value in user.items():
        path = f"{prefix}{key}"
        if key not in default:
            raise ConfigError(f"config.{path}: unknown key (known: {', '.join(sorted(default))})")
        if key == "model":
            continue
        base = default[key]
        if isinstance(base, dict):
            out[key] = _merge(base, value, path + ".")
        else:
            out[key] = _check_value(path, base, value)
    return out


def _check_value(path: str, default: Any, value: Any) -> Any:
    if path in TRI_STATE:
        if value not in ("auto", True, False):
            raise ConfigError(f"config.{path}: must be auto, true or false, got {value!r}")
        return value
    if path in CHOICES and value not in CHOICES[path]:
        raise ConfigError(f"config.{path}: must be one of {', '.join(CHOICES[path])}, got {value!r}")
    expected = OPTIONAL_TYPES.get(path, type(default))
    if value is None and (default is None or path in OPTIONAL_TYPES):
        return None
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is bool and not isinstance(value, bool) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"config.{path}: must be {expected.__name__}, got {value!r}")
    if not isinstance(value, expected):
        raise ConfigError(f"config.{path}: must be {expected.__name__}, got {value!r}")
    return value


def set_dotted(cfg: dict, dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict, creating mappings on the way (for --set overrides)."""
    keys = dotted.split(".")
    node = cfg
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
