"""One pruning job on a trained run folder: label sets -> masks -> evaluate -> fine-tune -> artifacts.

``run_prune_job(parent_dir, out_dir, config)`` needs only torch (no Ray, no MLflow). It reads the
parent's ``spec.json``, ``config.json`` and ``model.pt`` (the ``run_job`` layout) and writes into
``out_dir``: ``masks.pt``, ``model.pt`` (state_dict with the parametrization originals and masks;
``pruning.rebuild_pruned(spec, state_dict, masks)`` restores it), ``spec.json``, ``config.json``
(the fine-tuning job config), ``label_sets.json`` (when label sets were used),
``probs_val.parquet``, ``probs_test.parquet`` and ``summary.json``.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from analysis.features import collect_features
from analysis.pipeline import tap_shapes as pipeline_tap_shapes
from analysis.pruning import (CLUSTER_METHODS, LabelSets, Layer, Masks, PruneError, apply_masks,
                              check_fraction, full_masks, layer_connections, mask_stats,
                              needed_taps, plan_layers, random_at_level, random_connections,
                              random_label_sets, save_masks)
from analysis.readout import DEFAULT_RECIPE, readout_config, train_readout
from analysis.summary import analyse_units
from analysis.units import tap_unit_matrices
from trainables.data import Splits, load_splits
from trainables.loader import DeviceLoader
from trainables.models import build_model
from trainables.models.taps import TappedModel
from trainables.probs import write_probs
from trainables.train import (evaluate, lr_lambda, make_loaders, make_optimizer, prepare,
                              select_device, train_epoch)

METHODS = ("none", "afcc", "andc", "nodal", "random", "random_labels")
GUIDED_METHODS = ("afcc", "andc", "nodal")


@dataclass(frozen=True)
class PruneConfig:
    """Settings of one pruning job (the ``prune:`` keys of a config file, minus ``methods``).

    - ``method``: ``none`` (no mask: the fine-tuning-only control), ``afcc`` (VGG convs), ``nodal``
      (VGG FC layers), ``andc`` (CCT), ``random`` (the layers of the guided method ``control_of``,
      by default the family's: afcc for VGG, andc for CCT; each with a random mask of the same
      dilution as the guided mask, or of ``level`` when set),
      ``random_labels`` (the authors' control: every unit gets ``random_labels_k`` random labels,
      then the guided rule).
    - ``threshold``: binarisation threshold of the unit matrices (methods.md 2.5).
    - ``finetune_lr``: None means 0.1 x the parent's learning rate; no warm-up.
    - ``analysis_train_size`` / ``analysis_test_size``: images of the train split the readouts
      learn from and of the test split the unit matrices average over (None: the whole split).
    """

    method: str = "afcc"
    threshold: float = 0.3
    level: float | None = None
    finetune_epochs: int = 2
    finetune_lr: float | None = None
    seed: int = 0
    start_tap: str | None = None
    random_labels_k: int = 5
    control_of: str | None = None
    readout_recipe: str = DEFAULT_RECIPE
    readout_options: dict | None = None  # overrides of the readout recipe (readout.readout_config)
    analysis_train_size: int | None = 5000
    analysis_test_size: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise PruneError(f"prune.method: must be one of {', '.join(METHODS)}, got {self.method!r}")
        check_fraction("prune.threshold", self.threshold, high_open=True)
        if self.level is not None:
            if self.method != "random":
                raise PruneError(f"prune.level: only for method random, got method {self.method!r}")
            check_fraction("prune.level", self.level, high_open=False)
        if self.control_of is not None and self.control_of not in GUIDED_METHODS:
            raise PruneError(f"prune.control_of: must be one of {', '.join(GUIDED_METHODS)}, got {self.control_of!r}")
        try:
            readout_config(self.readout_recipe, self.readout_options)
        except ValueError as exc:
            raise PruneError(f"prune.readout_recipe: {exc}") from None
        for name, low in (("finetune_epochs", 0), ("random_labels_k", 1),
                          ("analysis_train_size", 1), ("analysis_test_size", 1), ("seed", 0)):
            value = getattr(self, name)
            if value is None and name not in ("finetune_epochs", "random_labels_k", "seed"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise PruneError(f"prune.{name}: must be an integer >= {low}, got {value!r}")
        if self.finetune_lr is not None and not (isinstance(self.finetune_lr, (int, float))
                                                 and self.finetune_lr > 0):
            raise PruneError(f"prune.finetune_lr: must be > 0, got {self.finetune_lr!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PruneConfig:
        known = {f.name for f in fields(cls)}
        for key in values:
            if key not in known:
                raise PruneError(f"prune.{key}: unknown key (known: {', '.join(sorted(known))})")
        return cls(**values)

    @property
    def needs_label_sets(self) -> bool:
        return self.method in GUIDED_METHODS or (self.method == "random" and self.level is None)


# ---------------------------------------------------------------- label sets from the analysis core

def compute_label_sets(model: TappedModel, train: DeviceLoader, test: DeviceLoader, taps: list[str],
                       threshold: float = 0.3, recipe: str = DEFAULT_RECIPE, readout_options: dict | None = None,
                       seed: int = 0, max_bytes: int = 2 * 2**30) -> tuple[LabelSets, dict[str, dict]]:
    """Per-unit label sets (filters at conv taps, nodes at token taps) and per-tap readout stats.

    For each tap: features of ``train`` and ``test`` (float16 on the CPU) -> bias-free readout
    trained on ``train`` -> unit matrices on ``test`` -> greedy clusters at ``threshold``; a unit's
    label set is the union of its clusters. Taps are read in groups whose feature cache stays under
    ``max_bytes`` (one forward pass per group; a tap larger than that is read alone).
    """
    sets: LabelSets = {}
    stats: dict[str, dict] = {}
    overrides = readout_options or {}
    for group in _tap_groups(tap_shapes(model, taps), len(train.labels) + len(test.labels), max_bytes):
        feats = {name: collect_features(model, loader, group, device=train.device, dtype=torch.float16)
                 for name, loader in (("train", train), ("test", test))}
        for tap in group:
            kind = model.taps[tap].kind
            train_x, test_x = feats["train"].pop(tap), feats["test"].pop(tap)
            res = train_readout(train_x, train.labels.cpu(), test_x, test.labels.cpu(), kind,
                                model.num_classes, recipe, device=train.device, seed=seed, **overrides)
            matrices = tap_unit_matrices(res.readout, test_x, test.labels.cpu(), model.num_classes,
                                         device=train.device)
            units = analyse_units(matrices.units["filter" if kind == "conv" else "node"], threshold)
            sets[tap] = [set(u.labels) for u in units]
            stats[tap] = {"readout_test_acc": res.test_accuracy, "readout_train_acc": res.train_accuracy,
                          "units": len(units), "units_with_labels": sum(u.has_cluster for u in units),
                          "mean_labels_per_unit": float(np.mean([u.n_labels for u in units]))}
    return sets, stats


def _tap_groups(shapes: dict[str, tuple[int, ...]], n_images: int, max_bytes: int) -> list[list[str]]:
    """Consecutive taps packed so that each group's float16 cache of ``n_images`` fits ``max_bytes``."""
    groups: list[list[str]] = []
    used = max_bytes
    for tap, shape in shapes.items():
        need = 2 * n_images * int(np.prod(shape))
        if used + need > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(tap)
        used += need
    return groups


