"""VGG with BatchNorm for small images, as used by the AFCC pruning code.

`layers` lists conv widths (3x3, same padding, then BN and ReLU) and "M" for 2x2 max-pools; the
last map is flattened into the optional hidden FC layers `fc_hidden` (Linear + ReLU, taps `fc.{i}`)
and one linear classifier (bias-free for `vgg11_afcc`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .spec import Family, SpecError, TapInfo, check_bool, check_common, check_float, register_family
from .taps import TappedModel

# Every key a VGG spec may set.
DEFAULTS: dict[str, Any] = {
    "num_classes": 100,
    "image_size": 32,
    "in_channels": 3,
    "layers": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "fc_bias": True,
    "fc_hidden": [],
    "width_mult": 1.0,
}
_VGG11 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M"]

# Named variants: overrides of DEFAULTS (a new preset is one entry here).
PRESETS: dict[str, dict[str, Any]] = {
    "vgg11_afcc": {"fc_bias": False, "layers": _VGG11},
    # Two hidden FC layers (widths scaled by width_mult like the convs), for nodal pruning.
    "vgg11_fc": {"fc_bias": False, "fc_hidden": [512, 512], "layers": _VGG11},
    "vgg11_cifar": {},
}


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


def validate(spec: dict) -> None:
    check_common(spec)
    check_bool(spec, "fc_bias")
    check_float(spec, "width_mult", 0.0, float("inf"))
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


class ConvBNReLU(nn.Sequential):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())


class FCNodes(nn.Module):
    """A hidden FC layer (Linear + ReLU) whose output is shaped (B, nodes, 1, 1): to the analysis each
    node is a filter of a 1x1 map (tap kind "conv"), so FC nodes and filters share one code path."""

    def __init__(self, n_in: int, n_out: int, bias: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(n_in, n_out, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.linear(x.flatten(1)))[:, :, None, None]


class VGG(TappedModel):
    """Taps ``conv.k`` (every conv layer) and ``fc.i`` (hidden FC layers). Prunable: ``afcc`` (conv
    layer to conv layer, then the last conv map to the first FC layer) and, with hidden FC layers,
    ``nodal`` (FC layer to FC layer, then to the classifier)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec)
        layers: list[nn.Module] = []
        c_in = spec["in_channels"]
        for item in vgg_channels(spec):
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                self.add_tap(f"conv.{len(self.taps)}", f"features.{len(layers)}", TapInfo("conv"))
                layers.append(ConvBNReLU(c_in, item))
                c_in = item
        self.features = nn.Sequential(*layers)
        fc: list[nn.Module] = []
        n_in = c_in * vgg_grid(spec) ** 2
        for i, width in enumerate(vgg_fc_widths(spec)):
            self.add_tap(f"fc.{i}", f"fc.{i}", TapInfo("conv"))
            fc.append(FCNodes(n_in, width, spec["fc_bias"]))
            n_in = width
        self.fc = nn.Sequential(*fc)
        self.classifier = nn.Linear(n_in, spec["num_classes"], bias=spec["fc_bias"])
        self._declare_prunable()

    def _declare_prunable(self) -> None:
        convs = [t for t in self.taps if t.startswith("conv.")]
        fcs = [t for t in self.taps if t.startswith("fc.")]
        conv_paths = [self._tap_paths[t] for t in convs]  # the first conv reads pixels: kept whole
        for n, path in enumerate(conv_paths[1:]):
            self.add_connection("afcc", f"{path}.0.weight", convs[n], convs[n + 1])
        last = ("fc.0.linear.weight", "fc.0") if fcs else ("classifier.weight", None)
        self.add_connection("afcc", last[0], convs[-1], last[1])
        for i in range(1, len(fcs)):
            self.add_connection("nodal", f"fc.{i}.linear.weight", fcs[i - 1], fcs[i])
        if fcs:
            self.add_connection("nodal", "classifier.weight", fcs[-1], None)

    def forward_logits(self, x: Tensor) -> Tensor:
        return self.classifier(self.fc(self.features(x)).flatten(1))


register_family(Family("vgg", DEFAULTS, PRESETS, validate, VGG))
