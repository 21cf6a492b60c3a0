"""The candidates of a committee: which runs (an experiment's trial runs, or runs named by id),
their stored probabilities downloaded and checked, and each member's temperature fitted on
validation. Shared by ``committee`` and ``committee draws``."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from analysis.committees.calibration import fit_temperature, scale
from analysis.committees.inputs import SPLITS, Candidate, partition, read_files, stack
from analysis.committees.selection import Split, label_set_profile
from orchestrator.schema import CommitteeError
from orchestrator.workbench.tracking import (
    CELL,
    DATASET,
    NUM_CLASSES,
    ROLE,
    ROLE_PRUNE,
    ROLE_TRIAL,
    SEED,
    SWEEP,
    VARIANT,
    search_all,
)


def trial_runs(
    client: MlflowClient, experiment_ids: list[str], user_filter: str | None, include_pruned: bool = False
) -> list:
    """All active trial runs (and, with ``include_pruned``, pruned trial runs) of the experiments
    matching ``user_filter``, oldest first. A pruned run's variant is its parent's plus its cell."""
    runs = []
    for role in (ROLE_TRIAL, ROLE_PRUNE) if include_pruned else (ROLE_TRIAL,):
        query = f"tags.`{ROLE}` = '{role}'" + (f" AND {user_filter}" if user_filter else "")
        found = search_all(client, experiment_ids, query)
        if role == ROLE_PRUNE:
            for run in found:
                run.data.tags[VARIANT] = f"{run.data.tags.get(VARIANT, '')}|{run.data.tags.get(CELL, '')}"
        runs += found
    return sorted(runs, key=lambda r: r.info.start_time)


def explicit_runs(client: MlflowClient, run_ids: list[str]) -> list:
    """The runs named by id (trial or pruned trial runs), in the given order; one line for an unknown id."""
    runs = []
    for run_id in run_ids:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise CommitteeError(f"--runs: unknown run id {run_id!r}") from None
        if run.data.tags.get(ROLE) not in (ROLE_TRIAL, ROLE_PRUNE):
            raise CommitteeError(f"--runs: run {run_id} is not a trial or pruned trial run")
        if run.data.tags.get(ROLE) == ROLE_PRUNE:
            run.data.tags[VARIANT] = f"{run.data.tags.get(VARIANT, '')}|{run.data.tags.get(CELL, '')}"
        runs.append(run)
    return runs


def _read_profile(path: str) -> np.ndarray:
    """Mechanism profile from an analysis ``label_sets.json`` (``analysis.units.results.label_sets``)."""
    with open(path) as f:
        data = json.load(f)
    try:
        return label_set_profile(data["taps"], int(data["num_classes"]))
    except (KeyError, TypeError, IndexError) as err:
        raise ValueError(f"not a label_sets.json ({type(err).__name__}: {err})") from err


def download_candidate(
    client: MlflowClient, run, dst: Path, profile_artifact: str | None
) -> tuple[Candidate, dict[str, Path | None], np.ndarray | None]:
    """A run as a ``Candidate`` with the local paths of its probability files (None = missing).

    Also returns its mechanism profile: None without the artifact; an unreadable one raises
    ``CommitteeError``. Runs that are not FINISHED get a ``problem`` and nothing is downloaded.
    """
    run_id = run.info.run_id
    tags = run.data.tags
    classes = tags.get(NUM_CLASSES)
    cand = Candidate(
        run_id,
        variant=tags.get(VARIANT, ""),
        seed=tags.get(SEED, ""),
        sweep=tags.get(SWEEP),
        recorded_dataset=tags.get(DATASET),
        recorded_classes=int(classes) if classes and classes.isdigit() else None,
    )
    if run.info.status != "FINISHED":
        cand.problem = f"status {run.info.status}"
        return cand, {}, None
    listed = {a.path for a in client.list_artifacts(run_id, "probs")}
    dst.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split in SPLITS:
        path = f"probs/probs_{split}.parquet"
        paths[split] = Path(client.download_artifacts(run_id, path, str(dst))) if path in listed else None
    profile = None
    if profile_artifact:
        folder = os.path.dirname(profile_artifact) or None
        if profile_artifact in {a.path for a in client.list_artifacts(run_id, folder)}:
            try:
                profile = _read_profile(client.download_artifacts(run_id, profile_artifact, str(dst)))
            except (OSError, ValueError) as err:
                raise CommitteeError(f"run {run_id}: unreadable {profile_artifact}: {err}") from err
    return cand, paths, profile


def candidate_runs(
    client: MlflowClient,
    experiments: str | None,
    user_filter: str | None,
    run_ids: list[str] | None = None,
    include_pruned: bool = False,
) -> tuple[list, str, str]:
    """The candidate runs, the experiment id a committee run goes to and a label for messages:
    the runs ``run_ids`` (home: the first run's experiment), else the trial runs of
    ``experiments`` (comma-separated names; home: the first)."""
    if run_ids:
        runs = explicit_runs(client, run_ids)
        return runs, runs[0].info.experiment_id, "--runs"
    names = [n.strip() for n in (experiments or "").split(",") if n.strip()]
    if not names:
        raise CommitteeError("--experiment or --runs is required")
    ids = []
    for name in names:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise CommitteeError(f"unknown experiment {name!r}")
        ids.append(exp.experiment_id)
    return trial_runs(client, ids, user_filter, include_pruned), ids[0], ",".join(names)


@dataclass
class LoadedRuns:
    """The valid candidates with raw and temperature-scaled probabilities, and the excluded runs."""

    valid: list[Candidate]
    excluded: list[tuple[str, str]]
    raw_val: Split
    raw_test: Split
    temperatures: list[float]
    val: Split
    test: Split
    profiles: dict[str, np.ndarray | None]


def load_runs(
    client: MlflowClient, runs: list, label: str, calibrate: bool = True, profile_artifact: str | None = None
) -> LoadedRuns:
    """Download and check every run's probabilities; one temperature per valid member (1 without
    ``calibrate``). Raises ``CommitteeError`` when no run is valid."""
    with tempfile.TemporaryDirectory() as tmp:
        loaded = [download_candidate(client, r, Path(tmp) / r.info.run_id, profile_artifact) for r in runs]
        read_files([c for c, _, _ in loaded], [paths for _, paths, _ in loaded])
    valid, excluded = partition([c for c, _, _ in loaded])
    if not valid:
        reasons = "; ".join(f"{rid}: {why}" for rid, why in excluded) or "no trial runs"
        raise CommitteeError(f"no valid runs in {label!r} ({reasons})")
    raw_val, raw_test = stack(valid)
    temperatures = [fit_temperature(p, raw_val.labels) if calibrate else 1.0 for p in raw_val.probs]
    val = Split([scale(p, t) for p, t in zip(raw_val.probs, temperatures)], raw_val.labels)
    test = Split([scale(p, t) for p, t in zip(raw_test.probs, temperatures)], raw_test.labels)
    return LoadedRuns(valid, excluded, raw_val, raw_test, temperatures, val, test, {c.run_id: p for c, _, p in loaded})
