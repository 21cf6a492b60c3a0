"""The whole single-unit analysis of a frozen model (docs/methods.md 2.2-2.9), in memory.

1. Train features: taps are packed into groups whose float16 cache fits ``max_bytes``; one forward
   pass over the training split per group, then one readout per tap on the cached features (the
   taps of a group with the same feature shape trained together, ``readout.train_readouts``).
2. Test split: **one** forward pass for all taps. Test features are never cached: each batch is
   reduced at once to per-label sums of every readout's input (``TapAccumulator``), which is all
   the unit matrices need (``matrices.unit_matrices``), plus the readout's correct count.
3. Per tap: unit matrices by unit kind (float32, exactly as ``matrices.npz`` stores them), clusters,
   noise, SNR, coverage and head structure (``summary.summarise_tap``).

Imports only torch and numpy (no ray, mlflow or optuna).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from trainables.device import pick_device
from trainables.schema import InputError, Settings, setting

from .clusters import DEFAULT_THRESHOLD
from .features import collect_features
from .matrices import kind_matrices
from .readout import (
    DEFAULT_RECIPE,
    RECIPES,
    Readout,
    ReadoutResult,
    readout_config,
    train_readouts,
)
from .summary import summarise_tap

Transform = Callable[[np.ndarray], Tensor]


@dataclass(frozen=True)
class AnalysisConfig(Settings):
    """Settings of one single-unit analysis (``analyze:`` in a sweep, flags of ``analysis.units.run`` and
    ``orchestrator analyze``, the label sets of a prune job)."""

    SECTION = "analysis"

    taps: tuple[str, ...] | None = setting(None, "tap names, comma-separated (default: all)")
    threshold: float = setting(DEFAULT_THRESHOLD, "binarisation threshold of the unit matrices", gt=0, lt=1)
    recipe: str = setting(DEFAULT_RECIPE, "readout recipe", choices=tuple(RECIPES))
    readout_epochs: int | None = setting(None, "override the epochs of a minibatch recipe (paper100, paper)", low=1)
    readout_max_iter: int | None = setting(None, "override the lbfgs recipe's iterations", low=1)
    train_size: int | None = setting(None, "first N training images for the readouts (default: all)", low=1)
    test_size: int | None = setting(None, "class-balanced N test images for the matrices (default: all)", low=1)
    batch_size: int = setting(256, "images per forward pass", low=1)
    max_gib: float = setting(4.0, "limit of cached training features per group of taps (GiB)", gt=0)
    save_matrices: bool = setting(True, "write matrices.npz")
    device: str = setting("auto", choices=("auto", "cpu", "cuda"))

    def check(self) -> None:
        if self.taps is not None and not self.taps:
            raise InputError("taps", "needs at least one tap name")
        try:
            readout_config(self.recipe, self.readout_options)
        except ValueError as exc:
            field = "readout_epochs" if self.readout_epochs else "readout_max_iter"
            raise InputError(field, str(exc)) from None

    @property
    def readout_options(self) -> dict | None:
        """Overrides of the readout recipe (``readout.readout_config``), None when none are set."""
        out = {
            **({"epochs": self.readout_epochs} if self.readout_epochs else {}),
            **({"max_iter": self.readout_max_iter} if self.readout_max_iter else {}),
        }
        return out or None

    @property
    def max_bytes(self) -> int:
        return int(self.max_gib * 2**30)

    def model_taps(self, model: nn.Module) -> list[str]:
        """The taps to analyse (all when ``taps`` is None), in the model's depth order."""
        if self.taps is None:
            return list(model.taps)
        unknown = [t for t in self.taps if t not in model.taps]
        if unknown:
            raise InputError("--taps", f"unknown tap {unknown[0]!r} (known: {', '.join(model.taps)})")
        return [t for t in model.taps if t in set(self.taps)]

    def resolved_device(self) -> torch.device:
        return pick_device(self.device, "--device")


