"""The folder a job writes (``run_job``, a prune job) and everything that reads it back: the one
place that names its files and rebuilds a model from them.

    spec.json           the resolved model spec (``build_model(spec)``)
    config.json         the resolved job config (``trainables.config.prepare`` reads it back)
    model.pt            the weights: a ``state_dict`` (``torch.load(..., weights_only=True)``)
    summary.json        final metrics, latency, size, where it ran, the history
    probs_val.parquet   softmax probabilities of the validation split (``trainables.probs``)
    probs_test.parquet  the same for the test split
    masks.pt            a pruned model's connection masks (prune jobs)
    label_sets.json     the label sets a prune job used (prune jobs; ``analysis.units.results``)
    checkpoint/         the resumable training state (``trainables.train.save_checkpoint``)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainables.config import JobConfig, prepare
from trainables.models import build_model
from trainables.schema import InputError

SPEC = "spec.json"
CONFIG = "config.json"
WEIGHTS = "model.pt"
SUMMARY = "summary.json"
MASKS = "masks.pt"
LABEL_SETS = "label_sets.json"
CHECKPOINT = "checkpoint"
PROBS = {"val": "probs_val.parquet", "test": "probs_test.parquet"}
MODEL_FILES = (SPEC, WEIGHTS)  # what rebuilding the network needs


class RunFolder:
    """A job's output folder: the path of each file, and its writers and readers."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def probs(self, split: str) -> Path:
        return self.path / PROBS[split]

    def write_json(self, name: str, data: Any) -> Path:
        """``data`` as ``name`` (spec.json, config.json, summary.json), indented."""
        target = self.path / name
        target.write_text(json.dumps(data, indent=1))
        return target

    def read_json(self, name: str) -> Any:
        """A JSON file of the folder; missing or damaged is an ``InputError`` naming it."""
        return read_json(self.path / name)

    def write_weights(self, model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> Path:
        """model.pt: ``state`` if given (a pruned model's plain weights), else ``model.state_dict()``."""
        torch.save(model.state_dict() if state is None else state, self.path / WEIGHTS)
        return self.path / WEIGHTS

    def missing(self, names: tuple[str, ...] = (SPEC, CONFIG, WEIGHTS)) -> list[str]:
        """Which of ``names`` the folder lacks."""
        return [name for name in names if not (self.path / name).is_file()]

    def job_config(self) -> JobConfig:
        """The resolved job config of config.json."""
        return prepare(self.read_json(CONFIG))

    def load_model(self) -> nn.Module:
        """The network rebuilt from spec.json + model.pt (``load_model``)."""
        return load_model(self.path / SPEC, self.path / WEIGHTS)


def read_json(path: str | Path) -> Any:
    """A JSON file; missing or not JSON is an ``InputError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({type(exc).__name__}: {str(exc)[:80]})") from None


def load_model(spec_path: str | Path, weights_path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Build the model of a spec JSON and load its ``state_dict`` (``load_weights``); in eval mode on
    ``device``. Every way of rebuilding a trained network (analysis, pruning, committees, served
    models) goes through here."""
    model = build_model(read_json(spec_path))
    load_weights(model, weights_path, f"the model of {spec_path}")
    return model.to(device).eval()


def load_weights(model: nn.Module, weights_path: str | Path, what: str) -> None:
    """Load a ``state_dict`` file (``weights_only=True``) into ``model``, requiring an exact key and
    shape match. An outside model (trainables/models/external.py) also takes the state_dict of the
    user's own module as saved where it was trained (its keys without the ``net.`` prefix)."""
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise InputError(f"{weights_path}: not found")
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for damaged or foreign files
        raise InputError(f"{weights_path}: cannot be read as a state_dict ({type(exc).__name__})") from None
    if not isinstance(state, dict):
        raise InputError(f"{weights_path}: holds {type(state).__name__}, not a state_dict")
    expected = model.state_dict()
    if isinstance(getattr(model, "net", None), nn.Module) and state and not any(k in expected for k in state):
        state = {f"net.{k}": v for k, v in state.items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        parts = [
            f"{len(missing)} missing keys (e.g. {missing[0]})" if missing else "",
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})" if unexpected else "",
            f"{len(wrong)} shape mismatches (e.g. {wrong[0]}: checkpoint {tuple(state[wrong[0]].shape)}, "
            f"spec {tuple(expected[wrong[0]].shape)})"
            if wrong
            else "",
        ]
        raise InputError(f"{weights_path} does not match {what}: {'; '.join(p for p in parts if p)}")
    model.load_state_dict(state, strict=True)
