"""What mattered in a sweep: each axis's importance for val accuracy and for latency (Optuna's fANOVA
on the sweep's study, seeds left out as noise) and a parallel-coordinates figure of the finished
trials. Values come from the trials' MLflow runs, joined to the study by its ``mlflow_run_id``
attribute; with fewer than ``MIN_TRIALS`` finished trials it says so instead of fitting noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
from optuna.distributions import CategoricalDistribution  # noqa: E402
from optuna.trial import FrozenTrial, TrialState, create_trial  # noqa: E402

from orchestrator.workbench.study_store import open_storage  # noqa: E402

MIN_TRIALS = 4
# objective metric -> (what it is called, the better direction)
OBJECTIVES = {"val_acc": ("val accuracy", "maximize"), "latency_ms_b1": ("latency at batch 1", "minimize")}
RUN_ID = "mlflow_run_id"


@dataclass
class Importance:
    """``scores[objective][axis]``: each varying axis's share of the objective's variance (sums to 1);
    ``trials``: the finished trials with their params and values; ``note``: why scores are missing."""

    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    trials: list[tuple[FrozenTrial, dict[str, float]]] = field(default_factory=list)
    axes: list[str] = field(default_factory=list)
    note: str = ""

    def lines(self) -> list[str]:
        """One line per objective (``val accuracy: attention 0.81, n_conv_blocks 0.19``) or the note."""
        if not self.scores:
            return [self.note] if self.note else []
        return [
            f"importance for {OBJECTIVES[o][0]} (fANOVA, {len(self.trials)} trials): "
            + ", ".join(f"{axis} {score:.2f}" for axis, score in sorted(s.items(), key=lambda kv: -kv[1]))
            for o, s in self.scores.items()
        ] + ([self.note] if self.note else [])


def finished_trials(url: str, name: str) -> list[FrozenTrial]:
    """The COMPLETE trials of study ``name`` at ``url`` (none when the study is not there)."""
    storage = open_storage(url)
    try:
        sid = storage.get_study_id_from_name(name)
    except KeyError:
        return []
    return [t for t in storage.get_all_trials(sid, deepcopy=False) if t.state == TrialState.COMPLETE]


def importance(trials: list[FrozenTrial], rows: list[dict]) -> Importance:
    """fANOVA importance of every axis that varies across the finished trials, for each objective
    every one of them measured (``rows``: the sweep's MLflow rows with ``run_id`` and ``metrics``)."""
    metrics = {r["run_id"]: r["metrics"] for r in rows if r["status"] == "FINISHED"}
    joined = [(t, metrics[t.user_attrs[RUN_ID]]) for t in trials if t.user_attrs.get(RUN_ID) in metrics]
    axes = sorted(
        {name for t, _ in joined for name in t.params if len({str(u.params.get(name)) for u, _ in joined}) > 1}
    )
    result = Importance(trials=joined, axes=axes)
    if len(joined) < MIN_TRIALS:
        result.note = f"importance needs at least {MIN_TRIALS} finished trials; this sweep has {len(joined)}"
        return result
    if not axes:
        result.note = "importance: no axis varies across the finished trials (seeds are noise, not an axis)"
        return result
    for objective, (_, direction) in OBJECTIVES.items():
        values = [m.get(objective) for _, m in joined]
        if any(v is None or not math.isfinite(v) for v in values):
            continue
        study = optuna.create_study(direction=direction)
        study.add_trials(
            [
                create_trial(
                    params={a: t.params[a] for a in axes if a in t.params},
                    distributions={a: t.distributions[a] for a in axes if a in t.params},
                    value=v,
                )
                for (t, _), v in zip(joined, values)
            ]
        )
        from optuna.importance import FanovaImportanceEvaluator, get_param_importances  # scikit-learn: here only

        result.scores[objective] = get_param_importances(
            study, evaluator=FanovaImportanceEvaluator(seed=0), params=axes, normalize=True
        )
    return result


def _position(trial: FrozenTrial, axis: str, lo_hi: dict[str, tuple[float, float]]) -> float:
    """A trial's place on an axis in [0, 1]: a category's index, or a number scaled between the ends."""
    dist, value = trial.distributions[axis], trial.params[axis]
    if isinstance(dist, CategoricalDistribution):
        n = len(dist.choices)
        return dist.choices.index(value) / (n - 1) if n > 1 else 0.5
    lo, hi = lo_hi[axis]
    if getattr(dist, "log", False):
        value, lo, hi = math.log(value), math.log(lo), math.log(hi)
    return (value - lo) / (hi - lo) if hi > lo else 0.5


def plot_parallel_coordinates(result: Importance, path: Path) -> Path | None:
    """One line per finished trial across every varying axis to its val accuracy, coloured by it."""
    trials = [
        (t, m) for t, m in result.trials if all(a in t.params for a in result.axes) and m.get("val_acc") is not None
    ]
    if len(trials) < 2 or not result.axes:
        return None
    lo_hi = {}
    for a in result.axes:
        numbers = [t.params[a] for t, _ in trials if not isinstance(t.distributions[a], CategoricalDistribution)]
        if numbers:
            lo_hi[a] = (min(numbers), max(numbers))
    accs = [m["val_acc"] for _, m in trials]
    low, high = min(accs), max(accs)
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(1.8 * (len(result.axes) + 1) + 1.5, 4))
    for t, m in sorted(trials, key=lambda tm: tm[1]["val_acc"]):
        ys = [_position(t, a, lo_hi) for a in result.axes]
        ys.append((m["val_acc"] - low) / (high - low) if high > low else 0.5)
        ax.plot(range(len(ys)), ys, color=cmap((m["val_acc"] - low) / (high - low) if high > low else 0.5), lw=1.4)
    for i, a in enumerate(result.axes):
        ax.axvline(i, color="grey", lw=0.8)
        dist = trials[0][0].distributions[a]
        if isinstance(dist, CategoricalDistribution):
            n = len(dist.choices)
            for j, choice in enumerate(dist.choices):
                ax.text(i + 0.03, j / (n - 1) if n > 1 else 0.5, str(choice), fontsize=7, va="center")
        else:
            ax.text(i + 0.03, 0, f"{lo_hi[a][0]:.3g}", fontsize=7)
            ax.text(i + 0.03, 1, f"{lo_hi[a][1]:.3g}", fontsize=7)
    last = len(result.axes)
    ax.axvline(last, color="grey", lw=0.8)
    ax.text(last + 0.03, 0, f"{low:.4f}", fontsize=7)
    ax.text(last + 0.03, 1, f"{high:.4f}", fontsize=7)
    ax.set_xticks(range(last + 1), [*result.axes, "val_acc"], fontsize=8)
    ax.set_yticks([])
    ax.set_xlim(-0.2, last + 0.6)
    ax.set_title(f"parallel coordinates ({len(trials)} finished trials; colour: val accuracy)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
