"""A sweep in a few lines: the best trial, the depth rise, the committee, pruning, where to look.

``report NAME`` ends with these lines (so ``make demo`` does); every number is read back from MLflow.
"""

from __future__ import annotations

from mlflow import MlflowClient
from mlflow.entities import Run

from orchestrator.workbench.runs import prune_rows
from orchestrator.workbench.summary import depth_history
from orchestrator.workbench.tracking import ROLE, ROLE_COMMITTEE, SWEEP, search_all


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def points(estimate: float, low: float | None = None, high: float | None = None) -> str:
    """``+1.20 points`` with its 95 % interval ``[+0.35, +2.05]`` where one is known."""
    text = f"{100 * estimate:+.2f} points"
    return text if low is None or high is None else f"{text} [95 % CI {100 * low:+.2f}, {100 * high:+.2f}]"


def depth_rise(series: list[list[float]]) -> str | None:
    """How readout accuracy moves along depth, one list of values (shallow to deep) per trial:
    ``readout accuracy rises from the first to the last tap in 3 of 3 trials (11 of 15 steps up)``."""
    curves = [values for values in series if len(values) >= 2]
    if not curves:
        return None
    rising = sum(values[-1] > values[0] for values in curves)
    steps = sum(len(values) - 1 for values in curves)
    up = sum(b > a for values in curves for a, b in zip(values, values[1:]))
    return (
        f"readout accuracy rises from the first to the last tap in {rising} of {len(curves)} trials "
        f"({up} of {steps} steps up)"
    )


def readout_series(client: MlflowClient, rows: list[dict]) -> list[list[float]]:
    """Readout accuracy along depth (shallow to deep) of every analysed trial."""
    return [list(depth_history(client, r["run_id"], "readout_acc_by_depth").values()) for r in rows if r["analysed"]]


def latest_committee(client: MlflowClient, experiment_id: str) -> Run | None:
    runs = search_all(client, [experiment_id], f"tags.`{ROLE}` = '{ROLE_COMMITTEE}'")
    return max(runs, key=lambda r: r.info.start_time, default=None)


def committee_line(run: Run) -> str:
    m = run.data.metrics
    line = (
        f"committee of {int(m.get('n_members', m.get('size', 0)))} ({run.info.run_name}): test "
        f"{percent(m['committee_test_acc'])}, {points(m['gain'], m.get('gain_ci_low'), m.get('gain_ci_high'))} "
        f"over its best member"
    )
    if "vs_seed" in m:
        line += f", {points(m['vs_seed'], m['vs_seed_ci_low'], m['vs_seed_ci_high'])} over the seed committee"
    else:
        line += "; no seed control (no variant with two seeds)"
    return line


def prune_line(rows: list[dict], best_run: str | None) -> str | None:
    """The cells of one pruned parent (the best trial where it was pruned): val accuracy right after
    pruning -> after fine-tuning."""
    done = [r for r in rows if r["status"] == "FINISHED" and r["acc_pruned_val"] is not None]
    if not done:
        return None
    parent = best_run if any(r["parent_run"] == best_run for r in done) else done[0]["parent_run"]
    done = [r for r in done if r["parent_run"] == parent]
    cells = ", ".join(
        f"{r['prune'].split(',')[0]} {percent(r['acc_pruned_val'])} -> {percent(r['acc_finetuned_val'])}"
        + (f" ({r['dilution']:.0%} removed)" if r["dilution"] else "")
        for r in done
    )
    return f"pruning {done[0]['variant']} seed {done[0]['seed']} (val, pruned -> fine-tuned): {cells}"


def recap(client: MlflowClient, parent: Run, rows: list[dict], best: dict | None) -> list[str]:
    """The lines that sum up sweep ``parent``; ``rows``/``best`` are its summary rows and best trial."""
    finished = [r for r in rows if r["status"] == "FINISHED"]
    lines = [
        f"sweep {parent.data.tags.get(SWEEP, parent.info.run_name)}: {len(finished)} of {len(rows)} trials finished"
    ]
    if best:
        lines.append(
            f"best trial {best['name']}: val {percent(best['val_acc'])}, test {percent(best['test_acc'])}; "
            f"trials' test accuracy {percent(min(r['test_acc'] for r in finished if r['test_acc'] is not None))}"
            f" to {percent(max(r['test_acc'] for r in finished if r['test_acc'] is not None))}"
        )
    rise = depth_rise(readout_series(client, rows))
    if rise:
        lines.append(rise)
    committee = latest_committee(client, parent.info.experiment_id)
    if committee:
        lines.append(committee_line(committee))
    pruned = prune_line(prune_rows(client, parent), best["run_id"] if best else None)
    if pruned:
        lines.append(pruned)
    return lines
