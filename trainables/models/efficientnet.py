"""EfficientNet-B0 from torchvision with a stride-1 stem for 32 px images."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .spec import Family, TapInfo, check_common, check_float, register_family
from .taps import TappedModel

# Every key an EfficientNet spec may set.
DEFAULTS: dict[str, Any] = {
    "num_classes": 100,
    "image_size": 32,
    "in_channels": 3,
    "dropout": 0.2,
    "stochastic_depth": 0.2,
}
PRESETS: dict[str, dict[str, Any]] = {"efficientnet_b0": {}}  # a new preset is one entry here


def validate(spec: dict) -> None:
    check_common(spec)
    check_float(spec, "dropout", 0.0, 1.0, high_open=True)
    check_float(spec, "stochastic_depth", 0.0, 1.0, high_open=True)


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


register_family(Family("efficientnet", DEFAULTS, PRESETS, validate, EfficientNet))
