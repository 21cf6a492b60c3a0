"""The sweep spec's after-training sections: ``analyze`` (per trial) and ``prune`` (a second stage).

    analyze: true                    # or a mapping of analysis options:
    analyze: {threshold: 0.3, recipe: lbfgs, train_size: 2000, test_size: null, taps: null,
              readout_epochs: null, readout_max_iter: null, max_gib: 4, save_matrices: true}
    prune:                           # one pruned trial per finished trial x cell (methods.md 5)
      methods: [none, afcc, random]  # also andc, nodal, random_labels; none: fine-tuning only;
                                     # random: the first guided method's mask (else the family's:
                                     # afcc | andc), shuffled within each layer
      thresholds: [0.3]              # cluster threshold axis (default: the analysis threshold)
      levels: [0.5]                  # fixed dilutions for extra ``random`` cells
      finetune_epochs: 1
      finetune_lr: null              # null: 0.1 x the trial's learning rate
      seed: 0
      random_labels_k: 5
      start_tap: null

Label sets come from the analysis, so a ``prune`` section whose methods need them requires
``analyze``; a pruned trial reuses its parent's logged label sets when the thresholds agree and
recomputes them (with the analysis options) otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from analysis.clusters import DEFAULT_THRESHOLD
from analysis.pipeline import DEFAULT_MAX_BYTES
from analysis.prune_job import GUIDED_METHODS, METHODS, PruneConfig, prune_layers
from analysis.pruning import PruneError, check_fraction
from analysis.readout import DEFAULT_RECIPE, RECIPES, readout_config
from analysis.run import readout_overrides
from orchestrator.schema import SweepError, check_choice, check_fields, check_min
from trainables.models.taps import TappedModel

_NONE = type(None)
_ANALYZE = {
    "threshold": ((int, float), DEFAULT_THRESHOLD),
    "recipe": ((str,), DEFAULT_RECIPE),
    "readout_epochs": ((int, _NONE), None),
    "readout_max_iter": ((int, _NONE), None),
    "train_size": ((int, _NONE), None),
    "test_size": ((int, _NONE), None),
    "taps": ((list, _NONE), None),
    "max_gib": ((int, float), DEFAULT_MAX_BYTES / 2**30),
    "save_matrices": ((bool,), True),
}
_PRUNE = {
    "methods": ((list,), ...),
    "thresholds": ((list, _NONE), None),
    "levels": ((list,), []),
    "finetune_epochs": ((int,), 1),
    "finetune_lr": ((int, float, _NONE), None),
    "seed": ((int,), 0),
    "random_labels_k": ((int,), 5),
    "start_tap": ((str, _NONE), None),
}


def parse_analyze(raw: bool | dict) -> dict | None:
    """Keyword options of ``analysis.run.analyze_files`` for ``analyze: true | {...}``; None when off."""
    if raw is False:
        return None
    a = check_fields({} if raw is True else raw, _ANALYZE, "sweep.analyze")
    if not 0 < a["threshold"] < 1:
        raise SweepError(f"sweep.analyze.threshold: must be in (0, 1), got {a['threshold']}")
    check_choice(a["recipe"], tuple(RECIPES), "sweep.analyze.recipe")
    for key in ("readout_epochs", "readout_max_iter", "train_size", "test_size"):
        check_min(a[key], 1, f"sweep.analyze.{key}")
    readout_options = readout_overrides(a["readout_epochs"], a["readout_max_iter"])
    try:
        readout_config(a["recipe"], readout_options)
    except ValueError as exc:
        raise SweepError(f"sweep.analyze: {exc}") from None
    if a["taps"] is not None and (not a["taps"] or not all(isinstance(t, str) for t in a["taps"])):
        raise SweepError(f"sweep.analyze.taps: must be a non-empty list of tap names, got {a['taps']!r}")
    if a["max_gib"] <= 0:
        raise SweepError(f"sweep.analyze.max_gib: must be > 0, got {a['max_gib']}")
    return {
        "taps": a["taps"], "threshold": float(a["threshold"]), "recipe": a["recipe"], "device": "auto",
        "train_size": a["train_size"], "test_size": a["test_size"],
        "readout_options": readout_options,
        "max_bytes": int(a["max_gib"] * 2**30), "save_matrices": a["save_matrices"],
    }


def check_analyze_taps(options: dict | None, model: TappedModel, cell: str) -> None:
    """The analysis taps must exist in a cell's model."""
    if options is None or options["taps"] is None:
        return
    known = model.taps
    unknown = [t for t in options["taps"] if t not in known]
    if unknown:
        raise SweepError(f"sweep.analyze.taps: cell {cell}: unknown tap {unknown[0]!r} (known: {', '.join(known)})")


