"""Model zoo built from specs: CCT (LS-MHA, conv-replaced blocks), VGG, EfficientNet-B0, and any outside
model (a factory callable or a torchvision builder, trainables/models/external.py)."""

from __future__ import annotations

from typing import Any

from . import cct, efficientnet, vgg  # noqa: F401 - each registers its family
from .external import External, is_external, resolve_external
from .spec import FAMILIES, PRESETS, SpecError, TapInfo, resolve_family_spec
from .taps import TappedModel, count_macs, count_params


def resolve_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The complete, validated spec: a built-in family's (``spec.resolve_family_spec``) or an outside
    model's (``external.resolve_external``)."""
    return resolve_external(spec) if is_external(spec) else resolve_family_spec(spec)


def build_model(spec: dict[str, Any]) -> TappedModel:
    """Build a freshly initialised model from a (resolved or unresolved) spec."""
    spec = resolve_spec(spec)
    return External(spec) if spec["family"] == "external" else FAMILIES[spec["family"]].model(spec)


__all__ = [
    "PRESETS",
    "SpecError",
    "TapInfo",
    "TappedModel",
    "build_model",
    "count_macs",
    "count_params",
    "resolve_spec",
]
