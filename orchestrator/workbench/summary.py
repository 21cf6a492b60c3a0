"""A sweep that explains itself in the MLflow UI: the summary written onto its parent run.

``summarize_sweep`` reads the sweep's trial runs and writes onto the parent run: metrics
``best_val_acc`` and ``best_test_acc`` (the test accuracy of the trial chosen on validation, not the
best test value), ``n_trials`` and ``n_trials_finished``; tag ``unitlab.best_run_id``; a Markdown
description (``mlflow.note.content``: the trials table, the best trial named); ``summary/trials.csv``;
and figures under ``summary/figures/``: parallel coordinates of the finished trials, accuracy per
variant with its seed spread, accuracy vs latency with the Pareto front (dominated trials grey),
SNR along depth of every analysed trial on one chart, heads per label vs head count. From the
sweep's Optuna study: each axis's fANOVA importance for val accuracy (``importance/<axis>``) and
latency (``importance_latency_ms_b1/<axis>``), also as lines in the description. The sweep calls it when it closes; ``orchestrator report`` refreshes it.
"""

from __future__ import annotations

import csv
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric, Run, RunTag  # noqa: E402

from orchestrator.workbench.importance import (  # noqa: E402
    Importance,
    finished_trials,
    importance,
    plot_parallel_coordinates,
)
from orchestrator.workbench.runs import pareto_front, seed_spreads, trial_rows  # noqa: E402
from orchestrator.workbench.study_store import logged_study_url  # noqa: E402
from orchestrator.workbench.tracking import ANALYSIS, BEST_RUN, STUDY, SWEEP, child_runs  # noqa: E402

NOTE = "mlflow.note.content"
MAX_NOTE_ROWS = 30  # the description stays within MLflow's tag size; trials.csv holds every trial
TABLE = (
    "name",
    "variant",
    "seed",
    "status",
    "epochs",
    "precision",
    "machine",
    "val_acc",
    "test_acc",
    "latency_ms_b1",
    "params",
    "run_id",
)


@dataclass
class SweepSummary:
    """What the parent run shows: the rows, the best trial, the figures written."""

    rows: list[dict]
    best: dict | None
    figures: dict[str, Path] = field(default_factory=dict)
    markdown: str = ""
    importance: list[str] = field(default_factory=list)  # what mattered, one line per objective


def summary_rows(client: MlflowClient, parent: Run) -> list[dict]:
    """One row per trial run: ``runs``' columns plus the run name, head count and analysis series."""
    runs = {r.info.run_id: r for r in child_runs(client, parent.info.experiment_id, parent.info.run_id)}
    rows = trial_rows(client, parent)
    for row in rows:
        run = runs[row["run_id"]]
        row["name"] = run.info.run_name
        row["heads"] = run.data.params.get("model.heads")
        row["analysed"] = run.data.tags.get(ANALYSIS) == "done"
    return rows


def _fmt(value, spec: str = "{:.4f}") -> str:
    return "-" if value is None else spec.format(value)


def markdown(parent: Run, rows: list[dict], best: dict | None, mattered: list[str] = ()) -> str:
    """The parent run's description: what the sweep is, who won, the trials table."""
    finished = [r for r in rows if r["status"] == "FINISHED"]
    lines = [
        f"**Sweep {parent.data.tags.get('unitlab.sweep', parent.info.run_name)}**: "
        f"{len(finished)} of {len(rows)} trials finished."
    ]
    if best is not None:
        lines.append(
            f"Best on validation: **{best['name']}** ({best['variant']}, seed {best['seed']}): "
            f"val {best['val_acc']:.4f}, test {_fmt(best['test_acc'])}, run `{best['run_id']}`."
        )
    lines += [
        "",
        "| trial | variant | seed | status | epochs | val | test | latency b1 (ms) | params |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    shown = sorted(rows, key=lambda r: -(r["val_acc"] or -1))[:MAX_NOTE_ROWS]
    for r in shown:
        lines.append(
            f"| {r['name']} | {r['variant']} | {r['seed']} | {r['status']} | {r['epochs']} | "
            f"{_fmt(r['val_acc'])} | {_fmt(r['test_acc'])} | {_fmt(r['latency_ms_b1'], '{:.2f}')} | "
            f"{_fmt(r['params'], '{:,.0f}')} |"
        )
    if len(rows) > len(shown):
        lines.append(f"| ... {len(rows) - len(shown)} more trials in `summary/trials.csv` |||||||||")
    spreads = seed_spreads(rows)
    if spreads:
        lines += ["", "Variants with several seeds (mean ± sample sd, 95 % t interval over seeds):", ""]
        lines += [f"- {line}" for line in spreads]
    if mattered:
        lines += ["", *[f"- {line}" for line in mattered]]
    machines = sorted({r["machine"] for r in rows if r.get("machine")})
    lines += ["", *[f"Ran on: {where}." for where in machines]]
    lines += ["", "Figures and `trials.csv` are under this run's artifacts, `summary/`."]
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=TABLE, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot_accuracy_by_variant(rows: list[dict], path: Path) -> Path | None:
    """Test (and val) accuracy per variant: each seed a dot, the mean a bar."""
    finished = [r for r in rows if r["status"] == "FINISHED" and r["test_acc"] is not None]
    if not finished:
        return None
    variants = sorted({r["variant"] for r in finished})
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(variants)), 4))
    for i, variant in enumerate(variants):
        mine = [r for r in finished if r["variant"] == variant]
        for offset, key, colour in ((-0.18, "val_acc", "tab:blue"), (0.18, "test_acc", "tab:orange")):
            values = [r[key] for r in mine if r[key] is not None]
            ax.bar(
                i + offset,
                sum(values) / len(values),
                width=0.34,
                color=colour,
                alpha=0.45,
                label=key if i == 0 else None,
            )
            ax.scatter([i + offset] * len(values), values, color=colour, s=18, zorder=3)
    ax.set_xticks(range(len(variants)), [v.replace(",", "\n") for v in variants], fontsize=7)
    return finish(fig, ax, path, "", "accuracy (dots: seeds, bars: mean)", "accuracy per variant", grid_axis="y")


