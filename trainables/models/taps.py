"""Reading intermediate layers ("taps") by name, and counting parameters and MACs.

A model subclasses `TappedModel`, implements `forward_logits`, and declares each tap with
`add_tap(name, module_path, info)`. `model(x, taps=[...])` then hooks exactly those modules for one
forward pass and returns `(logits, {name: output})`. Next to its taps a model declares the weights
that cluster-guided pruning may cut (`add_connection`): which parameter connects which tap's units
to which, grouped by pruning method, so pruning code needs no family's module paths.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from .spec import TapInfo

Capture = Callable[[nn.Module, tuple, dict, Any], Tensor]  # (module, args, kwargs, output) -> tap value


@dataclass(frozen=True)
class Connection:
    """A prunable weight: parameter ``param`` connects the units of tap ``inputs`` to those of tap
    ``outputs``; ``outputs`` None means the class labels (the output rule of docs/methods.md 5)."""

    param: str
    inputs: str
    outputs: str | None


class TappedModel(nn.Module):
    """Base class: a classifier whose named intermediate outputs can be returned with the logits."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self.spec = spec
        self.num_classes: int = spec["num_classes"]
        self.image_size: int = spec["image_size"]
        self.in_channels: int = spec["in_channels"]
        self.taps: dict[str, TapInfo] = {}  # in depth order
        self._tap_paths: dict[str, str] = {}
        self._tap_captures: dict[str, Capture] = {}  # taps whose value is not the module's output
        # pruning method -> its connections in depth order; the first method is the family's own
        self.prunable: dict[str, list[Connection]] = {}

    def add_tap(self, name: str, module_path: str, info: TapInfo, capture: Capture | None = None) -> None:
        """Declare that the output of submodule `module_path` is readable as tap `name`; or, given
        ``capture(module, args, kwargs, output)``, what that returns from the module's call."""
        self.taps[name] = info
        self._tap_paths[name] = module_path
        if capture is not None:
            self._tap_captures[name] = capture

    def add_connection(self, method: str, param: str, inputs: str, outputs: str | None) -> None:
        """Declare that pruning ``method`` may cut weight ``param`` between two taps' units."""
        self.prunable.setdefault(method, []).append(Connection(param, inputs, outputs))

    def forward_logits(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor, taps: Sequence[str] | None = None) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Logits, or `(logits, {name: output})` when tap names are given."""
        if taps is None:
            return self.forward_logits(x)
        for name in taps:
            if name not in self.taps:
                raise ValueError(f"tap {name!r}: unknown (known: {', '.join(self.taps)})")
        captured: dict[str, Tensor] = {}
        handles = []
        for name in taps:
            module = self.get_submodule(self._tap_paths[name])
            capture = self._tap_captures.get(name, _output)
            handles.append(module.register_forward_hook(partial(_store, captured, name, capture), with_kwargs=True))
        try:
            logits = self.forward_logits(x)
        finally:
            for handle in handles:
                handle.remove()
        return logits, {name: captured[name] for name in taps}


def _output(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor:
    return output


def _store(captured: dict[str, Tensor], name: str, capture: Capture, module: nn.Module, args, kwargs, output) -> None:
    captured[name] = capture(module, args, kwargs, output)


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers such as fixed sine positions are not counted)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: TappedModel) -> int:
    """Multiply-accumulates for one image: convs, linears and modules with a `matmul_macs` method.

    Counted from the shapes seen in one eval-mode forward pass of a batch of one; normalisation,
    activations and pooling are not counted.
    """
    total = 0

    def conv_or_linear(module: nn.Module, args: Any, output: Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += output.numel() * (module.in_channels // module.groups) * kh * kw
        else:
            total += output.numel() * module.in_features

    def matmuls(module: nn.Module, args: Any, output: Tensor) -> None:
        nonlocal total
        total += module.matmul_macs(args[0])

    handles = []
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            handles.append(module.register_forward_hook(conv_or_linear))
        elif hasattr(module, "matmul_macs"):
            handles.append(module.register_forward_hook(matmuls))
    param = next(model.parameters())
    x = torch.zeros(1, model.in_channels, model.image_size, model.image_size, device=param.device, dtype=param.dtype)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return total
