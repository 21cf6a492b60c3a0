"""Single-unit analysis of finished trial runs, logged into the same MLflow runs (issue 4).

``python -m orchestrator analyze RUN_ID|SWEEP_NAME [--tracking-uri URI] [analysis flags]``

A RUN_ID names one trial run (or a sweep's parent run: then all its finished trials); any other
target is a sweep (experiment) name: all its finished trial runs. Per run, the artifacts
``model/spec.json``, ``model/model.pt`` and the job config ``config.json`` (run root; else the
``data.*`` params) are downloaded, ``analysis.units.run`` analyses the model with the trial's own data
config and seed, and ``log_analysis`` logs into the run:

- metrics per tap (step 0): ``snr/TAP``, ``labels_per_unit/TAP``, ``noise_per_unit/TAP``,
  ``readout_acc/TAP`` (filters for conv taps, nodes for token taps); for head taps also
  ``labels_per_head/TAP``, ``heads_per_label/TAP``, ``head_max_share/TAP`` and
  ``head_max_share_control/TAP`` (nodes' largest share of a label in one head, observed vs the
  shuffled-node control). Non-finite values (an SNR without noise) are not logged.
- tags ``unitlab.analysis=done``, ``unitlab.analysis.threshold``, ``unitlab.analysis.recipe``;
- artifacts: the results folder under ``analysis/``.

Runs already tagged ``unitlab.analysis=done`` are skipped unless ``--force``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException
from mlflow import MlflowClient

from analysis.units.pipeline import AnalysisConfig
from analysis.units.run import analyze_run_dir
from orchestrator.tracking import (ANALYSIS, ANALYSIS_RECIPE, ANALYSIS_THRESHOLD, DEFAULT_TRACKING_URI, PARENT_TAG,
                                   ROLE, ROLE_SWEEP, ROLE_TRIAL, open_client, search_all)
from trainables.schema import InputError

ARTIFACT_DIR = "analysis"


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


def analysed_at(run, threshold: float) -> bool:
    """Whether a run's logged analysis used this cluster threshold."""
    tags = run.data.tags
    return tags.get(ANALYSIS) == "done" and float(tags.get(ANALYSIS_THRESHOLD, "nan")) == threshold


def _artifact_paths(client: MlflowClient, run_id: str, folder: str = "") -> set[str]:
    return {f.path for f in client.list_artifacts(run_id, folder or None)}


def config_from_params(params: dict[str, str]) -> dict:
    """A job config holding the ``data.*`` params (and ``seed``) of a run, values parsed as YAML."""
    cfg: dict = {"data": {}}
    for key, text in params.items():
        if key.startswith("data.") and key.count(".") == 1:
            cfg["data"][key[5:]] = yaml.safe_load(text)
        elif key == "seed":
            cfg["seed"] = int(text)
    if "name" not in cfg["data"]:
        raise InputError("run has no config.json artifact and no data.* params: cannot tell its data")
    return cfg


def fetch_run_dir(client: MlflowClient, run, folder: Path) -> Path:
    """Download a trial's model and job config into a run_job-like folder (spec.json, model.pt, config.json)."""
    run_id = run.info.run_id
    model_files = _artifact_paths(client, run_id, "model")
    for name in ("spec.json", "model.pt"):
        if f"model/{name}" not in model_files:
            raise InputError(f"run {run_id} has no artifact model/{name}")
        os.replace(client.download_artifacts(run_id, f"model/{name}", str(folder)), folder / name)
    if "config.json" in _artifact_paths(client, run_id):
        client.download_artifacts(run_id, "config.json", str(folder))
    else:
        (folder / "config.json").write_text(json.dumps(config_from_params(run.data.params)))
    return folder


def analysis_metrics(taps_json: dict) -> dict[str, float]:
    """Metric name -> value for every tap of a ``taps.json`` (non-finite values left out)."""
    metrics: dict[str, float | None] = {}
    for tap, info in taps_json["taps"].items():
        summary = info["kinds"]["filter" if info["kind"] == "conv" else "node"]  # taps.json: kind -> summary
        metrics[f"snr/{tap}"] = summary["snr"]
        metrics[f"labels_per_unit/{tap}"] = summary["mean_labels_per_unit"]
        metrics[f"noise_per_unit/{tap}"] = summary["mean_noise_per_unit"]
        metrics[f"readout_acc/{tap}"] = info["accuracy"]
        heads = info.get("heads_structure")
        if heads:
            metrics[f"labels_per_head/{tap}"] = info["kinds"]["head"]["mean_labels_per_unit"]
            metrics[f"heads_per_label/{tap}"] = heads["shp"]["mean_heads_per_label"]
            metrics[f"head_max_share/{tap}"] = heads["observed"]["mean_max_share"]
            metrics[f"head_max_share_control/{tap}"] = heads["control"]["mean_max_share"]
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}


def log_analysis(run_id: str, results_dir: str | Path, client: MlflowClient) -> dict[str, float]:
    """Log a results folder (``analysis.units.run``) into an MLflow run: metrics, tags, ``analysis/`` artifacts.

    Works on finished runs and inside the trainable's active run alike. Returns the metrics logged.
    """
    results_dir = Path(results_dir)
    taps_json = json.loads((results_dir / "taps.json").read_text())
    metrics = analysis_metrics(taps_json)
    now = int(time.time() * 1000)
    meta = taps_json["meta"]
    tags = {ANALYSIS: "done", ANALYSIS_THRESHOLD: str(meta["threshold"]), ANALYSIS_RECIPE: meta["recipe"]}
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
                     tags=[RunTag(k, v) for k, v in tags.items()])
    client.log_artifacts(run_id, str(results_dir), ARTIFACT_DIR)
    return metrics


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
        client, _ = open_client(args.tracking_uri, create=False)
        runs = target_runs(client, args.target)
    except (InputError, MlflowException) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    failed = 0
    for trial in runs:
        run_id = trial.info.run_id
        if trial.data.tags.get(ANALYSIS) == "done" and not args.force:
            print(f"{run_id}: already analysed (--force to redo)")
            continue
        try:
            metrics = analyze_and_log(client, trial, config, Path(args.out) if args.out else None)
        except (InputError, MemoryError, MlflowException) as err:
            print(f"error: run {run_id}: {_one_line(err)}", file=sys.stderr)
            failed += 1
            continue
        last = [k for k in metrics if k.startswith("readout_acc/")][-1:]
        print(f"{run_id}: analysed, {len(metrics)} metrics" + (f", {last[0]}={metrics[last[0]]:.4f}" if last else ""))
    return 2 if failed else 0


def _one_line(err: Exception) -> str:
    text = err.message if isinstance(err, MlflowException) else str(err)
    return str(text).splitlines()[0] if str(text) else type(err).__name__


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the analyze options to ``parser``; sets ``func=run``."""
    parser.add_argument("target", help="trial run id, sweep parent run id, or sweep (experiment) name")
    parser.add_argument("--tracking-uri", help=f"MLflow URI (else MLFLOW_TRACKING_URI, else {DEFAULT_TRACKING_URI})")
    parser.add_argument("--force", action="store_true", help="re-analyse runs already tagged as analysed")
    parser.add_argument("--out", default=None, help="also keep each results folder as OUT/RUN_ID")
    AnalysisConfig.add_flags(parser)
    parser.set_defaults(func=run)
    return parser


def add_analyze_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``analyze`` on a CLI's subparsers (``python -m orchestrator analyze ...``)."""
    return configure(subparsers.add_parser("analyze", help="single-unit analysis of finished trial runs",
                                           description=__doc__.split("\n\n")[0]))

