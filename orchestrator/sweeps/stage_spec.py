"""The sweep spec's after-training sections: ``analyze`` (per trial) and ``prune`` (a second stage).

    analyze: true                    # or a mapping of analysis.units.pipeline.AnalysisConfig fields:
    analyze: {threshold: 0.3, recipe: paper100, train_size: 2000, test_size: null, taps: null}
    prune:                           # analysis.pruning.job.PrunePlan: one pruned trial per finished
      methods: [none, afcc, random]  # trial x cell (docs/methods.md 5); also andc, nodal, random_labels
      thresholds: [0.3]              # cluster threshold axis (default: the analysis threshold)
      levels: [0.5]                  # fixed dilutions for extra ``random`` cells
      finetune_epochs: 1             # ... and any other PruneConfig field, shared by every cell

Label sets come from the analysis, so a ``prune`` section whose methods need them requires
``analyze``; a pruned trial reuses its parent's logged label sets when the thresholds agree and
recomputes them (with the analysis settings) otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from analysis.pruning.job import PruneConfig, PrunePlan, prune_layers
from analysis.pruning.masks import PruneError
from analysis.units.pipeline import AnalysisConfig
from orchestrator.schema import SweepError
from trainables.models.taps import TappedModel
from trainables.schema import InputError


def parse_analyze(raw: bool | dict) -> AnalysisConfig | None:
    """The analysis settings of ``analyze: true | {...}``; None when off."""
    if raw is False:
        return None
    return AnalysisConfig.parse({} if raw is True else raw, "sweep.analyze")


def check_analyze_taps(config: AnalysisConfig | None, model: TappedModel, cell: str) -> None:
    """The analysis taps must exist in a cell's model."""
    if config is None:
        return
    try:
        config.model_taps(model)
    except InputError as exc:
        raise SweepError(f"sweep.analyze.taps: cell {cell}: {exc.problem}") from None


@dataclass(frozen=True)
class PruneSpec:
    """The prune stage: its cells (label -> PruneConfig)."""

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


def parse_prune(
    plan: PrunePlan | dict | None, analyze: AnalysisConfig | None, require_analysis: bool = True
) -> PruneSpec | None:
    """The prune stage's cells; in a sweep (``require_analysis``), methods that need label sets
    require the analysis, whose settings the cells use."""
    if plan is None:
        return None
    if not isinstance(plan, PrunePlan):
        plan = PrunePlan.parse(plan, "sweep.prune")
    spec = PruneSpec(plan.cells(analyze))
    if require_analysis and spec.needs_label_sets and analyze is None:
        needy = next(label for label, c in spec.cells.items() if c.needs_label_sets)
        raise SweepError(
            f"sweep.prune: {needy} prunes by unit label sets, which come from the analysis; "
            f"set `analyze: true` in the spec"
        )
    return spec