def tap_shapes(model: TappedModel, taps: list[str]) -> dict[str, tuple[int, ...]]:
    """Per-image feature shape of each tap, from one forward pass of a blank image."""
    param = next(model.parameters())
    blank = torch.zeros(1, model.in_channels, model.image_size, model.image_size, device=param.device)
    return pipeline_tap_shapes(model, blank, taps)


def unit_counts(model: TappedModel, taps: list[str]) -> dict[str, int]:
    """Units per tap: channels of a conv map (C, H, W), width of a token sequence (N, D)."""
    return {t: s[0] if model.taps[t].kind == "conv" else s[-1] for t, s in tap_shapes(model, taps).items()}


def save_label_sets(path: Path, label_sets: LabelSets, threshold: float | None) -> None:
    data = {"threshold": threshold, "taps": {t: [sorted(s) for s in sets] for t, sets in label_sets.items()}}
    path.write_text(json.dumps(data))


def load_label_sets(path: str | Path) -> LabelSets:
    """Label sets from JSON: ``{"taps": {tap: [[labels of unit 0], ...]}}`` (as written here) or a
    bare ``{tap: ...}``; a tap may also map unit kinds to lists (``{"filter": [...]}`` /
    ``{"node": [...]}``), as in ``analysis.run``'s per-kind output."""
    data = json.loads(Path(path).read_text())
    taps = data.get("taps", data)
    out: LabelSets = {}
    for tap, value in taps.items():
        if isinstance(value, dict):
            kinds = [k for k in ("filter", "node") if k in value]
            if not kinds:
                raise PruneError(f"label sets {path}: tap {tap!r} has no 'filter' or 'node' entry")
            value = value[kinds[0]]
        out[tap] = [set(int(l) for l in unit) for unit in value]
    return out


