"""VGG with BatchNorm for small images, as used by the AFCC pruning code.

`layers` lists conv widths (3x3, same padding, then BN and ReLU) and "M" for 2x2 max-pools; the
last map is flattened into one linear classifier (bias-free for `vgg11_afcc`).
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .spec import TapInfo, vgg_channels, vgg_grid
from .taps import TappedModel


class ConvBNReLU(nn.Sequential):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())


class VGG(TappedModel):
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
        self.classifier = nn.Linear(c_in * vgg_grid(spec) ** 2, spec["num_classes"],
                                    bias=spec["fc_bias"])

    def forward_logits(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))
