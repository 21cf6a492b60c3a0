"""The bias-free readout trained on a frozen tap (docs/methods.md 2.2).

- conv taps ``(N, C, H, W)``: flatten to ``C*H*W`` (row-major, so filter ``c`` owns the contiguous
  inputs ``c*H*W .. (c+1)*H*W - 1``), then a bias-free linear map to the labels.
- token taps ``(N, T, D)``: sequence pooling with a learnable vector ``w_p`` (``g = softmax_t(z @ w_p)``,
  ``pooled = sum_t g_t z_t``), then a bias-free linear map ``D -> C``. A bias on the pooling score
  would be constant over tokens and cancel in the softmax, so none is used.

Optionally the features are divided by one fixed scalar (their RMS over the training set) before
the readout. A global scalar changes nothing in the analysis (the unit fields are computed on the
same scaled inputs the readout sees) but makes the default learning rates independent of the
tap's activation scale.

Every recipe trains on **cached** features (tensors computed once by ``features.collect_features``,
possibly stored as float16; each batch is moved to ``device`` and cast to float32):

- ``"paper"``: the authors' schedule. SGD Nesterov, lr 0.01, momentum 0.975, weight decay 1e-3,
  lr x0.975 per epoch, batch 100, 200 epochs, raw (unscaled) features. **Difference from the
  authors:** they recompute the tap features per batch from augmented images (±4 px shifts,
  flips); here the readout sees the cached features of the non-augmented training set.
- ``"paper100"`` (our default): the same schedule stopped after epoch 100, when the learning rate
  has fallen to 8 % of its start. On a trained narrow CCT the remaining 100 epochs move readout
  accuracy by at most 0.2 points and labels per unit and SNR by at most 5 % at every tap, less
  than or about as much as another shuffle seed (``benchmarks/readout_ingredients.py``).
- ``"lbfgs"``: the optimum of the same L2-penalised objective (mean cross-entropy plus
  ``weight_decay / 2 * ||theta||^2``), found by full-batch L-BFGS (``lbfgs.py``). It is **not** the
  authors' answer: their 200 decaying-lr epochs stop far from that optimum (early stopping acts as
  a much stronger penalty), and the optimum overfits the token taps. Kept for that comparison.

The minibatch recipes train all taps of one feature shape together (``stacked.py``), which gives
each tap the trajectory it would follow alone.
Overrides of a minibatch recipe (``optimizer="adamw"``, ``weight_decay``, ``epochs``, ...) give the
variants that ``benchmarks/readout_ingredients.py`` compares.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from .lbfgs import solve_conv, solve_token
from .stacked import StackedReadouts, train_stacked

_PAPER = dict(
    solver="minibatch",
    optimizer="sgd_nesterov",
    lr=0.01,
    momentum=0.975,
    weight_decay=1e-3,
    batch_size=100,
    epochs=200,
    schedule="exp0.975",
    scale_features=False,
)
RECIPES: dict[str, dict] = {
    "paper100": {**_PAPER, "epochs": 100},
    "paper": _PAPER,
    "lbfgs": dict(solver="lbfgs", weight_decay=1e-3, max_iter=300, tolerance=1e-5, scale_features=True),
}
DEFAULT_RECIPE = "paper100"
# Options a recipe may be given beyond its own (the minibatch solver's knobs, for ablations).
MINIBATCH_OPTIONS = {
    "optimizer",
    "lr",
    "momentum",
    "weight_decay",
    "batch_size",
    "epochs",
    "schedule",
    "scale_features",
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
        part = x[start : start + chunk].float()
        total += float(part.square().sum(dtype=torch.float64))
        count += part.numel()
    rms = math.sqrt(total / max(count, 1))
    return rms if rms > 0 else 1.0


@torch.no_grad()
def evaluate(
    readout: Readout, x: Tensor, y: Tensor, batch_size: int = 512, device: str | torch.device | None = None
) -> float:
    """Top-1 accuracy of the readout on features ``x`` with labels ``y``."""
    device = device or readout.fc.weight.device
    readout.eval()
    correct = 0
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size].to(device)
        yb = y[start : start + batch_size].to(device)
        correct += int((readout(xb).argmax(1) == yb).sum())
    return correct / max(x.shape[0], 1)


def readout_config(recipe: str, overrides: dict | None = None) -> dict:
    """The recipe's settings with ``overrides`` applied; raises ``ValueError`` naming a bad recipe or option."""
    if recipe not in RECIPES:
        raise ValueError(f"readout recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    allowed = set(RECIPES[recipe]) - {"solver"}
    if RECIPES[recipe]["solver"] == "minibatch":
        allowed |= MINIBATCH_OPTIONS
    unknown = sorted(set(overrides or {}) - allowed)
    if unknown:
        raise ValueError(
            f"readout option {unknown[0]!r} does not apply to recipe {recipe!r} (options: {', '.join(sorted(allowed))})"
        )
    return {**RECIPES[recipe], **(overrides or {}), "recipe": recipe}


def train_readouts(
    features: dict[str, Tensor],
    kinds: dict[str, str],
    train_y: Tensor,
    num_classes: int,
    recipe: str = DEFAULT_RECIPE,
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
    **overrides,
) -> dict[str, ReadoutResult]:
    """Train one fresh bias-free readout per tap on cached features ``{tap: (N, ...)}``.

    Minibatch recipes train all taps of the same kind and feature shape in one stacked loop
    (``stacked.py``: exact, each tap gets the trajectory it would get alone with the same shuffle);
    the ``lbfgs`` solver fits one tap at a time. Results carry train accuracy; test accuracy is
    filled in by the caller's test pass (0.0 here).
    """
    cfg = readout_config(recipe, overrides)
    device = torch.device(device)
    train_y = train_y.long().to(device)
    for tap, x in features.items():
        kind = kinds[tap]
        if kind == "conv" and x.dim() != 4 or kind == "token" and x.dim() != 3:
            raise ValueError(f"{tap}: {kind} tap features have the wrong shape {tuple(x.shape)}")
    results: dict[str, ReadoutResult] = {}
    if cfg["solver"] == "lbfgs":
        for tap, x in features.items():
            results[tap] = _fit_lbfgs(x, train_y, kinds[tap], num_classes, cfg, device)
        return results
    groups: dict[tuple, list[str]] = {}
    for tap, x in features.items():
        groups.setdefault((kinds[tap], tuple(x.shape[1:])), []).append(tap)
    for (kind, shape), taps in groups.items():
        in_features = math.prod(shape) if kind == "conv" else shape[-1]
        scales = [feature_rms(features[t]) if cfg["scale_features"] else 1.0 for t in taps]
        stacked = StackedReadouts(kind, len(taps), in_features, num_classes, scales).to(device)
        group = torch.stack([features[t] for t in taps]) if len(taps) > 1 else features[taps[0]].unsqueeze(0)
        losses = train_stacked(group, train_y, stacked, cfg, seed)
        del group
        for i, tap in enumerate(taps):
            readout = Readout(kind, in_features, num_classes, scale=scales[i]).to(device)
            with torch.no_grad():
                readout.fc.weight.copy_(stacked.weight[i])
                if kind == "token":
                    readout.pool.copy_(stacked.pool[i])
            results[tap] = ReadoutResult(
                readout=readout.eval(),
                test_accuracy=0.0,
                train_accuracy=evaluate(readout, features[tap], train_y),
                recipe={**cfg, "stacked_with": len(taps)},
                losses=losses,
            )
    return results


def _fit_lbfgs(x: Tensor, y: Tensor, kind: str, num_classes: int, cfg: dict, device: torch.device) -> ReadoutResult:
    in_features = x[0].numel() if kind == "conv" else x.shape[-1]
    scale = feature_rms(x) if cfg["scale_features"] else 1.0
    readout = Readout(kind, in_features, num_classes, scale=scale).to(device)
    solve = solve_conv if kind == "conv" else solve_token
    report = solve(readout, x, y, cfg["weight_decay"] / scale**2, int(cfg["max_iter"]), float(cfg["tolerance"]))
    return ReadoutResult(
        readout=readout.eval(),
        test_accuracy=0.0,
        train_accuracy=evaluate(readout, x, y),
        recipe={**cfg, "solver_report": asdict(report)},
        losses=[report.objective],
    )


def train_readout(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    kind: str,
    num_classes: int,
    recipe: str = DEFAULT_RECIPE,
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
    **overrides,
) -> ReadoutResult:
    """Train a fresh bias-free readout on one tap's cached features; report train and test accuracy.

    ``train_x``/``test_x`` are tap features, ``(N, C, H, W)`` for ``kind="conv"`` or ``(N, T, D)`` for
    ``kind="token"``, any float dtype, on any device (batches are moved to ``device``).
    ``recipe`` picks the defaults in ``RECIPES``; keyword ``overrides`` replace any of them (see
    ``readout_config``).
    """
    result = train_readouts(
        {"tap": train_x}, {"tap": kind}, train_y, num_classes, recipe, device=device, seed=seed, **overrides
    )["tap"]
    result.test_accuracy = evaluate(result.readout, test_x, test_y.long(), device=device)
    return result
