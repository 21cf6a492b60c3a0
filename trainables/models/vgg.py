"""VGG with BatchNorm for small images, as used by the AFCC pruning code.

`layers` lists conv widths (3x3, same padding, then BN and ReLU) and "M" for 2x2 max-pools; the
last map is flattened into the optional hidden FC layers `fc_hidden` (Linear + ReLU, taps `fc.{i}`)
and one linear classifier (bias-free for `vgg11_afcc`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .spec import TapInfo, vgg_channels, vgg_fc_widths, vgg_grid
from .taps import TappedModel


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
