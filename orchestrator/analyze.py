"""Single-unit analysis of finished trial runs, logged into the same MLflow runs.

``python -m orchestrator analyze RUN_ID|SWEEP_NAME [--tracking-uri URI] [analysis flags]``

A RUN_ID names one trial run (or a sweep's parent run: then all its finished trials); any other
target is a sweep (experiment) name: all its finished trial runs. Per run, the artifacts
``model/spec.json``, ``model/model.pt`` and the job config ``config.json`` (run root; else the
``data.*`` params) are downloaded, ``analysis.units.run`` analyses the model with the trial's own data
config and seed, and ``log_analysis`` logs into the run:

- depth series (``depth_series``), step = tap index in depth order, so MLflow charts each along
  depth and overlays runs: ``snr_by_depth``, ``labels_per_unit_by_depth``,
  ``noise_per_unit_by_depth``, ``readout_acc_by_depth`` (filters for conv taps, nodes for token
  taps); at head taps also ``labels_per_head_by_depth``, ``heads_per_label_by_depth``,
  ``head_max_share_by_depth`` and ``head_max_share_control_by_depth`` (nodes' largest share of a
  label in one head, observed vs the shuffled-node control). ``analysis/depth_index.csv`` maps
  each step to its tap.
- tags ``unitlab.analysis=done``, ``unitlab.analysis.threshold``, ``unitlab.analysis.recipe``;
- artifacts: the results folder under ``analysis/``.

Runs already tagged ``unitlab.analysis=done`` are skipped unless ``--force``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException

from analysis.units.pipeline import AnalysisConfig
from analysis.units.run import analyze_run_dir
from orchestrator.tracking import (
    ANALYSIS,
    ANALYSIS_RECIPE,
    ANALYSIS_THRESHOLD,
    MODEL_FOLDER,
    PARENT_TAG,
    ROLE,
    ROLE_SWEEP,
    ROLE_TRIAL,
    add_tracking_uri,
    open_client,
    search_all,
)
from trainables.run_folder import CONFIG, MODEL_FILES, RunFolder
from trainables.schema import InputError, output_folder, refuse

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
        raise InputError(f"run has no {CONFIG} artifact and no data.* params: cannot tell its data")
    return cfg


def fetch_run_dir(client: MlflowClient, run, folder: Path) -> Path:
    """Download a trial's model and job config into a run_job-like folder (spec.json, model.pt, config.json)."""
    run_id = run.info.run_id
    model_files = _artifact_paths(client, run_id, MODEL_FOLDER)
    for name in MODEL_FILES:
        if f"{MODEL_FOLDER}/{name}" not in model_files:
            raise InputError(f"run {run_id} has no artifact {MODEL_FOLDER}/{name}")
        os.replace(client.download_artifacts(run_id, f"{MODEL_FOLDER}/{name}", str(folder)), folder / name)
    if CONFIG in _artifact_paths(client, run_id):
        client.download_artifacts(run_id, CONFIG, str(folder))
    else:
        RunFolder(folder).write_json(CONFIG, config_from_params(run.data.params))
    return folder


def depth_series(taps_json: dict) -> dict[str, dict[int, float]]:
    """Series name -> {step: value}, step = the tap's index in depth order (``depth_index.csv``).

    Every tap gives ``snr_by_depth``, ``labels_per_unit_by_depth``, ``noise_per_unit_by_depth`` and
    ``readout_acc_by_depth`` of its primary units (filters of conv taps, nodes of token taps); head
    taps also ``labels_per_head_by_depth``, ``heads_per_label_by_depth``,
    ``head_max_share_by_depth`` and ``head_max_share_control_by_depth``. Non-finite values (an SNR
    without noise) are left out."""
    series: dict[str, dict[int, float]] = {}

    def put(name: str, step: int, value) -> None:
        if value is not None and math.isfinite(value):
            series.setdefault(name, {})[step] = float(value)

    for step, info in enumerate(taps_json["taps"].values()):
        summary = info["kinds"]["filter" if info["kind"] == "conv" else "node"]
        put("snr_by_depth", step, summary["snr"])
        put("labels_per_unit_by_depth", step, summary["mean_labels_per_unit"])
        put("noise_per_unit_by_depth", step, summary["mean_noise_per_unit"])
        put("readout_acc_by_depth", step, info["accuracy"])
        heads = info.get("heads_structure")
        if heads:
            put("labels_per_head_by_depth", step, info["kinds"]["head"]["mean_labels_per_unit"])
            put("heads_per_label_by_depth", step, heads["shp"]["mean_heads_per_label"])
            put("head_max_share_by_depth", step, heads["observed"]["mean_max_share"])
            put("head_max_share_control_by_depth", step, heads["control"]["mean_max_share"])
    return series


def write_depth_index(taps_json: dict, path: Path) -> Path:
    """``depth_index.csv``: the step of every depth series and the tap it stands for."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "tap", "kind", "heads"])
        for step, (tap, info) in enumerate(taps_json["taps"].items()):
            writer.writerow([step, tap, info["kind"], info.get("heads") or ""])
    return path


def log_analysis(run_id: str, results_dir: str | Path, client: MlflowClient) -> dict[str, dict[int, float]]:
    """Log a results folder (``analysis.units.run``) into an MLflow run: depth series, tags,
    ``analysis/`` artifacts (with ``depth_index.csv``).

    Works on finished runs and inside the trainable's active run alike. Returns the series logged.
    Idempotent: the metrics carry the time ``taps.json`` was written, so a retried call (the spool
    retries a write whose reply was lost) sends identical rows, which the store keeps once.
    """
    results_dir = Path(results_dir)
    taps_json = json.loads((results_dir / "taps.json").read_text())
    series = depth_series(taps_json)
    write_depth_index(taps_json, results_dir / "depth_index.csv")
    now = int((results_dir / "taps.json").stat().st_mtime * 1000)
    meta = taps_json["meta"]
    tags = {ANALYSIS: "done", ANALYSIS_THRESHOLD: str(meta["threshold"]), ANALYSIS_RECIPE: meta["recipe"]}
    metrics = [Metric(name, value, now, step) for name, steps in series.items() for step, value in steps.items()]
    for start in range(0, len(metrics), 1000):  # MLflow's batch limit
        client.log_batch(run_id, metrics=metrics[start : start + 1000])
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    client.log_artifacts(run_id, str(results_dir), ARTIFACT_DIR)
    return series


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
