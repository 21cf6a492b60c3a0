"""Model specs: presets, defaults, validation and the geometry a spec implies.

A spec is a plain JSON-serialisable dict. `resolve_spec` expands `{"preset": NAME, **overrides}` or
`{"family": NAME, ...}` into a complete spec (`{"factory": ...}` and `{"torchvision": ...}` models
from outside the project: trainables/models/external.py) and checks every field, so a bad value fails with one
line naming the field (`model.heads: must be >= 1, got 0`) before any tensor is allocated.
"""

from __future__ import annotations

import copy
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


# Defaults per family. `tokenizer_stride: None` means CCT's rule max(1, kernel // 2 - 1).
DEFAULTS: dict[str, dict[str, Any]] = {
    "cct": {
        "num_classes": 100,
        "image_size": 32,
        "in_channels": 3,
        "width": 256,
        "blocks": 7,
        "heads": 4,
        "head_dim": 64,
        "mlp_ratio": 2.0,
        "tokenizer_layers": 1,
        "tokenizer_kernel": 3,
        "tokenizer_stride": None,
        "tokenizer_channels": 64,
        "pool": True,
        "pos_embedding": "learnable",
        "dropout": 0.0,
        "attn_dropout": 0.1,
        "stochastic_depth": 0.1,
        "n_conv_blocks": 0,
        "seq_pool": True,
    },
    "vgg": {
        "num_classes": 100,
        "image_size": 32,
        "in_channels": 3,
        "layers": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
        "fc_bias": True,
        "fc_hidden": [],
        "width_mult": 1.0,
    },
    "efficientnet": {
        "num_classes": 100,
        "image_size": 32,
        "in_channels": 3,
        "dropout": 0.2,
        "stochastic_depth": 0.2,
    },
}

_CCT_7_3X1: dict[str, Any] = {"family": "cct"}  # the family defaults are CCT-7/3x1 at CIFAR-100


def _lsmha(heads: int, head_dim: int) -> dict[str, Any]:
    return {**_CCT_7_3X1, "heads": heads, "head_dim": head_dim}


PRESETS: dict[str, dict[str, Any]] = {
    "cct_7_3x1": _CCT_7_3X1,
    # Flowers-102: CCT-7/7x2 with sine positions like Compact-Transformers' model; 64 px here.
    "cct_7_7x2": {
        **_CCT_7_3X1,
        "num_classes": 102,
        "image_size": 64,
        "tokenizer_layers": 2,
        "tokenizer_kernel": 7,
        "pos_embedding": "sine",
    },
    "cct_lsmha_16x16": _lsmha(16, 16),
    "cct_lsmha_25x4": _lsmha(25, 4),
    "cct_lsmha_32x8": _lsmha(32, 8),
    "cct_lsmha_64x4": _lsmha(64, 4),
    "cct_narrow": {**_CCT_7_3X1, "width": 128, "blocks": 2, "heads": 4, "head_dim": 32},
    "cct_narrow_lsmha": {**_CCT_7_3X1, "width": 128, "blocks": 2, "heads": 16, "head_dim": 8},
    "cct_tiny": {
        **_CCT_7_3X1,
        "width": 32,
        "blocks": 1,
        "heads": 2,
        "head_dim": 16,
        "tokenizer_layers": 2,
        "tokenizer_channels": 8,
    },
    "vgg11_afcc": {
        "family": "vgg",
        "fc_bias": False,
        "layers": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M"],
    },
    # Two hidden FC layers (widths scaled by width_mult like the convs), for nodal pruning.
    "vgg11_fc": {
        "family": "vgg",
        "fc_bias": False,
        "fc_hidden": [512, 512],
        "layers": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M"],
    },
    "vgg11_cifar": {"family": "vgg"},
    "efficientnet_b0": {"family": "efficientnet"},
}


