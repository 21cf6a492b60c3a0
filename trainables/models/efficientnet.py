"""EfficientNet-B0 from torchvision with a stride-1 stem for 32 px images."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .spec import TapInfo
from .taps import TappedModel


class EfficientNet(TappedModel):
    """torchvision's EfficientNet-B0: `features.0` is the stem, 1-7 MBConv stages, 8 a 1x1 conv."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec)
        from torchvision.models import efficientnet_b0  # here: torchvision.models costs 1.5 s to import

        net = efficientnet_b0(
            weights=None,
            num_classes=spec["num_classes"],
            dropout=spec["dropout"],
            stochastic_depth_prob=spec["stochastic_depth"],
        )
        old = net.features[0][0]
        stem = nn.Conv2d(spec["in_channels"], old.out_channels, 3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(stem.weight, mode="fan_out")  # torchvision's conv init
        net.features[0][0] = stem
        self.features, self.avgpool, self.classifier = net.features, net.avgpool, net.classifier
        for i in range(len(self.features)):
            self.add_tap(f"stage.{i}", f"features.{i}", TapInfo("conv"))

    def forward_logits(self, x: Tensor) -> Tensor:
        return self.classifier(self.avgpool(self.features(x)).flatten(1))