def plot_accuracy_vs_latency(rows: list[dict], path: Path) -> Path | None:
    """Test accuracy vs batch-1 latency per trial: the Pareto front (higher accuracy, lower latency)
    coloured and joined, the dominated trials grey."""
    points = [
        r for r in rows if r["status"] == "FINISHED" and r["test_acc"] is not None and r["latency_ms_b1"] is not None
    ]
    if not points:
        return None
    front = pareto_front(points, {"test_acc": "max", "latency_ms_b1": "min"})
    fig, ax = plt.subplots(figsize=(6, 4))
    dominated = [r for r in points if r["run_id"] not in front]
    ax.scatter(
        [r["latency_ms_b1"] for r in dominated],
        [r["test_acc"] for r in dominated],
        s=22,
        color="0.7",
        label="dominated",
    )
    for r in points:
        ax.annotate(
            r["name"], (r["latency_ms_b1"], r["test_acc"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
        )
    edge = sorted((r for r in points if r["run_id"] in front), key=lambda r: r["latency_ms_b1"])
    ax.plot(
        [r["latency_ms_b1"] for r in edge],
        [r["test_acc"] for r in edge],
        color="tab:red",
        marker="o",
        ms=5,
        lw=1.2,
        label="Pareto front",
    )
    return finish(fig, ax, path, "latency at batch 1 (ms)", "test accuracy", "accuracy vs latency")


def depth_history(client: MlflowClient, run_id: str, name: str) -> dict[int, float]:
    """A depth series of a run as {step: value} (the latest value where a step was logged twice)."""
    values: dict[int, tuple[int, float]] = {}
    for m in client.get_metric_history(run_id, name):
        if m.step not in values or m.timestamp >= values[m.step][0]:
            values[m.step] = (m.timestamp, m.value)
    return {step: value for step, (_, value) in sorted(values.items())}


def tap_names(client: MlflowClient, run_id: str, folder: Path) -> dict[int, str]:
    """step -> tap from a run's ``analysis/depth_index.csv`` (empty if it has none)."""
    try:
        path = client.download_artifacts(run_id, "analysis/depth_index.csv", str(folder))
    except Exception:  # noqa: BLE001 - an analysis logged before depth series existed
        return {}
    with open(path, newline="") as handle:
        return {int(row["step"]): row["tap"] for row in csv.DictReader(handle)}


def merged_tap_order(tap_lists: list[list[str]]) -> list[str]:
    """One depth order for taps of several models (longest first; a tap a model has alone goes
    right after its predecessor in that model), so a conv-replaced block sits where attention was."""
    order: list[str] = []
    for names in sorted(tap_lists, key=len, reverse=True):
        for i, name in enumerate(names):
            if name not in order:
                before = names[i - 1] if i else None
                order.insert(order.index(before) + 1 if before in order else len(order), name)
    return order


def plot_snr_by_depth(client: MlflowClient, rows: list[dict], path: Path) -> Path | None:
    """SNR along depth of every analysed trial, one line each, taps aligned by name across models."""
    curves = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in rows:
            if not r["analysed"]:
                continue
            series = depth_history(client, r["run_id"], "snr_by_depth")
            names = tap_names(client, r["run_id"], Path(tmp) / r["run_id"])
            if series and names:
                curves.append(
                    (
                        r["name"],
                        {names[step]: value for step, value in series.items() if step in names},
                        [names[k] for k in sorted(names)],
                    )
                )
    if not curves:  # analyses logged before depth series existed
        return None
    order = merged_tap_order([taps for _, _, taps in curves])
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values, taps in curves:
        xs = [order.index(t) for t in taps if t in values]
        ax.plot(xs, [values[t] for t in taps if t in values], marker="o", ms=3, label=name)
    ax.set_xticks(range(len(order)), order, rotation=60, ha="right", fontsize=7)
    return finish(
        fig, ax, path, "tap (depth order; models without a tap skip it)", "SNR", "SNR along depth", legend_size=7
    )


def plot_heads_per_label(client: MlflowClient, rows: list[dict], path: Path) -> Path | None:
    """Mean heads per label (SHP) at every head tap vs the trial's head count."""
    points = []
    for r in rows:
        if r["analysed"] and r["heads"]:
            for step, value in depth_history(client, r["run_id"], "heads_per_label_by_depth").items():
                points.append((int(r["heads"]), value, step))
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(5, 4))
    dots = ax.scatter([p[0] for p in points], [p[1] for p in points], c=[p[2] for p in points], cmap="viridis", s=24)
    fig.colorbar(dots, ax=ax, label="depth (tap index)")
    heads = sorted({p[0] for p in points})
    ax.plot(heads, heads, color="grey", lw=0.8, ls="--", label="every head")
    ax.set_xscale("log", base=2)
    ax.set_xticks(heads, [str(h) for h in heads])
    return finish(
        fig,
        ax,
        path,
        "heads per block",
        "heads recognising a label (mean)",
        "heads per label vs head count",
    )


def finish(
    fig, ax, path: Path, xlabel: str, ylabel: str, title: str, legend_size: int = 8, grid_axis: str = "both"
) -> Path:
    """Label, legend and grid one chart, then save it (the one style of every sweep figure)."""
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=legend_size)
    ax.grid(axis=grid_axis, alpha=0.3)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sweep_importance(parent: Run, rows: list[dict]) -> Importance:
    """The axes' importance from the sweep's Optuna study (empty with a note when it has none)."""
    url = logged_study_url(parent.data.tags.get(STUDY, ""))
    if url is None:
        return Importance(note="importance: this sweep has no Optuna study")
    return importance(finished_trials(url, parent.data.tags.get(SWEEP, parent.info.run_name)), rows)


