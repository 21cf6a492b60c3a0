"""The training job's settings: ``JobConfig`` (YAML on disk, ``config.json`` in a run folder).

``prepare(user_dict)`` parses and resolves a job once: every field checked, recipe defaults filled
(docs/methods.md section 4), the model spec expanded and matched to the data. Everything downstream
(``run_job``, the sweep's trainable, pruning's fine-tuning) receives the resolved ``JobConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainables.data import DataConfig, dataset_shape
from trainables.models import resolve_spec
from trainables.schema import InputError, Settings, read_yaml, seed_setting, setting

# Recipe defaults from docs/methods.md section 4, filled where the user leaves a field null.
RECIPE_DEFAULTS = {
    "adamw_cosine": {"lr": 6e-4, "weight_decay": 0.06, "warmup_epochs": 10},
    "sgd_step": {"lr": 0.05, "weight_decay": 1e-3, "warmup_epochs": 0},
    # SGD Nesterov with warm-up and cosine decay: the CNN recipe for short CPU-scale schedules.
    "sgd_cosine": {"lr": 0.05, "weight_decay": 5e-4, "warmup_epochs": 1},
}
TRI_STATE = ("auto", True, False)
DEFAULT_MODEL = {"preset": "cct_narrow"}


@dataclass(frozen=True)
class RecipeConfig(Settings):
    """Optimiser and schedule; null fields take the recipe's defaults (``RECIPE_DEFAULTS``)."""

    name: str = setting("adamw_cosine", "optimiser and schedule", choices=tuple(RECIPE_DEFAULTS))
    lr: float | None = setting(None, "peak learning rate", gt=0)
    weight_decay: float | None = setting(None, low=0)
    warmup_epochs: int | None = setting(None, "linear warm-up epochs", low=0)
    min_lr: float = setting(1e-5, "cosine floor", low=0)
    momentum: float = setting(0.9, "SGD momentum", low=0, lt=1)
    step_epochs: int = setting(20, "sgd_step: epochs between decays", low=1)
    step_gamma: float = setting(0.6, "sgd_step: decay factor", gt=0)

    def check(self) -> None:
        for key, value in RECIPE_DEFAULTS[self.name].items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)


@dataclass(frozen=True)
class LatencyConfig(Settings):
    """Inference latency measured after training."""

    large_batch: int = setting(256, low=1)
    repeats: int = setting(20, low=1)


@dataclass(frozen=True)
class JobConfig(Settings):
    """One training job. ``model`` is a model spec: a preset name plus overrides, or a full spec;
    once built, it holds the resolved spec (``trainables.models.resolve_spec``) sized to the data."""

    SECTION = "config"

    model: dict = setting(factory=lambda: dict(DEFAULT_MODEL), flag=False)
    data: DataConfig = setting(factory=DataConfig)
    recipe: RecipeConfig = setting(factory=RecipeConfig)
    epochs: int = setting(5, low=1)
    batch_size: int = setting(128, low=1)
    eval_batch_size: int = setting(500, low=1)
    seed: int = seed_setting(0, "training seed (initialisation, order, augmentation)")
    label_smoothing: float = setting(0.1, low=0, lt=1)
    grad_clip: float | None = setting(None, "clip the gradients' global L2 norm to this (null: off)", gt=0)
    device: str = setting("auto", choices=("auto", "cpu", "cuda"))
    bf16: Any = setting(
        "auto", "bf16 autocast: auto (where the device has native bf16), true or false", choices=TRI_STATE
    )
    channels_last: Any = setting("auto", "channels_last memory format: auto, true or false", choices=TRI_STATE)
    compile: bool = False
    checkpoint: bool = True
    latency: LatencyConfig = setting(factory=LatencyConfig)

    def check(self) -> None:
        num_classes, image_size = dataset_shape(self.data)
        spec = {"num_classes": num_classes, "image_size": image_size, **self.model}
        spec = resolve_spec(spec)
        if spec["num_classes"] != num_classes:
            raise InputError(
                "model.num_classes", f"{spec['num_classes']} differs from the data's {num_classes} classes"
            )
        if spec["image_size"] != image_size:
            raise InputError("model.image_size", f"{spec['image_size']} differs from the data's {image_size} px images")
        object.__setattr__(self, "model", spec)


def prepare(user: dict | JobConfig) -> JobConfig:
    """The resolved job config of a user mapping (YAML); a JobConfig passes through unchanged."""
    if isinstance(user, JobConfig):
        return user
    if "model" in user and not isinstance(user["model"], dict):
        raise InputError("config.model", "must be a mapping (a preset name or a full spec)")
    return JobConfig.parse(user)


def load_yaml(path: str | Path) -> dict:
    """Read a job config file (``schema.read_yaml``: errors name the file)."""
    return read_yaml(path, "config file")


def set_dotted(cfg: dict, dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict, creating mappings on the way (for --set overrides)."""
    keys = dotted.split(".")
    node = cfg
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