# ---------------------------------------------------------------- the job

def _merge(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _accuracies(model, loaders, autocast: bool) -> dict[str, Any]:
    out = {}
    for split in ("val", "test"):
        loss, acc, probs = evaluate(model, loaders[split], autocast)
        out[split] = {"acc": acc, "loss": loss, "probs": probs}
    return out


def prune_layers(model: TappedModel, config: PruneConfig) -> list[Layer]:
    """The layers ``config.method`` prunes: its own plan, or the family's guided plan for controls."""
    if config.method == "none":
        return []
    guided = config.control_of or CLUSTER_METHODS.get(model.spec["family"], config.method)
    return plan_layers(model, config.method if config.method in GUIDED_METHODS else guided,
                       config.start_tap)


def build_prune_masks(model: TappedModel, config: PruneConfig, layers: list[Layer],
                      label_sets: LabelSets | None) -> Masks:
    """Full masks of ``layers`` for ``config.method`` (none for method ``none``)."""
    if not layers:
        return {}
    if config.method == "random" and config.level is not None:
        counts = unit_counts(model, needed_taps(layers))
        gen = torch.Generator().manual_seed(config.seed)
        connections = {l.param: random_at_level((counts[l.outputs] if l.outputs else model.num_classes,
                                                 counts[l.inputs]), config.level, gen) for l in layers}
        return full_masks(model, connections)
    if config.method == "random_labels":
        label_sets = random_label_sets(unit_counts(model, needed_taps(layers)), model.num_classes,
                                       config.random_labels_k, config.seed)
    elif label_sets is None:
        raise PruneError(f"label sets: method {config.method!r} needs label sets")
    connections = layer_connections(layers, label_sets, model.num_classes)
    if config.method == "random":
        connections = random_connections(connections, config.seed)
    return full_masks(model, connections)


def run_prune_job(
    parent_dir: str | Path,
    out_dir: str | Path,
    config: PruneConfig | dict[str, Any] | None = None,
    *,
    overrides: dict[str, Any] | None = None,
    label_sets: LabelSets | None = None,
    splits: Splits | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> dict[str, Any]:
    """Prune the parent run's model, fine-tune it with the mask enforced, write artifacts.

    ``overrides`` merge into the parent's job config (e.g. ``{"data": {"data_dir": ...},
    "device": "cpu"}``). ``label_sets`` skips the analysis (e.g. reuse a guided job's
    ``label_sets.json`` for its random control). ``on_epoch(metrics)`` follows each fine-tuning
    epoch. Returns the summary also written to ``summary.json``.
    """
    config = config if isinstance(config, PruneConfig) else PruneConfig.from_dict(config or {})
    parent_dir, out_dir = Path(parent_dir), Path(out_dir)
    for name in ("spec.json", "config.json", "model.pt"):
        if not (parent_dir / name).is_file():
            raise PruneError(f"parent {parent_dir}: {name} not found (expected a run_job output folder)")
    spec = json.loads((parent_dir / "spec.json").read_text())
    cfg, _ = prepare(_merge(json.loads((parent_dir / "config.json").read_text()), overrides or {}))
    splits = splits or load_splits(cfg["data"], cfg["seed"])
    device = select_device(cfg)
    autocast = cfg["bf16"] is True or (cfg["bf16"] == "auto" and device.type == "cuda")
    channels_last = cfg["channels_last"] is True or (cfg["channels_last"] == "auto" and device.type == "cuda")

    model = build_model(spec)
    model.load_state_dict(torch.load(parent_dir / "model.pt", map_location="cpu", weights_only=True))
    model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    loaders = make_loaders(splits, cfg, device, channels_last)
    seconds: dict[str, float] = {}
    before = _accuracies(model, loaders, autocast)

    label_stats: dict[str, dict] = {}
    start = time.perf_counter()
    layers = prune_layers(model, config)
    if label_sets is None and config.needs_label_sets:
        label_sets, label_stats = compute_label_sets(
            model, _analysis_loader(splits, loaders["test"], config.analysis_train_size, "train"),
            _analysis_loader(splits, loaders["test"], config.analysis_test_size, "test"),
            needed_taps(layers), config.threshold, config.readout_recipe, config.readout_options,
            config.seed)
    elif not config.needs_label_sets:
        label_sets = None
    seconds["label_sets"] = time.perf_counter() - start
    masks = build_prune_masks(model, config, layers, label_sets)
    apply_masks(model, masks)
    pruned = _accuracies(model, loaders, autocast)

    out_dir.mkdir(parents=True, exist_ok=True)
    ft_cfg = _finetune_config(cfg, config)
    start = time.perf_counter()
    history = finetune(model, loaders, ft_cfg, autocast, on_epoch) if config.finetune_epochs else []
    seconds["finetune"] = time.perf_counter() - start
    final = _accuracies(model, loaders, autocast) if history else pruned

    save_masks(out_dir / "masks.pt", masks)
    torch.save(model.state_dict(), out_dir / "model.pt")
    (out_dir / "spec.json").write_text(json.dumps(spec, indent=1))
    (out_dir / "config.json").write_text(json.dumps(ft_cfg, indent=1))
    if label_sets is not None:
        save_label_sets(out_dir / "label_sets.json", label_sets, config.threshold)
    for split in ("val", "test"):
        source = getattr(splits, split)
        write_probs(out_dir / f"probs_{split}.parquet", final[split]["probs"], source.labels,
                    source.indices, splits.name, split)
    stats = mask_stats(model, masks)
    for layer in layers:
        stats["layers"][layer.param].update(inputs=layer.inputs, outputs=layer.outputs)
    summary = {
        "method": config.method,
        "prune": asdict(config),
        "parent": str(parent_dir),
        "dataset": splits.name,
        "num_classes": splits.num_classes,
        **stats,
        **{f"acc_{name}": {s: r[s]["acc"] for s in ("val", "test")}
           for name, r in (("before", before), ("pruned", pruned), ("finetuned", final))},
        "val_acc": final["val"]["acc"], "test_acc": final["test"]["acc"],
        "val_loss": final["val"]["loss"], "test_loss": final["test"]["loss"],
        "label_stats": label_stats,
        "history": history,
        "seconds": seconds,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _analysis_loader(splits: Splits, like: DeviceLoader, size: int | None, split: str) -> DeviceLoader:
    """An unaugmented, unshuffled loader over the first ``size`` images of a split."""
    source = getattr(splits, split)
    n = len(source) if size is None else min(size, len(source))
    return DeviceLoader(source.images[:n], source.labels[:n], batch_size=like.batch_size,
                        device=like.device, mean=tuple(like.mean.tolist()), std=tuple(like.std.tolist()),
                        num_classes=splits.num_classes)


def _finetune_config(cfg: dict, config: PruneConfig) -> dict:
    """The parent's job config with the fine-tuning epochs and learning rate, no warm-up."""
    ft = copy.deepcopy(cfg)
    ft["epochs"] = max(1, config.finetune_epochs)
    ft["recipe"]["lr"] = float(config.finetune_lr or 0.1 * cfg["recipe"]["lr"])
    ft["recipe"]["warmup_epochs"] = 0
    return ft


def finetune(model: torch.nn.Module, loaders: dict[str, DeviceLoader], cfg: dict, autocast: bool,
             on_epoch: Callable[[dict], None] | None = None) -> list[dict]:
    """``cfg["epochs"]`` epochs with the job's optimiser and schedule; the masks hold throughout."""
    torch.manual_seed(cfg["seed"])
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, len(loaders["train"])))
    step_model = torch.compile(model) if cfg["compile"] else model
    history = []
    for epoch in range(cfg["epochs"]):
        metrics = train_epoch(step_model, loaders["train"], optimizer, scheduler, cfg, autocast)
        metrics["val_loss"], metrics["val_acc"], _ = evaluate(step_model, loaders["val"], autocast)
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        metrics["epoch"] = epoch
        history.append(metrics)
        if on_epoch is not None:
            on_epoch(dict(metrics))
    return history