def resolve_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Return the complete, validated spec for a preset plus overrides, or for a family spec."""
    if not isinstance(spec, dict):
        raise SpecError(f"model: expected a mapping, got {type(spec).__name__}")
    if "factory" in spec or "torchvision" in spec or spec.get("family") == "external":
        from .external import resolve_external  # imports the family's module: it imports this one

        return resolve_external(spec)
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
    if family not in DEFAULTS:
        raise SpecError(f"model.family: unknown family {family!r} (known: {', '.join(DEFAULTS)})")
    unknown = [k for k in out if k not in DEFAULTS[family] and k not in ("family", "preset")]
    if unknown:
        raise SpecError(f"model.{unknown[0]}: unknown key for family {family}")
    out = {"family": family, **({"preset": out["preset"]} if "preset" in out else {}), **DEFAULTS[family], **out}
    _VALIDATORS[family](out)
    return out


# ---------------------------------------------------------------- field checks (mutate in place)


def _int(spec: dict, key: str, low: int) -> None:
    value = spec[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"model.{key}: must be an integer, got {value!r}")
    if value < low:
        raise SpecError(f"model.{key}: must be >= {low}, got {value}")


def _float(spec: dict, key: str, low: float, high: float, high_open: bool = False) -> None:
    """Check a number in [low, high] (or [low, high)) and store it as a float."""
    value = spec[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(f"model.{key}: must be a number, got {value!r}")
    if value < low or value > high or (high_open and value == high):
        bounds = f"[{low}, {high})" if high_open else f"[{low}, {high}]"
        raise SpecError(f"model.{key}: must be in {bounds}, got {value}")
    spec[key] = float(value)


def _bool(spec: dict, key: str) -> None:
    if not isinstance(spec[key], bool):
        raise SpecError(f"model.{key}: must be true or false, got {spec[key]!r}")


def _choice(spec: dict, key: str, choices: tuple[str, ...]) -> None:
    if spec[key] not in choices:
        raise SpecError(f"model.{key}: must be one of {', '.join(choices)}, got {spec[key]!r}")


def _common(spec: dict) -> None:
    _int(spec, "num_classes", 1)
    _int(spec, "image_size", 1)
    _int(spec, "in_channels", 1)


# ---------------------------------------------------------------- CCT


def cct_tokenizer_stages(spec: dict) -> list[tuple[str, int, int, int]]:
    """The tokenizer's windows in order as ("conv" | "pool", kernel, stride, padding)."""
    k = spec["tokenizer_kernel"]
    conv = ("conv", k, spec["tokenizer_stride"], max(1, k // 2))
    pool = ("pool", 3, 2, 1)
    return ([conv, pool] if spec["pool"] else [conv]) * spec["tokenizer_layers"]


def cct_grid(spec: dict) -> int:
    """Side of the token map that the tokenizer makes from a `image_size` square image."""
    size = spec["image_size"]
    for i, (kind, kernel, stride, padding) in enumerate(cct_tokenizer_stages(spec)):
        if size < kernel:
            raise SpecError(
                f"model.image_size: {spec['image_size']} is not usable by the "
                f"tokenizer (its layer {i}, a {kernel}x{kernel} {kind}, "
                f"gets {size} px)"
            )
        size = (size + 2 * padding - kernel) // stride + 1
    return size


def cct_hidden(spec: dict) -> int:
    """Hidden width of the transformer MLP."""
    return int(spec["width"] * spec["mlp_ratio"])


def _validate_cct(spec: dict) -> None:
    _common(spec)
    for key in ("width", "blocks", "heads", "head_dim", "tokenizer_layers", "tokenizer_kernel", "tokenizer_channels"):
        _int(spec, key, 1)
    if spec["tokenizer_stride"] is None:
        spec["tokenizer_stride"] = max(1, spec["tokenizer_kernel"] // 2 - 1)
    _int(spec, "tokenizer_stride", 1)
    _float(spec, "mlp_ratio", 0.0, float("inf"))
    if cct_hidden(spec) < 1:
        raise SpecError(f"model.mlp_ratio: width * mlp_ratio must be >= 1, got {spec['mlp_ratio']}")
    _bool(spec, "pool")
    _bool(spec, "seq_pool")
    _choice(spec, "pos_embedding", ("learnable", "sine", "none"))
    for key in ("dropout", "attn_dropout", "stochastic_depth"):
        _float(spec, key, 0.0, 1.0, high_open=True)
    _int(spec, "n_conv_blocks", 0)
    if spec["n_conv_blocks"] > spec["blocks"]:
        raise SpecError(f"model.n_conv_blocks: {spec['n_conv_blocks']} exceeds model.blocks ({spec['blocks']})")
    cct_grid(spec)


# ---------------------------------------------------------------- VGG


def vgg_channels(spec: dict) -> list[int | str]:
    """`layers` with every conv width scaled by `width_mult` (at least one channel)."""
    return [x if x == "M" else max(1, round(x * spec["width_mult"])) for x in spec["layers"]]


def vgg_fc_widths(spec: dict) -> list[int]:
    """`fc_hidden` scaled by `width_mult` (at least one node)."""
    return [max(1, round(x * spec["width_mult"])) for x in spec["fc_hidden"]]


def vgg_grid(spec: dict) -> int:
    """Side of the last conv map after all 2x2 max-pools."""
    size = spec["image_size"]
    for i, item in enumerate(spec["layers"]):
        if item == "M":
            if size % 2:
                raise SpecError(
                    f"model.image_size: {spec['image_size']} is not usable by the "
                    f"max-pools (layers[{i}] halves an odd size {size})"
                )
            size //= 2
    return size


def _validate_vgg(spec: dict) -> None:
    _common(spec)
    _bool(spec, "fc_bias")
    _float(spec, "width_mult", 0.0, float("inf"))
    layers = spec["layers"]
    if not isinstance(layers, list) or not any(x != "M" for x in layers):
        raise SpecError(f"model.layers: must be a list with at least one conv width, got {layers!r}")
    for i, item in enumerate(layers):
        if item != "M" and (isinstance(item, bool) or not isinstance(item, int) or item < 1):
            raise SpecError(f"model.layers[{i}]: must be a positive integer or 'M', got {item!r}")
    fc = spec["fc_hidden"]
    if not isinstance(fc, list):
        raise SpecError(f"model.fc_hidden: must be a list of widths, got {fc!r}")
    for i, item in enumerate(fc):
        if isinstance(item, bool) or not isinstance(item, int) or item < 1:
            raise SpecError(f"model.fc_hidden[{i}]: must be a positive integer, got {item!r}")
    if spec["width_mult"] <= 0:
        raise SpecError(f"model.width_mult: must be > 0, got {spec['width_mult']}")
    vgg_grid(spec)


# ---------------------------------------------------------------- EfficientNet


def _validate_efficientnet(spec: dict) -> None:
    _common(spec)
    _float(spec, "dropout", 0.0, 1.0, high_open=True)
    _float(spec, "stochastic_depth", 0.0, 1.0, high_open=True)


_VALIDATORS = {"cct": _validate_cct, "vgg": _validate_vgg, "efficientnet": _validate_efficientnet}
