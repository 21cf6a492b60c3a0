"""One pruning job on a trained run folder: label sets -> masks -> evaluate -> fine-tune -> artifacts.

``run_prune_job(parent_dir, out_dir, config)`` needs only torch (no Ray, no MLflow). It reads the
parent's ``spec.json``, ``config.json`` and ``model.pt`` (the ``run_job`` layout) and writes into
``out_dir``: ``masks.pt``, ``model.pt`` (plain weights with the masks folded in, so
``run_folder.load_model`` and the served models load it like any trained model;
``masks.rebuild_pruned(spec, state_dict, masks)`` also enforces the masks again), ``spec.json``, ``config.json``
(the fine-tuning job config), ``label_sets.json`` (when label sets were used),
``probs_val.parquet``, ``probs_test.parquet`` and ``summary.json``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from analysis.pruning.masks import (
    Connection,
    LabelSets,
    Masks,
    PruneError,
    apply_masks,
    emptied_units,
    family_method,
    full_masks,
    layer_connections,
    magnitude_connections,
    mask_stats,
    needed_taps,
    plain_state_dict,
    plan_layers,
    random_at_level,
    random_connections,
    random_label_sets,
    save_masks,
    structured_connections,
)
from analysis.units.pipeline import AnalysisConfig, AnalysisResult, tap_shapes
from analysis.units.results import label_set_layout, save_label_sets
from analysis.units.run import analyze, norm_of
from analysis.units.summary import primary_kind
from trainables.config import JobConfig
from trainables.data import Splits, load_splits
from trainables.device import describe
from trainables.loader import DeviceLoader
from trainables.models.taps import TappedModel
from trainables.probs import write_probs
from trainables.run_folder import CONFIG, LABEL_SETS, MASKS, SPEC, SUMMARY, RunFolder
from trainables.schema import InputError, Settings, check_seed, seed_setting, setting
from trainables.train import device_flags, evaluate, fit, make_loaders, norm_record, select_device

METHODS = (
    "none",
    "afcc",
    "andc",
    "nodal",
    "random",
    "random_labels",
    "magnitude",
    "magnitude_global",
    "structured",
)
GUIDED_METHODS = ("afcc", "andc", "nodal")
# Baselines derived from the guided mask: the same dilution (magnitude*), the same count of emptied units
MAGNITUDE_METHODS = ("magnitude", "magnitude_global", "structured")


@dataclass(frozen=True)
class PruneConfig(Settings):
    """Settings of one pruning job (docs/methods.md 5).

    ``method``: ``none`` (no mask: the fine-tuning-only control), ``afcc`` (VGG convs), ``nodal``
    (VGG FC layers), ``andc`` (CCT), ``random`` (the layers of the guided method ``control_of``, by
    default the family's, each with a random mask of the guided mask's dilution, or of ``level``
    when set), ``random_labels`` (the authors' control: every unit gets ``random_labels_k`` random
    labels, then the guided rule), ``magnitude`` (the guided method's layers, each keeping as many
    connections as the guided mask, those of largest L1 norm), ``magnitude_global`` (as many parameters
    kept, one threshold across the layers), ``structured`` (as many whole units removed at each inner
    tap as the guided mask empties there, those whose incoming weights have the smallest L1 norm, Li
    et al. 2017). ``analysis`` computes the label sets (its ``threshold`` is
    the binarisation threshold of docs/methods.md 2.5).
    """

    SECTION = "prune"

    method: str = setting("afcc", "pruning method", choices=METHODS)
    level: float | None = setting(None, "dilution of a random mask (method random)", low=0, high=1)
    finetune_epochs: int = setting(1, "fine-tuning epochs after pruning (0: none)", low=0)
    finetune_lr: float | None = setting(None, "fine-tuning learning rate (default: 0.1 x the parent's)", gt=0)
    finetune_warmup_epochs: int = setting(0, "linear warm-up epochs of the fine-tuning", low=0)
    seed: int = seed_setting(0, "mask and fine-tuning seed")
    start_tap: str | None = setting(None, "prune only layers fed by this tap or deeper ones")
    random_labels_k: int = setting(5, "labels per unit (method random_labels)", low=1)
    control_of: str | None = setting(
        None, "random, magnitude: copy this guided method's layers and dilution", choices=GUIDED_METHODS
    )
    analysis: AnalysisConfig = setting(factory=lambda: AnalysisConfig(train_size=5000))

    def check(self) -> None:
        if self.level is not None and self.method != "random":
            raise InputError("level", f"only for method random, got method {self.method!r}")

    @property
    def threshold(self) -> float:
        return self.analysis.threshold

    @property
    def needs_label_sets(self) -> bool:
        return self.method in GUIDED_METHODS + MAGNITUDE_METHODS or (self.method == "random" and self.level is None)


@dataclass(frozen=True)
class PrunePlan(Settings):
    """A ``prune:`` section (a sweep's prune stage, ``analysis.pruning.cli --config``): one pruning job
    per method x threshold, plus fixed-dilution ``random`` cells at ``levels``, each once per
    fine-tuning budget of ``finetune_budgets`` (when given; else the base's ``finetune_epochs``) and
    once per mask and fine-tuning seed of ``seeds`` (when given; else the base's ``seed``). Every
    other key is a ``PruneConfig`` field shared by all cells (``base``), written flat beside ``methods``.

    ``random`` copies the first guided method's layers and per-layer dilution (else the family's
    guided method); ``thresholds`` default to the analysis threshold.
    """

    SECTION = "prune"
    OWN = ("methods", "thresholds", "levels", "finetune_budgets", "seeds")

    methods: tuple[str, ...] = setting(("afcc",), f"comma-separated: {', '.join(METHODS)}")
    thresholds: tuple[float, ...] | None = setting(None, "cluster thresholds (default: the analysis threshold)")
    levels: tuple[float, ...] = setting((), "fixed dilutions for extra method-random cells")
    finetune_budgets: tuple[int, ...] | None = setting(
        None, "fine-tuning epochs, one cell per budget (each its own cosine schedule; default: finetune_epochs)"
    )
    seeds: tuple[int, ...] | None = setting(
        None, "mask and fine-tuning seeds, one cell per seed (the label sets are shared; default: seed)"
    )
    base: PruneConfig = setting(factory=PruneConfig, flag=False)

    @classmethod
    def parse(cls, raw: Any, where: str | None = None) -> PrunePlan:
        where = cls.SECTION if where is None else where
        if not isinstance(raw, dict):
            raise InputError(where, f"must be a mapping, got {raw!r}")
        if "method" in raw:
            raise InputError(f"{where}.method", "list the methods under methods")
        if "base" in raw:
            raise InputError(f"{where}.base", "unknown key; write the prune options beside methods")
        own = {k: raw[k] for k in cls.OWN if k in raw}
        base = PruneConfig.parse({k: v for k, v in raw.items() if k not in cls.OWN}, where)
        return super().parse({**own, "base": base}, where)

    def to_dict(self) -> dict[str, Any]:
        """The flat section as written (the base's per-cell fields ``method`` and ``level`` left out)."""
        base = {k: v for k, v in self.base.to_dict().items() if k not in ("method", "level")}
        return {**{k: v for k, v in super().to_dict().items() if k != "base"}, **base}

    @classmethod
    def from_flags(cls, args: Any, **fixed: Any) -> PrunePlan:
        given = {k: getattr(args, k) for k in cls.OWN if hasattr(args, k)}
        try:
            return cls.parse({**PruneConfig._given(args), **given, **fixed}, where="")
        except InputError as exc:
            field = exc.field.split(".")[-1]
            raise InputError(
                f"--{field.replace('_', '-')}" if hasattr(args, field) else exc.field, exc.problem
            ) from None

    def check(self) -> None:
        if not self.methods:
            raise InputError("methods", "needs at least one method")
        for method in self.methods:
            if method not in METHODS:
                raise InputError("methods", f"must be one of {', '.join(METHODS)}, got {method!r}")
        for key in self.OWN:
            values = getattr(self, key) or ()
            if len(set(values)) != len(values):
                raise InputError(key, "duplicate values")
        for t in self.thresholds or ():
            if not 0 < t < 1:
                raise InputError("thresholds", f"must be in (0, 1), got {t}")
        for level in self.levels:
            if not 0 <= level <= 1:
                raise InputError("levels", f"must be in [0, 1], got {level}")
        if self.finetune_budgets is not None:
            if not self.finetune_budgets:
                raise InputError("finetune_budgets", "needs at least one budget (or leave it out)")
            for epochs in self.finetune_budgets:
                if epochs < 0:
                    raise InputError("finetune_budgets", f"must be >= 0, got {epochs}")
        if self.seeds is not None:
            if not self.seeds:
                raise InputError("seeds", "needs at least one seed (or leave it out)")
            for seed in self.seeds:
                check_seed(seed, "seeds")
        if self.levels and "random" not in self.methods:
            raise InputError("levels", "fixed dilutions are cells of method random; add it to methods")
        guided = [m for m in self.methods if m in GUIDED_METHODS]
        if guided and self.thresholds == ():
            raise InputError("thresholds", f"method {guided[0]} needs at least one threshold")

    def cells(self, analysis: AnalysisConfig | None = None) -> dict[str, PruneConfig]:
        """Every job of the plan by label; label sets come from ``analysis`` (default: the base's)."""
        source = analysis or self.base.analysis
        thresholds = self.thresholds if self.thresholds is not None else (source.threshold,)
        guided = [m for m in self.methods if m in GUIDED_METHODS]
        base = self.base
        if guided and base.control_of is None:
            base = base.replace(control_of=guided[0])
        configs = []
        for method in self.methods:
            if method in GUIDED_METHODS + MAGNITUDE_METHODS + ("random",):
                configs += [base.replace(method=method, analysis=source.replace(threshold=t)) for t in thresholds]
            else:
                configs.append(base.replace(method=method, analysis=source))
        configs += [base.replace(method="random", level=level, analysis=source) for level in self.levels]
        if not configs:
            raise InputError(f"{self.SECTION}", "no cells (method random with no thresholds and no levels)")
        if self.finetune_budgets is not None:
            configs = [c.replace(finetune_epochs=e) for c in configs for e in self.finetune_budgets]
        if self.seeds is not None:
            configs = [c.replace(seed=seed) for c in configs for seed in self.seeds]
        return {cell_label(c, self.finetune_budgets is not None, self.seeds is not None): c for c in configs}


def cell_label(config: PruneConfig, budget: bool = False, seed: bool = False) -> str:
    """``afcc,threshold=0.3``, ``random,level=0.5``, ``random_labels``, ``none``; with ``budget`` the
    fine-tuning epochs follow (``afcc,threshold=0.3,epochs=5``), with ``seed`` the seed (``,seed=1``)."""
    if config.method == "random" and config.level is not None:
        label = f"random,level={config.level:g}"
    elif config.needs_label_sets:
        label = f"{config.method},threshold={config.threshold:g}"
    else:
        label = config.method
    label += f",epochs={config.finetune_epochs}" if budget else ""
    return label + (f",seed={config.seed}" if seed else "")


# ---------------------------------------------------------------- label sets from the analysis


def unit_label_sets(layout: dict[str, dict[str, list[set[int]]]]) -> LabelSets:
    """Per-unit label sets of each tap from the ``label_sets.json`` layout (``results.load_label_sets``):
    filters at conv taps, nodes at token taps."""
    out: LabelSets = {}
    for tap, kinds in layout.items():
        kind = next((k for k in ("filter", "node") if k in kinds), None)
        if kind is None:
            raise PruneError(f"label sets: tap {tap!r} has no 'filter' or 'node' entry")
        out[tap] = kinds[kind]
    return out


def analyse_label_sets(
    model: TappedModel, splits: Splits, norm: tuple | None, config: AnalysisConfig, taps: list[str], seed: int
) -> tuple[AnalysisResult, dict[str, dict]]:
    """The unit analysis of ``taps`` (the same path as ``analysis.units.run``) and per-tap readout stats."""
    result = analyze(
        model, splits, config.replace(taps=tuple(taps), save_matrices=False), norm=norm, seed=seed, figures=False
    )
    stats = {}
    for tap, info in result.taps.items():
        summary = info["kinds"][primary_kind(info)]["summary"]
        stats[tap] = {
            "readout_test_acc": info["accuracy"],
            "readout_train_acc": info["train_accuracy"],
            "units": summary["n_units"],
            "units_with_labels": summary["n_units_with_cluster"],
            "mean_labels_per_unit": summary["mean_labels_per_unit"],
        }
    return result, stats


def unit_counts(model: TappedModel, taps: list[str]) -> dict[str, int]:
    """Units per tap: channels of a conv map (C, H, W), width of a token sequence (N, D)."""
    param = next(model.parameters())
    blank = torch.zeros(1, model.in_channels, model.image_size, model.image_size, device=param.device)
    shapes = tap_shapes(model, blank, taps)
    return {t: s[0] if model.taps[t].kind == "conv" else s[-1] for t, s in shapes.items()}


# ---------------------------------------------------------------- the job


def _accuracies(model, loaders) -> dict[str, Any]:
    """The evaluation of record on val and test: fp32, the model in the contiguous memory format."""
    model.to(memory_format=torch.contiguous_format)
    out = {}
    for split in ("val", "test"):
        loss, acc, probs = evaluate(model, loaders[split])
        out[split] = {"acc": acc, "loss": loss, "probs": probs}
    return out


def prune_layers(model: TappedModel, config: PruneConfig) -> list[Connection]:
    """The layers ``config.method`` prunes: its own plan, or the family's guided plan for controls."""
    if config.method == "none":
        return []
    guided = config.control_of or family_method(model) or config.method
    return plan_layers(model, config.method if config.method in GUIDED_METHODS else guided, config.start_tap)


def build_prune_masks(
    model: TappedModel, config: PruneConfig, layers: list[Connection], label_sets: LabelSets | None
) -> Masks:
    """Full masks of ``layers`` for ``config.method`` (none for method ``none``)."""
    if not layers:
        return {}
    if config.method == "random" and config.level is not None:
        counts = unit_counts(model, needed_taps(layers))
        gen = torch.Generator().manual_seed(config.seed)
        connections = {
            l.param: random_at_level(
                (counts[l.outputs] if l.outputs else model.num_classes, counts[l.inputs]), config.level, gen
            )
            for l in layers
        }
        return full_masks(model, connections)
    if config.method == "random_labels":
        label_sets = random_label_sets(
            unit_counts(model, needed_taps(layers)), model.num_classes, config.random_labels_k, config.seed
        )
    elif label_sets is None:
        raise PruneError(f"label sets: method {config.method!r} needs label sets")
    connections = layer_connections(layers, label_sets, model.num_classes)
    if config.method == "random":
        connections = random_connections(connections, config.seed)
    elif config.method == "structured":
        connections = structured_connections(model, layers, connections)
    elif config.method in MAGNITUDE_METHODS:
        connections = magnitude_connections(model, connections, per_layer=config.method == "magnitude")
    return full_masks(model, connections)


def run_prune_job(
    parent_dir: str | Path,
    out_dir: str | Path,
    config: PruneConfig,
    *,
    overrides: dict[str, Any] | None = None,
    label_sets: dict[str, dict[str, list[set[int]]]] | None = None,
    splits: Splits | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> dict[str, Any]:
    """Prune the parent run's model, fine-tune it with the mask enforced, write artifacts.

    ``overrides`` merge into the parent's job config (e.g. ``{"data": {"data_dir": ...},
    "device": "cpu"}``). ``label_sets`` (the ``label_sets.json`` layout, ``results.load_label_sets``)
    skips the analysis, e.g. to reuse a guided job's label sets for its random control.
    ``on_epoch(metrics)`` follows each fine-tuning epoch. Returns the summary also written to
    ``summary.json``.
    """
    parent, out = RunFolder(parent_dir), RunFolder(out_dir)
    missing = parent.missing()
    if missing:
        raise PruneError(f"parent {parent.path}: {missing[0]} not found (expected a run_job output folder)")
    cfg = parent.job_config().merged(overrides or {})
    model = parent.load_model()
    layers = prune_layers(model, config)
    splits = splits or load_splits(cfg.data, cfg.seed)
    device = select_device(cfg)
    autocast, channels_last = device_flags(cfg, device)

    model.to(device)
    # the parent's seed drew the splits; the prune seed orders the fine-tuning batches and its randomness
    loaders = make_loaders(splits, cfg.replace(seed=config.seed), device, channels_last)
    seconds: dict[str, float] = {}
    before = _accuracies(model, loaders)

    label_stats: dict[str, dict] = {}
    analysis = None
    start = time.perf_counter()
    if label_sets is None and config.needs_label_sets:
        analysis, label_stats = analyse_label_sets(
            model, splits, norm_of(cfg.data), config.analysis, needed_taps(layers), config.seed
        )
        label_sets = label_set_layout(analysis)
        model.to(device)
    elif not config.needs_label_sets:
        label_sets = None
    seconds["label_sets"] = time.perf_counter() - start
    masks = build_prune_masks(model, config, layers, unit_label_sets(label_sets) if label_sets else None)
    apply_masks(model, masks)
    pruned = _accuracies(model, loaders)

    out.path.mkdir(parents=True, exist_ok=True)
    ft_cfg = cfg.replace(
        seed=config.seed,
        epochs=max(1, config.finetune_epochs),
        recipe=cfg.recipe.replace(
            lr=config.finetune_lr or 0.1 * cfg.recipe.lr, warmup_epochs=config.finetune_warmup_epochs
        ),
    )
    start = time.perf_counter()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    history = finetune(model, loaders, ft_cfg, autocast, on_epoch) if config.finetune_epochs else []
    seconds["finetune"] = time.perf_counter() - start
    final = _accuracies(model, loaders) if history else pruned

    save_masks(out / MASKS, masks)
    out.write_weights(model, plain_state_dict(model))  # masks folded in: loads like any trained model
    out.write_json(SPEC, cfg.model)
    out.write_json(CONFIG, ft_cfg.to_dict())
    if label_sets is not None:
        save_label_sets(out / LABEL_SETS, label_sets, config.threshold, model.num_classes)
    for split in ("val", "test"):
        source = getattr(splits, split)
        write_probs(out.probs(split), final[split]["probs"], source.labels, source.indices, splits.name, split)
    stats = mask_stats(model, masks)
    stats["units_emptied"] = {tap: int(dead.sum()) for tap, dead in emptied_units(layers, masks).items()}
    for layer in layers:
        stats["layers"][layer.param].update(inputs=layer.inputs, outputs=layer.outputs)
    summary = {
        "method": config.method,
        "prune": config.to_dict(),
        "parent": str(parent.path),
        "dataset": splits.name,
        "num_classes": splits.num_classes,
        **stats,
        **{
            f"acc_{name}": {s: r[s]["acc"] for s in ("val", "test")}
            for name, r in (("before", before), ("pruned", pruned), ("finetuned", final))
        },
        "val_acc": final["val"]["acc"],
        "test_acc": final["test"]["acc"],
        "val_loss": final["val"]["loss"],
        "test_loss": final["test"]["loss"],
        "label_stats": label_stats,
        "history": history,
        "seconds": seconds,
        "norm": norm_record(splits, cfg),
        **describe(device, autocast),
    }
    out.write_json(SUMMARY, summary)
    return summary


def finetune(
    model: torch.nn.Module,
    loaders: dict[str, DeviceLoader],
    cfg: JobConfig,
    autocast: bool,
    on_epoch: Callable[[dict], None] | None = None,
) -> list[dict]:
    """``cfg.epochs`` epochs of the shared training loop; the masks hold throughout."""
    torch.manual_seed(cfg.seed)
    return fit(model, loaders, cfg, autocast, None if on_epoch is None else lambda metrics, _state: on_epoch(metrics))
