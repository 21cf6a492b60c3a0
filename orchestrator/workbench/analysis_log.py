"""An analysis as MLflow records it, in the trial's own run: fetch a trial's files into a run_job-like
folder, and log a results folder back into the run.

``log_analysis`` logs:

- depth series (``depth_series``), step = tap index in depth order, so MLflow charts each along
  depth and overlays runs: ``snr_by_depth``, ``labels_per_unit_by_depth``,
  ``noise_per_unit_by_depth``, ``readout_acc_by_depth`` (filters for conv taps, nodes for token
  taps); at head taps also ``labels_per_head_by_depth``, ``heads_per_label_by_depth``,
  ``head_max_share_by_depth`` and ``head_max_share_control_by_depth`` (nodes' largest share of a
  label in one head, observed vs the shuffled-node control). ``analysis/depth_index.csv`` maps
  each step to its tap.
- tags ``unitlab.analysis=done``, ``unitlab.analysis.threshold``, ``unitlab.analysis.recipe``;
- artifacts: the results folder under ``analysis/``.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag

from orchestrator.workbench.tracking import ANALYSIS, ANALYSIS_RECIPE, ANALYSIS_THRESHOLD, MODEL_FOLDER
from trainables.run_folder import CONFIG, MODEL_FILES, RunFolder
from trainables.schema import InputError

ARTIFACT_DIR = "analysis"


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