def summarize_sweep(client: MlflowClient, parent: Run, out_dir: Path | None = None) -> SweepSummary:
    """Compute and log the sweep summary onto the parent run (see the module docstring)."""
    rows = summary_rows(client, parent)
    finished = [r for r in rows if r["status"] == "FINISHED" and r["val_acc"] is not None]
    best = max(finished, key=lambda r: r["val_acc"]) if finished else None
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out_dir or tmp)
        figures_dir = folder / "figures"
        figures_dir.mkdir(parents=True, exist_ok=True)
        mattered = sweep_importance(parent, rows)
        drawn = {
            "parallel_coordinates": plot_parallel_coordinates(mattered, figures_dir / "parallel_coordinates.png"),
            "accuracy_by_variant": plot_accuracy_by_variant(rows, figures_dir / "accuracy_by_variant.png"),
            "accuracy_vs_latency": plot_accuracy_vs_latency(rows, figures_dir / "accuracy_vs_latency.png"),
            "snr_by_depth": plot_snr_by_depth(client, rows, figures_dir / "snr_by_depth.png"),
            "heads_per_label": plot_heads_per_label(client, rows, figures_dir / "heads_per_label.png"),
        }
        summary = SweepSummary(
            rows,
            best,
            {k: v for k, v in drawn.items() if v is not None},
            markdown(parent, rows, best, mattered.lines()),
            mattered.lines(),
        )
        write_csv(rows, folder / "trials.csv")
        (folder / "summary.md").write_text(summary.markdown)
        run_id, now = parent.info.run_id, int(time.time() * 1000)
        metrics = {"n_trials": len(rows), "n_trials_finished": len(finished)}
        if best is not None:
            metrics["best_val_acc"] = best["val_acc"]
            if best["test_acc"] is not None:
                metrics["best_test_acc"] = best["test_acc"]
        for objective, scores in mattered.scores.items():
            prefix = "importance" if objective == "val_acc" else f"importance_{objective}"
            metrics.update({f"{prefix}/{axis}": score for axis, score in scores.items()})
        tags = {NOTE: summary.markdown, **({BEST_RUN: best["run_id"]} if best else {})}
        client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
            tags=[RunTag(k, v) for k, v in tags.items()],
        )
        client.log_artifacts(run_id, str(folder), "summary")
        if out_dir is None:  # the temporary folder goes away
            summary.figures = {}
    return summary