@dataclass
class AnalysisResult:
    """Everything one analysis produced, before it is written to disk."""

    # tap -> summarise_tap output (its head structure as "heads_structure", None for other taps)
    # plus kind, heads, head_dim, feature_shape, train_accuracy
    taps: dict[str, dict]
    matrices: dict[str, dict[str, np.ndarray]]  # tap -> unit kind -> (U, L, C) float32 (what clusters use)
    readouts: dict[str, ReadoutResult]  # tap -> trained readout (test accuracy set from the test pass)
    meta: dict = field(default_factory=dict)  # threshold, recipe, sizes, groups, timings
    train_rows: np.ndarray | None = None  # rows of the source training split the readouts saw
    test_rows: np.ndarray | None = None  # rows of the source test split the matrices average over


def tap_shapes(model: nn.Module, sample: Tensor, taps: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Per-sample feature shape of each tap, from one forward pass of a single input."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _, feats = model(sample[:1], taps=list(taps))
    finally:
        model.train(was_training)
    return {t: tuple(feats[t].shape[1:]) for t in taps}


def plan_groups(
    shapes: dict[str, tuple[int, ...]], n_samples: int, max_bytes: int, bytes_per_value: int = 2
) -> list[list[str]]:
    """Pack taps, in order, into groups whose cached features of ``n_samples`` fit ``max_bytes``.

    Raises ``MemoryError`` naming the tap when one tap alone does not fit.
    """
    groups: list[list[str]] = []
    used = max_bytes + 1
    for tap, shape in shapes.items():
        need = int(np.prod(shape)) * bytes_per_value * n_samples
        if need > max_bytes:
            raise MemoryError(
                f"tap {tap}: {n_samples} training samples need {need / 2**30:.2f} GiB of "
                f"features, over the {max_bytes / 2**30:.2f} GiB limit (fewer training "
                f"images or a larger limit)"
            )
        if used + need > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(tap)
        used += need
    return groups


class TapAccumulator:
    """Per-label sums of a readout's input and its correct count, fed batch by batch."""

    def __init__(self, readout: Readout, num_labels: int, device: torch.device):
        self.readout = readout.eval()
        self.sums = torch.zeros(num_labels, readout.fc.in_features, dtype=torch.float64, device=device)
        self.counts = torch.zeros(num_labels, dtype=torch.float64, device=device)
        self.correct = 0

    @torch.no_grad()
    def add(self, features: Tensor, labels: Tensor) -> None:
        r = self.readout.readout_input(features)
        self.sums.index_add_(0, labels, r.double())
        self.counts.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
        self.correct += int((self.readout.fc(r).argmax(1) == labels).sum())

    def means(self) -> np.ndarray:
        """Class-conditional means (L, F); labels without samples get zeros."""
        return (self.sums / self.counts.clamp(min=1.0)[:, None]).cpu().numpy()

    @property
    def accuracy(self) -> float:
        return self.correct / max(int(self.counts.sum()), 1)


def matrices_from_means(
    readout: Readout,
    means: np.ndarray,
    kind: str,
    feature_shape: tuple[int, ...],
    head_dim: int | None,
    rtol: float = 1e-6,
) -> dict[str, np.ndarray]:
    """Float32 unit matrices of every unit kind of a tap (``matrices.kind_matrices``)."""
    weight = readout.fc.weight.detach().double().cpu().numpy()
    return kind_matrices(means, weight, kind, (1, *feature_shape), head_dim, rtol)


@torch.no_grad()
def accumulate_test_split(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    transform: Transform,
    accumulators: dict[str, TapAccumulator],
    device: torch.device,
    batch_size: int,
) -> None:
    """One forward pass over the test split feeding every tap's accumulator."""
    was_training = model.training
    model.eval()
    taps = list(accumulators)
    try:
        for start in range(0, len(labels), batch_size):
            x = transform(images[start : start + batch_size])
            y = torch.from_numpy(np.asarray(labels[start : start + batch_size])).to(device)
            _, feats = model(x, taps=taps)
            for tap in taps:
                accumulators[tap].add(feats[tap].float(), y)
    finally:
        model.train(was_training)


def analyse(
    model: nn.Module,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    transform: Transform,
    config: AnalysisConfig,
    *,
    device: str | torch.device = "cpu",
    n_control: int = 20,
    seed: int = 0,
    log: Callable[[str], None] = lambda message: None,
) -> AnalysisResult:
    """Analyse the configured taps of a frozen ``model`` on (images, labels) train and test arrays.

    ``transform`` turns a slice of raw images into the model's input on ``device``.
    """
    device = torch.device(device)
    taps = config.model_taps(model)
    recipe, threshold, batch_size = config.recipe, config.threshold, config.batch_size
    readout_cfg = readout_config(recipe, config.readout_options)
    num_labels = int(model.num_classes)
    train_x, train_y = train
    test_x, test_y = test
    train_labels = torch.from_numpy(np.asarray(train_y, dtype=np.int64))
    timings = {"train_features_s": 0.0, "readouts_s": 0.0}
    shapes = tap_shapes(model, transform(test_x[:1]), taps)
    groups = plan_groups(shapes, len(train_y), config.max_bytes)
    readouts: dict[str, ReadoutResult] = {}
    for i, group in enumerate(groups):
        log(f"train features {i + 1}/{len(groups)}: {', '.join(group)}")
        start = time.perf_counter()
        feats = collect_features(
            model,
            train_x,
            group,
            batch_size=batch_size,
            device=device,
            transform=transform,
            dtype=torch.float16,
            storage_device=device,
        )
        timings["train_features_s"] += time.perf_counter() - start
        start = time.perf_counter()
        trained = train_readouts(
            feats,
            {t: model.taps[t].kind for t in group},
            train_labels,
            num_labels,
            recipe,
            device=device,
            seed=seed,
            **(config.readout_options or {}),
        )
        for tap in group:
            log(f"readout {tap}: train accuracy {trained[tap].train_accuracy:.3f}")
        readouts.update(trained)
        del feats
        timings["readouts_s"] += time.perf_counter() - start

    log("test pass (all taps)")
    start = time.perf_counter()
    accumulators = {t: TapAccumulator(readouts[t].readout, num_labels, device) for t in taps}
    accumulate_test_split(model, test_x, test_y, transform, accumulators, device, batch_size)
    timings["test_pass_s"] = time.perf_counter() - start

    start = time.perf_counter()
    results, matrices = {}, {}
    for tap in taps:
        info, acc = model.taps[tap], accumulators[tap]
        readouts[tap].test_accuracy = acc.accuracy
        matrices[tap] = matrices_from_means(readouts[tap].readout, acc.means(), info.kind, shapes[tap], info.head_dim)
        summary = summarise_tap(
            matrices[tap],
            num_labels,
            acc.accuracy,
            head_dim=info.head_dim,
            threshold=threshold,
            n_control=n_control,
            seed=seed,
        )
        results[tap] = {
            "kind": info.kind,
            "heads": info.heads,
            "head_dim": info.head_dim,
            "feature_shape": list(shapes[tap]),
            "train_accuracy": readouts[tap].train_accuracy,
            "heads_structure": summary.pop("heads", None),
            **summary,
        }
    timings["summary_s"] = time.perf_counter() - start
    meta = {
        "threshold": threshold,
        "recipe": recipe,
        "readout": {**readout_cfg, "solver_reports": {t: r.recipe.get("solver_report") for t, r in readouts.items()}},
        "num_classes": num_labels,
        "train_size": len(train_y),
        "test_size": len(test_y),
        "taps": list(taps),
        "groups": groups,
        "timings": timings,
        "seed": seed,
        "n_control": n_control,
    }
    return AnalysisResult(taps=results, matrices=matrices, readouts=readouts, meta=meta)
