"""``python -m orchestrator analyze RUN_ID|SWEEP_NAME [--tracking-uri URI] [analysis flags]``: the
single-unit analysis of finished trial runs, logged into the same MLflow runs.

A RUN_ID names one trial run (or a sweep's parent run: then all its finished trials); any other
target is a sweep (experiment) name: all its finished trial runs. Per run, the artifacts
``model/spec.json``, ``model/model.pt`` and the job config ``config.json`` (run root; else the
``data.*`` params) are downloaded, ``analysis.units.run`` analyses the model with the trial's own data
config and seed, and ``workbench.analysis_log.log_analysis`` logs into the run (depth series, tags,
the results folder). Runs already tagged ``unitlab.analysis=done`` are skipped unless ``--force``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from analysis.units.pipeline import AnalysisConfig
from analysis.units.run import analyze_run_dir
from orchestrator.workbench.analysis_log import fetch_run_dir, log_analysis
from orchestrator.workbench.tracking import (
    ANALYSIS,
    PARENT_TAG,
    ROLE,
    ROLE_SWEEP,
    ROLE_TRIAL,
    add_tracking_uri,
    open_client,
    search_all,
)
from trainables.schema import InputError, output_folder, refuse


def target_runs(client: MlflowClient, target: str) -> list:
    """The finished trial runs a target names (a trial run id, a sweep's parent run id, or a sweep name)."""
    finished = f"tags.`{ROLE}` = '{ROLE_TRIAL}' AND attributes.status = 'FINISHED'"
    try:
        run = client.get_run(target)
    except MlflowException:
        run = None
    if run is not None:
        if run.data.tags.get(ROLE) == ROLE_SWEEP:
            return search_all(client, [run.info.experiment_id], f"{finished} AND tags.`{PARENT_TAG}` = '{target}'")
        return [run]
    experiment = client.get_experiment_by_name(target)
    if experiment is None:
        raise InputError(f"{target!r} is neither a run id nor a sweep (experiment) name")
    runs = search_all(client, [experiment.experiment_id], finished)
    if not runs:
        raise InputError(f"sweep {target!r} has no finished trial runs")
    return runs


def analyze_and_log(client: MlflowClient, run, config: AnalysisConfig, keep: Path | None = None) -> dict[str, float]:
    """Fetch one trial, analyse it and log the results into it."""
    with tempfile.TemporaryDirectory(prefix="unitlab-analysis-") as tmp:
        run_dir = fetch_run_dir(client, run, Path(tmp))
        results = keep / run.info.run_id if keep else Path(tmp) / "results"
        analyze_run_dir(run_dir, results, config)
        return log_analysis(run.info.run_id, results, client)


def run(args: argparse.Namespace) -> int:
    """Handle a parsed ``analyze`` command; bad input gives one line per run on stderr and exit code 2."""
    try:
        config = AnalysisConfig.from_flags(args)
        keep = output_folder(args.out, "--out") if args.out is not None else None  # before any analysis runs
        client, _ = open_client(args.tracking_uri, create=False)
        runs = target_runs(client, args.target)
    except (InputError, MlflowException) as err:
        return refuse(err)
    failed = 0
    for trial in runs:
        run_id = trial.info.run_id
        if trial.data.tags.get(ANALYSIS) == "done" and not args.force:
            print(f"{run_id}: already analysed (--force to redo)")
            continue
        try:
            metrics = analyze_and_log(client, trial, config, keep)
        except (InputError, MemoryError, MlflowException) as err:
            print(f"error: run {run_id}: {_one_line(err)}", file=sys.stderr)
            failed += 1
            continue
        readout = metrics.get("readout_acc_by_depth", {})
        print(
            f"{run_id}: analysed, {len(readout)} taps"
            + (f", deepest readout_acc={readout[max(readout)]:.4f}" if readout else "")
        )
    return 2 if failed else 0


def _one_line(err: Exception) -> str:
    text = err.message if isinstance(err, MlflowException) else str(err)
    return str(text).splitlines()[0] if str(text) else type(err).__name__


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the analyze options to ``parser``; sets ``func=run``."""
    parser.add_argument("target", help="trial run id, sweep parent run id, or sweep (experiment) name")
    add_tracking_uri(parser)
    parser.add_argument("--force", action="store_true", help="re-analyse runs already tagged as analysed")
    parser.add_argument("--out", default=None, help="also keep each results folder as OUT/RUN_ID")
    AnalysisConfig.add_flags(parser)
    parser.set_defaults(func=run)
    return parser


def add_analyze_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``analyze`` on a CLI's subparsers (``python -m orchestrator analyze ...``)."""
    return configure(
        subparsers.add_parser(
            "analyze", help="single-unit analysis of finished trial runs", description=__doc__.split("\n\n")[0]
        )
    )
