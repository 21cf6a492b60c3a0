"""Minibatch readout training for several taps at once: one loop, one batched step for all.

The readouts of K taps with the same feature shape are held as stacked parameters (pooling
vectors (K, D) for token taps, weights (K, C, F)). Each step draws one minibatch of images (one
shuffle shared by the K taps), computes all K readouts with batched products, and minimises the
**sum** of the K mean cross-entropies. Every parameter belongs to exactly one tap and the optimizer
works element-wise (SGD with momentum and weight decay, AdamW), so each tap's readout follows
exactly the trajectory it would follow if trained alone with the same shuffle: stacking changes
the speed, not the answer (``tests/test_readout_fidelity.py`` checks it). On a CPU the step of a
small token readout is mostly framework overhead, which K taps now share.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn


class StackedReadouts(nn.Module):
    """K bias-free readouts of one kind and feature shape, computed together on (K, B, ...) inputs."""

    def __init__(self, kind: str, taps: int, in_features: int, num_classes: int, scales: list[float]):
        super().__init__()
        self.kind = kind
        self.register_buffer("scales", torch.tensor(scales, dtype=torch.float32).reshape(taps, 1, 1))
        self.pool = nn.Parameter(torch.zeros(taps, in_features)) if kind == "token" else None
        self.weight = nn.Parameter(torch.zeros(taps, num_classes, in_features))

    def forward(self, x: Tensor) -> Tensor:
        """Logits (K, B, C) of inputs (K, B, C, H, W) for conv taps or (K, B, T, D) for token taps."""
        if self.kind == "conv":
            r = x.flatten(2) / self.scales
        else:
            g = torch.softmax(torch.einsum("kbtd,kd->kbt", x, self.pool) / self.scales, dim=-1)
            r = torch.einsum("kbt,kbtd->kbd", g, x) / self.scales
        return torch.bmm(r, self.weight.transpose(1, 2))


def optimizer(params, cfg: dict) -> torch.optim.Optimizer:
    """The recipe's optimizer: ``sgd_nesterov`` (the authors') or ``adamw``."""
    if cfg["optimizer"] == "adamw":
        return torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    if cfg["optimizer"] == "sgd_nesterov":
        return torch.optim.SGD(
            params, lr=cfg["lr"], momentum=cfg["momentum"], nesterov=True, weight_decay=cfg["weight_decay"]
        )
    raise ValueError(f"unknown optimizer {cfg['optimizer']!r}")


def lr_factor(cfg: dict, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Learning-rate multiplier: ``exp0.975`` (x0.975 per epoch, the authors'), ``cosine`` or ``constant``."""
    if cfg["schedule"] == "cosine":
        progress = (epoch * steps_per_epoch + step) / (cfg["epochs"] * steps_per_epoch)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg["schedule"] == "exp0.975":
        return 0.975**epoch
    if cfg["schedule"] == "constant":
        return 1.0
    raise ValueError(f"unknown schedule {cfg['schedule']!r}")


def train_stacked(
    features: Tensor,
    labels: Tensor,
    stacked: StackedReadouts,
    cfg: dict,
    seed: int,
    on_epoch: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``stacked`` on cached features (K, N, ...) of K taps; mean loss per tap and epoch.

    ``labels`` (N,) lives on the readouts' device; features may be float16 anywhere (each batch is
    gathered, moved and cast to float32). Returns the mean over taps of each epoch's mean loss.
    """
    device = stacked.weight.device
    opt = optimizer(stacked.parameters(), cfg)
    base_lrs = [g["lr"] for g in opt.param_groups]
    gen = torch.Generator().manual_seed(seed)
    n, bs, k = labels.shape[0], int(cfg["batch_size"]), features.shape[0]
    steps = max(1, math.ceil(n / bs))
    losses: list[float] = []
    for epoch in range(int(cfg["epochs"])):
        stacked.train()
        order = torch.randperm(n, generator=gen)
        total = torch.zeros((), device=device)
        for step in range(steps):
            factor = lr_factor(cfg, epoch, step, steps)
            for g, lr in zip(opt.param_groups, base_lrs):
                g["lr"] = lr * factor
            idx = order[step * bs : (step + 1) * bs]
            xb = features[:, idx.to(features.device)].to(device, torch.float32)
            yb = labels[idx.to(device)]
            logits = stacked(xb)
            loss = (
                nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), yb.repeat(k), reduction="sum")
                / idx.numel()
            )  # sum over taps of mean CE
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * idx.numel()
        losses.append(float(total) / (n * k))
        if on_epoch is not None:
            on_epoch(epoch, losses[-1])
    return losses
