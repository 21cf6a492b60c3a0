"""``runs NAME``: the trials of a sweep with status and key metrics, read from MLflow."""
from __future__ import annotations

from mlflow import MlflowClient

from orchestrator.sweep_spec import SweepError
from orchestrator.tracking import ERROR, METRICS, TRIAL_ID, child_runs, find_parent

COLUMNS = ("trial", "status", "variant", "seed", "epochs", "val_acc", "test_acc", "latency_ms_b1", "params", "run_id")
FORMATS = {"val_acc": "{:.4f}", "test_acc": "{:.4f}", "latency_ms_b1": "{:.2f}", "params": "{:,.0f}"}


def trial_rows(client: MlflowClient, parent) -> list[dict]:
    """One row per child run, sorted by variant and seed."""
    rows = []
    for run in child_runs(client, parent.info.experiment_id, parent.info.run_id):
        tags, metrics = run.data.tags, run.data.metrics
        rows.append({
            "trial": tags.get(TRIAL_ID, ""),
            "status": run.info.status,
            "variant": tags.get("unitlab.variant", ""),
            "seed": tags.get("unitlab.seed", ""),
            "epochs": len(client.get_metric_history(run.info.run_id, "val_acc")),
            **{k: metrics.get(k) for k in ("val_acc", "test_acc", "latency_ms_b1", "params")},
            "run_id": run.info.run_id,
            "error": tags.get(ERROR, "") if run.info.status == "FAILED" else "",
            "metrics": metrics,
        })
    return sorted(rows, key=lambda r: (r["variant"], int(r["seed"] or 0), r["trial"]))


def pareto_front(rows: list[dict], objectives: dict[str, str]) -> set[str]:
    """Run ids of the finished rows that no other finished row dominates on the objectives."""
    sign = {"max": -1.0, "min": 1.0}
    points = {r["run_id"]: [sign[mode] * r["metrics"][k] for k, mode in objectives.items()]
              for r in rows if r["status"] == "FINISHED" and all(k in r["metrics"] for k in objectives)}

    def dominates(a: list[float], b: list[float]) -> bool:
        return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))

    return {rid for rid, p in points.items() if not any(dominates(q, p) for q in points.values())}


def format_runs(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """The table of a sweep's trials, a Pareto mark for multi-objective sweeps, and the MLflow UI command."""
    parent = find_parent(client, name)
    if parent is None:
        raise SweepError(f"runs {name}: no sweep of that name in {tracking_uri}")
    rows = trial_rows(client, parent)
    objectives = dict(item.split(":") for item in parent.data.tags.get(METRICS, "val_acc:max").split(","))
    front = pareto_front(rows, objectives) if len(objectives) > 1 else set()
    header = list(COLUMNS) + (["pareto"] if front else [])
    table = [header]
    for row in rows:
        cells = ["-" if row[c] is None else FORMATS.get(c, "{}").format(row[c]) for c in COLUMNS]
        table.append(cells + (["*" if row["run_id"] in front else ""] if front else []))
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in table]
    lines += [f"  {r['trial']}: {r['error']}" for r in rows if r["error"]]
    lines.append(f"{len(rows)} trials in sweep {name} (parent run {parent.info.run_id}, {parent.info.status})")
    lines.append(f"MLflow UI: mlflow ui --backend-store-uri {tracking_uri}")
    return "\n".join(lines)
