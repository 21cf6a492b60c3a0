"""Model zoo built from specs: CCT (LS-MHA, conv-replaced blocks), VGG, EfficientNet-B0, and any outside
model (a factory callable or a torchvision builder, trainables/models/external.py)."""

from __future__ import annotations

from typing import Any

from .cct import CCT
from .efficientnet import EfficientNet
from .external import External
from .spec import PRESETS, SpecError, TapInfo, resolve_spec
from .taps import TappedModel, count_macs, count_params
from .vgg import VGG

_FAMILIES: dict[str, type[TappedModel]] = {"cct": CCT, "vgg": VGG, "efficientnet": EfficientNet, "external": External}


def build_model(spec: dict[str, Any]) -> TappedModel:
    """Build a freshly initialised model from a (resolved or unresolved) spec."""
    spec = resolve_spec(spec)
    return _FAMILIES[spec["family"]](spec)


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