@dataclass(frozen=True)
class PruneSpec:
    """The prune stage: its cells (label -> PruneConfig) and the whole section as written."""

    cells: dict[str, PruneConfig]

    @property
    def needs_label_sets(self) -> bool:
        return any(c.needs_label_sets for c in self.cells.values())

    def check_model(self, model: TappedModel, cell: str) -> None:
        """Every prune cell must apply to a training cell's model (its family and taps)."""
        for label, config in self.cells.items():
            try:
                prune_layers(model, config)
            except PruneError as exc:
                raise SweepError(f"sweep.prune: {label} cannot prune cell {cell}: {exc}") from None


def cell_label(config: PruneConfig) -> str:
    """``afcc,threshold=0.3``, ``random,level=0.5``, ``random_labels``, ``none``."""
    if config.method == "random" and config.level is not None:
        return f"random,level={config.level:g}"
    if config.needs_label_sets:
        return f"{config.method},threshold={config.threshold:g}"
    return config.method


def parse_prune(raw: dict | None, analyze: dict | None, require_analysis: bool = True) -> PruneSpec | None:
    """The prune section's cells; in a sweep (``require_analysis``), methods that need label sets
    require the analysis."""
    if raw is None:
        return None
    p = check_fields(raw, _PRUNE, "sweep.prune")
    methods = p["methods"]
    if not methods:
        raise SweepError("sweep.prune.methods: needs at least one method")
    for method in methods:
        check_choice(method, METHODS, "sweep.prune.methods")
    if len(set(methods)) != len(methods):
        raise SweepError("sweep.prune.methods: duplicate methods")
    default_threshold = analyze["threshold"] if analyze else DEFAULT_THRESHOLD
    thresholds = p["thresholds"] if p["thresholds"] is not None else [default_threshold]
    _check_values(thresholds, "thresholds", high_open=True)
    _check_values(p["levels"], "levels", high_open=False)
    if p["levels"] and "random" not in methods:
        raise SweepError("sweep.prune.levels: fixed dilutions are cells of method random; add it to methods")
    base = {k: p[k] for k in ("finetune_epochs", "finetune_lr", "seed", "random_labels_k", "start_tap")}
    if analyze:
        base.update(readout_recipe=analyze["recipe"], analysis_train_size=analyze["train_size"],
                    analysis_test_size=analyze["test_size"],
                    readout_options=analyze["readout_options"])
    guided = [m for m in methods if m in GUIDED_METHODS]
    if guided:  # random controls copy the first guided method's layers and per-layer dilution
        base["control_of"] = guided[0]
    try:
        template = PruneConfig.from_dict(base)
        configs = []
        for method in methods:
            if method in GUIDED_METHODS + ("random",):
                configs += [replace(template, method=method, threshold=float(t)) for t in thresholds]
            else:
                configs.append(replace(template, method=method))
        if "random" in methods:
            configs += [replace(template, method="random", level=float(level)) for level in p["levels"]]
    except PruneError as exc:
        raise SweepError(f"sweep.{exc}") from None
    if guided and not thresholds:
        raise SweepError(f"sweep.prune.thresholds: method {guided[0]} needs at least one threshold")
    if not configs:
        raise SweepError("sweep.prune: no cells (method random with no thresholds and no levels)")
    spec = PruneSpec({cell_label(c): c for c in configs})
    if require_analysis and spec.needs_label_sets and analyze is None:
        needy = next(label for label, c in spec.cells.items() if c.needs_label_sets)
        raise SweepError(f"sweep.prune: {needy} prunes by unit label sets, which come from the analysis; "
                         f"set `analyze: true` in the spec")
    return spec


def _check_values(values: list[Any], key: str, high_open: bool) -> None:
    if len(set(values)) != len(values):
        raise SweepError(f"sweep.prune.{key}: duplicate values")
    for value in values:
        try:
            check_fraction(f"sweep.prune.{key}", value, high_open=high_open)
        except PruneError as exc:
            raise SweepError(str(exc)) from None
        if key == "thresholds" and value == 0:
            raise SweepError(f"sweep.prune.thresholds: must be in (0, 1), got {value}")
