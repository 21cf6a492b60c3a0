"""Committees of different structures against committees of one structure's
seeds, on disjoint draws (claim 4; ``analysis.committees.draws``).

``python -m orchestrator committee draws --experiment NAME [--filter F] [--no-calibrate]`` reads the
trial runs' stored probabilities, forms every structure draw (one model of each variant, same seed)
and every variant's seed committee (as many seeds as there are variants), prints each with its test
accuracy and the difference of the two kinds' means with its 95 % interval over test images and
committees, and logs a run (tag ``unitlab.role=committee_draws``; metrics ``structures_test_acc``,
``seeds_test_acc``, ``difference`` and ``difference_ci_low`` / ``_high``; ``draws/draws.csv``).
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

from analysis.committees.draws import DrawComparison, compare_draws
from orchestrator.committees.candidates import candidate_runs, load_runs
from orchestrator.schema import CommitteeError
from orchestrator.workbench.tracking import ROLE, SWEEP, add_tracking_uri, open_client, ui_links
from trainables.schema import InputError, check_int, refuse

ROLE_DRAWS = "committee_draws"
FIELDS = ("kind", "name", "members", "val_acc", "test_acc", "best_member_test_acc")


def describe(comparison: DrawComparison, ids: list[str]) -> list[dict]:
    """One row per committee, members by run id."""
    return [
        {
            "kind": c.kind,
            "name": c.name,
            "members": ",".join(ids[m] for m in c.members),
            "val_acc": c.val_acc,
            "test_acc": c.test_acc,
            "best_member_test_acc": c.best_member_test_acc,
        }
        for c in comparison.committees
    ]


def text(comparison: DrawComparison, label: str) -> str:
    """The committees of both kinds and the verdict, as printed."""
    lines = [f"committees of {label}: one model of each structure per seed, against each structure's seeds"]
    lines.append(f"  {'kind':<10}  {'draw':<44}  {'test_acc':>8}  {'best member':>11}  {'gain':>7}")
    for c in comparison.committees:
        name = f"seed {c.name}" if c.kind == "structures" else c.name
        lines.append(
            f"  {c.kind:<10}  {name:<44}  {c.test_acc:8.4f}  {c.best_member_test_acc:11.4f}  "
            f"{c.test_acc - c.best_member_test_acc:+7.4f}"
        )
    mean = {
        kind: sum(c.test_acc for c in comparison.of(kind)) / len(comparison.of(kind))
        for kind in ("structures", "seeds")
    }
    lines.append(
        f"  mean test acc: structures {mean['structures']:.4f} ({len(comparison.of('structures'))} draws), "
        f"seeds {mean['seeds']:.4f} ({len(comparison.of('seeds'))} committees)"
    )
    lines.append(f"  structures minus seeds {comparison.difference.text()}")
    return "\n".join(lines)


def log_draws(
    client: MlflowClient, experiment_id: str, comparison: DrawComparison, rows: list[dict], params: dict, tags: dict
) -> str:
    """Log the comparison as a FINISHED run (FAILED if logging breaks); returns its id."""
    run = client.create_run(experiment_id, tags={ROLE: ROLE_DRAWS, **tags}, run_name="committee·draws")
    run_id = run.info.run_id
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "draws.csv"
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=FIELDS)
                writer.writeheader()
                writer.writerows(rows)
            client.log_artifact(run_id, str(path), "draws")
        d = comparison.difference
        metrics = {
            "structures_test_acc": sum(c.test_acc for c in comparison.of("structures"))
            / len(comparison.of("structures")),
            "seeds_test_acc": sum(c.test_acc for c in comparison.of("seeds")) / len(comparison.of("seeds")),
            "difference": d.estimate,
            "difference_ci_low": d.low,
            "difference_ci_high": d.high,
            "structure_draws": len(comparison.of("structures")),
            "seed_committees": len(comparison.of("seeds")),
        }
        stamp = run.info.start_time
        client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), stamp, 0) for k, v in metrics.items()],
            params=[Param(k, str(v)) for k, v in params.items()],
        )
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


def run(args: argparse.Namespace) -> int:
    """Handle ``committee draws``; bad input gives one line on stderr and exit code 2."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        check_int(args.n_boot, "--n-boot", 100, 100_000)
        client, uri = open_client(args.tracking_uri, create=False)
        run_ids = [r.strip() for r in (args.runs or "").split(",") if r.strip()]
        runs, home, label = candidate_runs(client, args.experiment, args.filter, run_ids)
        loaded = load_runs(client, runs, label, calibrate=args.calibrate)
        try:
            comparison = compare_draws(
                loaded.val,
                loaded.test,
                [c.variant for c in loaded.valid],
                [c.seed for c in loaded.valid],
                n_boot=args.n_boot,
            )
        except ValueError as err:
            raise CommitteeError(f"committee draws: {err}") from None
        rows = describe(comparison, [c.run_id for c in loaded.valid])
        sweeps = {c.sweep for c in loaded.valid}
        tags = {SWEEP: sweeps.pop()} if len(sweeps) == 1 and None not in sweeps else {}
        params = {
            "filter": args.filter or "",
            "calibrate": args.calibrate,
            "n_boot": args.n_boot,
            "excluded_runs": len(loaded.excluded),
        }
        run_id = log_draws(client, home, comparison, rows, params, tags)
        print(text(comparison, label))
        for rid, why in loaded.excluded:
            print(f"  excluded {rid}: {why}")
        print(ui_links(uri, home, run_id, "committee draws"))
        return 0
    except (InputError, MlflowException, OSError) as err:
        return refuse(err)


def add_draws_parser(sub) -> argparse.ArgumentParser:
    """Register ``committee draws`` on the committee command's subparsers."""
    parser = sub.add_parser(
        "draws",
        help="committees of different structures against each structure's seed committee",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--experiment", help="experiment (sweep) name, or several, comma-separated")
    parser.add_argument("--runs", default=None, help="explicit candidate run ids, comma-separated")
    parser.add_argument("--filter", help="extra MLflow filter string on the trial runs (e.g. to leave a variant out)")
    parser.add_argument(
        "--no-calibrate", dest="calibrate", action="store_false", help="average raw member probabilities"
    )
    parser.add_argument("--n-boot", type=int, default=2000, help="bootstrap draws for the interval (default 2000)")
    add_tracking_uri(parser, nested=True)
    return parser
