"""``runs NAME``: the trials of a sweep with status and key metrics, read from MLflow."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from mlflow import MlflowClient

from analysis.stats import grouped_bootstrap, mean_spread
from orchestrator.schema import SweepError
from orchestrator.workbench.tracking import (
    CELL,
    ERROR,
    LINEAGE,
    METRICS,
    SEED,
    SWEEP,
    TRIAL_ID,
    VARIANT,
    child_runs,
    find_parent,
    prune_runs,
    ui_links,
)
from trainables.probs import read_probs

COLUMNS = (
    "trial",
    "status",
    "variant",
    "seed",
    "epochs",
    "precision",
    "val_acc",
    "test_acc",
    "latency_ms_b1",
    "params",
    "run_id",
)
PRUNE_ACCURACIES = ("acc_before_val", "acc_pruned_val", "acc_finetuned_val", "acc_finetuned_test")
PRUNE_COLUMNS = ("status", "variant", "seed", "prune", "dilution", "params_kept", *PRUNE_ACCURACIES, "run_id")
FORMATS = {
    "val_acc": "{:.4f}",
    "test_acc": "{:.4f}",
    "latency_ms_b1": "{:.2f}",
    "params": "{:,.0f}",
    "params_kept": "{:,.0f}",
    "dilution": "{:.3f}",
    **{c: "{:.4f}" for c in PRUNE_ACCURACIES},
}


def trial_rows(client: MlflowClient, parent) -> list[dict]:
    """One row per child run, sorted by variant and seed."""
    rows = []
    for run in child_runs(client, parent.info.experiment_id, parent.info.run_id):
        tags, metrics = run.data.tags, run.data.metrics
        rows.append(
            {
                "trial": tags.get(TRIAL_ID, ""),
                "status": run.info.status,
                "variant": tags.get(VARIANT, ""),
                "seed": tags.get(SEED, ""),
                "epochs": len(client.get_metric_history(run.info.run_id, "val_acc")),
                "precision": tags.get("unitlab.train_precision", ""),
                "machine": machine(tags),
                **{k: metrics.get(k) for k in ("val_acc", "test_acc", "latency_ms_b1", "params")},
                "run_id": run.info.run_id,
                "error": tags.get(ERROR, "") if run.info.status == "FAILED" else "",
                "metrics": metrics,
            }
        )
    return sorted(rows, key=lambda r: (r["variant"], int(r["seed"] or 0), r["trial"]))


def machine(tags: dict[str, str]) -> str:
    """Where a run ran, from its environment tags: ``cpu (AMD EPYC; avx512_bf16,avx2), torch 2.14.1,
    train bf16 / eval fp32``; empty for runs logged before these tags existed."""
    if "unitlab.device" not in tags:
        return ""
    where = tags["unitlab.device"]
    if "unitlab.cpu" in tags:
        where += f" ({tags['unitlab.cpu']}; {tags.get('unitlab.cpu_flags', '')})"
    if "unitlab.torch" in tags:
        where += f", torch {tags['unitlab.torch']}"
    if "unitlab.train_precision" in tags:
        where += f", train {tags['unitlab.train_precision']} / eval {tags.get('unitlab.eval_precision', '?')}"
    return where


def pareto_front(rows: list[dict], objectives: dict[str, str]) -> set[str]:
    """Run ids of the finished rows that no other finished row dominates on the objectives."""
    sign = {"max": -1.0, "min": 1.0}
    points = {
        r["run_id"]: [sign[mode] * r["metrics"][k] for k, mode in objectives.items()]
        for r in rows
        if r["status"] == "FINISHED" and all(k in r["metrics"] for k in objectives)
    }

    def dominates(a: list[float], b: list[float]) -> bool:
        return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))

    return {rid for rid, p in points.items() if not any(dominates(q, p) for q in points.values())}


def prune_rows(client: MlflowClient, parent) -> list[dict]:
    """One row per pruned trial of the sweep, by parent variant, seed and cell."""
    rows = []
    for run in prune_runs(client, parent.info.experiment_id, parent.data.tags[SWEEP]):
        tags, metrics = run.data.tags, run.data.metrics
        rows.append(
            {
                "status": run.info.status,
                "variant": tags.get(VARIANT, ""),
                "seed": tags.get(SEED, ""),
                "prune": tags.get(CELL, ""),
                **{k: metrics.get(k) for k in ("dilution", "params_kept", *PRUNE_ACCURACIES)},
                "run_id": run.info.run_id,
                "parent_run": tags.get(LINEAGE, ""),
            }
        )
    return sorted(rows, key=lambda r: (r["variant"], int(r["seed"] or 0), r["prune"]))


def _table(columns: tuple[str, ...], rows: list[dict]) -> str:
    table = [list(columns)] + [
        ["-" if r[c] is None else FORMATS.get(c, "{}").format(r[c]) for c in columns] for r in rows
    ]
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in table)


# Head statistics of the deepest analysed head tap (claim 2; its latest depth-series step), as
# (label, metric, decimals).
HEAD_SPREADS = (
    ("labels per head", "labels_per_head_by_depth", 1),
    ("heads per label", "heads_per_label_by_depth", 2),
    ("largest share of a label's nodes in one head", "head_max_share_by_depth", 3),
    ("its shuffled control", "head_max_share_control_by_depth", 3),
)


def seed_spreads(rows: list[dict]) -> list[str]:
    """For every variant with several finished seeds: its mean test (and val) accuracy with the sample
    sd and the 95 % t interval over seeds (analysis/stats.py), one line each; where every seed has
    head statistics (an analysed head tap), a second line with theirs."""
    by_variant: dict[str, list[dict]] = {}
    for r in rows:
        if r["status"] == "FINISHED" and r["test_acc"] is not None:
            by_variant.setdefault(r["variant"], []).append(r)
    lines = []
    for variant, runs in sorted(by_variant.items()):
        if len(runs) < 2:
            continue
        lines.append(
            f"{variant}: test {mean_spread([r['test_acc'] for r in runs]).text()}; "
            f"val {mean_spread([r['val_acc'] for r in runs]).text()}"
        )
        heads = [
            f"{label} {mean_spread([r['metrics'][key] for r in runs]).text(1.0, '', digits)}"
            for label, key, digits in HEAD_SPREADS
            if all(key in r.get("metrics", {}) for r in runs)
        ]
        share, control = HEAD_SPREADS[2][1], HEAD_SPREADS[3][1]
        if all(share in r.get("metrics", {}) and control in r["metrics"] for r in runs):
            above = mean_spread([r["metrics"][share] - r["metrics"][control] for r in runs])
            heads.append(f"share above the control {above.text(1.0, '', 3)}")  # paired within each seed
        if heads:
            lines.append(f"{variant} heads: " + "; ".join(heads))
    return lines


def test_answers(client: MlflowClient, run_ids: list[str]) -> np.ndarray:
    """Per-image correctness on test of each run (rows), from its stored ``probs/probs_test.parquet``;
    every run must have answered the same images in the same order."""
    rows, reference = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for run_id in run_ids:
            path = client.download_artifacts(run_id, "probs/probs_test.parquet", tmp)
            index, labels, probs, _ = read_probs(Path(path))
            if reference is None:
                reference = (labels, index)
            elif not (np.array_equal(labels, reference[0]) and np.array_equal(index, reference[1])):
                raise SweepError(f"run {run_id} answered other test images than {run_ids[0]}")
            rows.append(probs.argmax(axis=1) == labels)
    return np.stack(rows)


def variant_differences(client: MlflowClient, rows: list[dict], baseline: str) -> list[str]:
    """Every other variant's test accuracy minus ``baseline``'s, the mean over each one's finished
    seeds, with a 95 % interval over the test images and the seeds (``analysis.stats.grouped_bootstrap``)."""
    by_variant: dict[str, list[str]] = {}
    for r in rows:
        if r["status"] == "FINISHED" and r["test_acc"] is not None:
            by_variant.setdefault(r["variant"], []).append(r["run_id"])
    if baseline not in by_variant:
        known = "; ".join(sorted(by_variant)) or "none finished"
        raise SweepError(f"--versus: no finished trial of variant {baseline!r} (variants: {known})")
    reference = test_answers(client, by_variant[baseline])
    lines = []
    for variant, run_ids in sorted(by_variant.items()):
        if variant != baseline:
            d = grouped_bootstrap(test_answers(client, run_ids), reference)
            lines.append(f"{variant} minus {baseline}: {d.text()}")
    return lines


def format_runs(client: MlflowClient, name: str, tracking_uri: str, versus: str | None = None) -> str:
    """The table of a sweep's trials, a Pareto mark for multi-objective sweeps, and the MLflow UI
    command; with ``versus`` (a variant) every other variant's difference from it with its interval."""
    parent = find_parent(client, name)
    if parent is None:
        raise SweepError(f"runs {name}: no sweep of that name in {tracking_uri}")
    rows = trial_rows(client, parent)
    objectives = dict(item.split(":") for item in parent.data.tags.get(METRICS, "val_acc:max").split(","))
    front = pareto_front(rows, objectives) if len(objectives) > 1 else set()
    for row in rows:
        row["pareto"] = "*" if row["run_id"] in front else ""
    lines = [_table(COLUMNS + (("pareto",) if front else ()), rows)]
    lines += [f"  {r['trial']}: {r['error']}" for r in rows if r["error"]]
    lines.append(f"{len(rows)} trials in sweep {name} (parent run {parent.info.run_id}, {parent.info.status})")
    lines += [f"ran on: {where}" for where in sorted({r["machine"] for r in rows if r["machine"]})]
    spreads = seed_spreads(rows)
    if spreads:
        lines += ["variants with several seeds:", *[f"  {line}" for line in spreads]]
    if versus is not None:
        lines += [
            "test accuracy differences (mean over seeds):",
            *[f"  {x}" for x in variant_differences(client, rows, versus)],
        ]
    pruned = prune_rows(client, parent)
    if pruned:
        lines += ["", _table(PRUNE_COLUMNS, pruned), f"{len(pruned)} pruned trials (nested under their parents' runs)"]
    lines.append(ui_links(tracking_uri, parent.info.experiment_id, parent.info.run_id, "sweep"))
    return "\n".join(lines)
