"""The bias-free readout trained on a frozen tap (methods.md 2.2).

- conv taps ``(N, C, H, W)``: flatten to ``C*H*W`` (row-major, so filter ``c`` owns the contiguous
  inputs ``c*H*W .. (c+1)*H*W - 1``), then a bias-free linear map to the labels.
- token taps ``(N, T, D)``: sequence pooling with a learnable vector ``w_p`` (``g = softmax_t(z @ w_p)``,
  ``pooled = sum_t g_t z_t``), then a bias-free linear map ``D -> C``. A bias on the pooling score
  would be constant over tokens and cancel in the softmax, so none is used.

Optionally the features are divided by one fixed scalar (their RMS over the training set) before
the readout. A global scalar changes nothing in the analysis (the unit fields are computed on the
same scaled inputs the readout sees) but makes the default learning rates independent of the
tap's activation scale.

Both recipes train on **cached** features (tensors computed once by ``features.collect_features``,
possibly stored as float16 on the CPU; each batch is moved to ``device`` and cast to float32):

- ``"fast"`` (our default): AdamW, lr 2e-3, weight decay 1e-4, batch 256, 30 epochs, cosine decay
  per step, features scaled by their RMS.
- ``"paper"``: SGD Nesterov, lr 0.01, momentum 0.975, weight decay 1e-3, lr x0.975 per epoch,
  batch 100, 200 epochs, raw (unscaled) features. **Difference from the authors:** they recompute
  the tap features per batch from augmented images (±4 px shifts, flips); here the readout sees
  the cached features of the non-augmented training set, so it gets no augmentation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

RECIPES: dict[str, dict] = {
    "fast": dict(optimizer="adamw", lr=2e-3, weight_decay=1e-4, batch_size=256, epochs=30,
                 schedule="cosine", scale_features=True),
    "paper": dict(optimizer="sgd_nesterov", lr=0.01, momentum=0.975, weight_decay=1e-3,
                  batch_size=100, epochs=200, schedule="exp0.975", scale_features=False),
}


class Readout(nn.Module):
    """Bias-free linear readout of a conv tap, or sequence pooling + bias-free linear for a token tap."""

    def __init__(self, kind: str, in_features: int, num_classes: int, scale: float = 1.0):
        super().__init__()
        if kind not in ("conv", "token"):
            raise ValueError(f"kind must be 'conv' or 'token', got {kind!r}")
        self.kind = kind
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.pool = nn.Parameter(torch.zeros(in_features)) if kind == "token" else None
        self.fc = nn.Linear(in_features, num_classes, bias=False)
        nn.init.zeros_(self.fc.weight)

    def pool_weights(self, z: Tensor) -> Tensor:
        """Token weights ``g`` (N, T) of the sequence pooling, for token taps."""
        return torch.softmax((z @ self.pool) / self.scale, dim=1)  # = softmax((z / scale) @ pool), no full-size divide

    def readout_input(self, z: Tensor) -> Tensor:
        """The vector the linear map reads: flattened (conv) or sequence-pooled (token), scaled."""
        z = z.to(self.fc.weight.dtype)
        if self.kind == "conv":
            return z.flatten(1) / self.scale
        g = self.pool_weights(z)
        return torch.einsum("nt,ntd->nd", g, z) / self.scale

    def forward(self, z: Tensor) -> Tensor:
        return self.fc(self.readout_input(z))


@dataclass
class ReadoutResult:
    """A trained readout and its accuracies (fractions in [0, 1])."""

    readout: Readout
    test_accuracy: float
    train_accuracy: float
    recipe: dict = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)  # mean training loss per epoch

    @property
    def weight(self) -> Tensor:
        """Readout weight ``W`` (C, F) acting on ``readout.readout_input(z)``."""
        return self.readout.fc.weight.detach()


def feature_rms(x: Tensor, chunk: int = 256) -> float:
    """Root mean square of a (possibly float16, possibly huge) feature tensor, computed in chunks."""
    total, count = 0.0, 0
    for start in range(0, x.shape[0], chunk):
        part = x[start:start + chunk].float()
        total += float(part.square().sum(dtype=torch.float64))
        count += part.numel()
    rms = math.sqrt(total / max(count, 1))
    return rms if rms > 0 else 1.0


@torch.no_grad()
def evaluate(readout: Readout, x: Tensor, y: Tensor, batch_size: int = 512,
             device: str | torch.device | None = None) -> float:
    """Top-1 accuracy of the readout on features ``x`` with labels ``y``."""
    device = device or readout.fc.weight.device
    readout.eval()
    correct = 0
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size].to(device)
        yb = y[start:start + batch_size].to(device)
        correct += int((readout(xb).argmax(1) == yb).sum())
    return correct / max(x.shape[0], 1)


def _optimizer(params, cfg: dict) -> torch.optim.Optimizer:
    if cfg["optimizer"] == "adamw":
        return torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    if cfg["optimizer"] == "sgd_nesterov":
        return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], nesterov=True,
                               weight_decay=cfg["weight_decay"])
    raise ValueError(f"unknown optimizer {cfg['optimizer']!r}")


def _lr_factor(cfg: dict, epoch: int, step: int, steps_per_epoch: int) -> float:
    if cfg["schedule"] == "cosine":
        progress = (epoch * steps_per_epoch + step) / (cfg["epochs"] * steps_per_epoch)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg["schedule"] == "exp0.975":
        return 0.975 ** epoch
    if cfg["schedule"] == "constant":
        return 1.0
    raise ValueError(f"unknown schedule {cfg['schedule']!r}")


def train_readout(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    kind: str,
    num_classes: int,
    recipe: str = "fast",
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
    on_epoch: Callable[[int, float], None] | None = None,
    **overrides,
) -> ReadoutResult:
    """Train a fresh bias-free readout on cached tap features; report train and test accuracy.

    ``train_x``/``test_x`` are tap features, ``(N, C, H, W)`` for ``kind="conv"`` or ``(N, T, D)`` for
    ``kind="token"``, any float dtype, on any device (batches are moved to ``device``).
    ``recipe`` picks the defaults in ``RECIPES``; keyword ``overrides`` replace any of them
    (``epochs``, ``lr``, ``batch_size``, ``weight_decay``, ``momentum``, ``schedule``,
    ``scale_features``). ``on_epoch(epoch, mean_loss)`` is called after each epoch.
    """
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {recipe!r}")
    unknown = set(overrides) - set(RECIPES[recipe]) - {"momentum"}
    if unknown:
        raise ValueError(f"unknown readout options {sorted(unknown)}")
    cfg = {**RECIPES[recipe], **overrides, "recipe": recipe}
    if kind == "conv" and train_x.dim() != 4 or kind == "token" and train_x.dim() != 3:
        raise ValueError(f"{kind} tap features have the wrong shape {tuple(train_x.shape)}")

    in_features = train_x[0].numel() if kind == "conv" else train_x.shape[-1]
    scale = feature_rms(train_x) if cfg["scale_features"] else 1.0
    readout = Readout(kind, in_features, num_classes, scale=scale).to(device)
    opt = _optimizer(readout.parameters(), cfg)
    base_lrs = [g["lr"] for g in opt.param_groups]
    gen = torch.Generator().manual_seed(seed)
    n, bs = train_x.shape[0], int(cfg["batch_size"])
    steps = max(1, math.ceil(n / bs))
    train_y = train_y.long()
    losses: list[float] = []

    for epoch in range(int(cfg["epochs"])):
        readout.train()
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for step in range(steps):
            factor = _lr_factor(cfg, epoch, step, steps)
            for g, lr in zip(opt.param_groups, base_lrs):
                g["lr"] = lr * factor
            idx = order[step * bs:(step + 1) * bs]
            xb = train_x[idx.to(train_x.device)].to(device, torch.float32)
            yb = train_y[idx.to(train_y.device)].to(device)
            loss = nn.functional.cross_entropy(readout(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * idx.numel()
        losses.append(total / n)
        if on_epoch is not None:
            on_epoch(epoch, losses[-1])

    return ReadoutResult(
        readout=readout.eval(),
        test_accuracy=evaluate(readout, test_x, test_y.long(), device=device),
        train_accuracy=evaluate(readout, train_x, train_y, device=device),
        recipe=cfg,
        losses=losses,
    )
