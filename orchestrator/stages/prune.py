"""``python -m orchestrator prune TARGET --methods afcc,random [...]``: prune finished trials later.

TARGET is a sweep name (all its finished training trials), ``NAME:best`` (the trial the sweep chose
on validation) or one trial's run id. The pruned trials
run as the sweep's prune stage (``prune_stage.run_prune_stage``): nested under their parents'
runs, with lineage tags, one run per (parent, cell), so a repeated command adds nothing.

Methods that prune by label sets need the parents' analysis (``orchestrator analyze``) at each
threshold, unless ``--analyze`` lets the pruned trials compute the label sets themselves. Bad input
(an unknown target, a parent without analysis, a level or threshold out of range, a method that
does not fit the model) prints one line and exits with 2 before anything runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from analysis.pruning.job import PruneConfig, PrunePlan
from orchestrator.schema import SweepError
from orchestrator.sweeps.cluster import check_resources, connect_ray
from orchestrator.sweeps.prune_stage import PruneContext, run_prune_stage
from orchestrator.sweeps.run import logged_spec
from orchestrator.sweeps.stage_spec import PruneSpec, parse_prune
from orchestrator.workbench.analysis_log import analysed_at
from orchestrator.workbench.runs import format_runs
from orchestrator.workbench.tracking import (
    ANALYSIS,
    ANALYSIS_THRESHOLD,
    BEST_RUN,
    CELL,
    ROLE,
    SWEEP,
    VARIANT,
    add_tracking_uri,
    child_runs,
    find_parent,
    open_client,
    prune_runs,
)
from trainables.models import build_model
from trainables.schema import InputError, refuse


def target_parents(client: MlflowClient, target: str) -> tuple[Run, list[Run]]:
    """(the sweep's parent run, the finished training trials TARGET names): NAME (all), NAME:best (the
    trial the sweep chose on validation) or a trial's run id."""
    if target.endswith(":best"):
        parent = find_parent(client, target.removesuffix(":best"))
        if parent is None or BEST_RUN not in parent.data.tags:
            raise SweepError(
                f"prune {target}: no sweep of that name with a best trial (it is set when the sweep closes)"
            )
        target = parent.data.tags[BEST_RUN]
    parent = find_parent(client, target)
    if parent is not None:
        runs = [
            r for r in child_runs(client, parent.info.experiment_id, parent.info.run_id) if r.info.status == "FINISHED"
        ]
        if not runs:
            raise SweepError(f"prune {target}: the sweep has no finished trials")
        return parent, runs
    try:
        run = client.get_run(target)
    except MlflowException:
        raise SweepError(f"prune {target}: neither a sweep name nor a run id") from None
    if run.data.tags.get(ROLE) != "trial" or run.info.status != "FINISHED":
        raise SweepError(f"prune {target}: not a finished training trial run")
    return find_parent(client, run.data.tags[SWEEP]), [run]


def check_analysed(parents: list[Run], prune: PruneSpec) -> None:
    """Label-set cells need each parent's analysis at their threshold (unless --analyze)."""
    for label, config in prune.cells.items():
        if not config.needs_label_sets:
            continue
        for run in parents:
            tags = run.data.tags
            if tags.get(ANALYSIS) != "done":
                raise SweepError(
                    f"prune: run {run.info.run_id} has no analysis, which {label} needs; run "
                    f"`python -m orchestrator analyze {run.info.run_id}` first or pass --analyze"
                )
            if not analysed_at(run, config.threshold):
                raise SweepError(
                    f"prune: run {run.info.run_id} was analysed at threshold "
                    f"{tags.get(ANALYSIS_THRESHOLD)}, {label} needs {config.threshold:g}; "
                    f"pass --analyze to recompute the label sets"
                )


def run(args: argparse.Namespace) -> int:
    """Handle a parsed ``prune`` command."""
    try:
        prune = parse_prune(PrunePlan.from_flags(args), None, require_analysis=False)  # flags before any I/O
        client, uri = open_client(args.tracking_uri, create=False)
        parent, parents = target_parents(client, args.target)
        if not args.analyze:
            check_analysed(parents, prune)
        spec = dataclasses.replace(logged_spec(client, parent, args.storage_path), prune=prune)
        for variant, model_spec in model_specs(client, parents).items():
            prune.check_model(build_model(model_spec), variant)
        connect_ray(args.address)
        check_resources(spec)
    except (InputError, MlflowException) as exc:
        return refuse(exc)
    run_prune_stage(PruneContext(spec, uri, parent.info.experiment_id), parents)
    mine = [
        r
        for r in prune_runs(client, parent.info.experiment_id, spec.name, {p.info.run_id for p in parents})
        if r.data.tags[CELL] in prune.cells
    ]
    print(format_runs(client, spec.name, uri))
    return 0 if len(mine) == len(parents) * len(prune.cells) and all(r.info.status == "FINISHED" for r in mine) else 1


def model_specs(client: MlflowClient, runs: list[Run]) -> dict[str, dict]:
    """The trials' resolved model specs (``model/spec.json``) by variant."""
    specs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            variant = run.data.tags.get(VARIANT, run.info.run_id)
            if variant not in specs:
                path = client.download_artifacts(run.info.run_id, "model/spec.json", f"{tmp}/{run.info.run_id}")
                specs[variant] = json.loads(Path(path).read_text())
    return specs


def add_prune_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``prune`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "prune", help="prune finished trials (nested runs with lineage tags)", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("target", help="sweep name, NAME:best (its best trial on validation), or one trial's run id")
    PrunePlan.add_flags(p)
    PruneConfig.add_flags(p, skip=("method", "level", "control_of", "threshold", "taps", "save_matrices"))
    p.add_argument(
        "--analyze",
        action="store_true",
        help="compute label sets (with the analysis flags) where the parents have none",
    )
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else local)")
    p.add_argument("--storage-path", default=None, help="Tune storage (default: the sweep's)")
    add_tracking_uri(p)
    p.set_defaults(func=run)
    return p
