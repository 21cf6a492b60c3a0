"""MLflow records of a sweep: the experiment, the parent run, and one child run per trial.

The layout follows docs/design.md. Nothing here imports Ray; the driver and the trainable both use it.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag

from orchestrator.sweep_spec import EPOCH_METRICS, FINAL_METRICS, SweepError, SweepSpec

PARENT_TAG = "mlflow.parentRunId"
ROLE, SWEEP, TRIAL_ID = "unitlab.role", "unitlab.sweep", "unitlab.trial_id"
ERROR = "unitlab.error"
ROLE_PRUNE, LINEAGE, CELL = "prune", "unitlab.lineage.parent_run", "unitlab.prune.cell"  # pruned trials
ENDED = ("FINISHED", "FAILED", "KILLED")  # run statuses of a trial that will not run again
STORAGE = "unitlab.storage_path"
METRICS = "unitlab.metrics"
# Files of a finished job (trainables.train.run_job) and where they go in the child run.
ARTIFACTS = {
    "spec.json": "model",
    "model.pt": "model",
    "probs_val.parquet": "probs",
    "probs_test.parquet": "probs",
    "curves.png": "figures",
    "summary.json": None,
    "config.json": None,  # the resolved job config, which the analysis rebuilds the data from
}


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``uri``, else MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here; SQLite paths made absolute."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


def open_client(uri: str | None, create: bool) -> tuple[MlflowClient, str]:
    """(client, resolved URI); without ``create`` a missing SQLite file is an error, not a new database."""
    uri = resolve_tracking_uri(uri)
    if not create and uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise SweepError(f"--tracking-uri: no MLflow database at {uri.removeprefix('sqlite:///')}")
    return MlflowClient(uri), uri


def experiment_id(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """The sweep's experiment, created on first use; a SQLite store keeps artifacts beside the db."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        location = (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts" / name).as_uri()
    return client.create_experiment(name, artifact_location=location)


def open_parent(client: MlflowClient, exp_id: str, spec: SweepSpec) -> str:
    """Create the sweep's parent run with its tags, settings and the spec text; returns its id."""
    run = client.create_run(exp_id, run_name=spec.name, tags={
        ROLE: "sweep", SWEEP: spec.name, STORAGE: spec.storage_path,
        METRICS: ",".join(f"{k}:{v}" for k, v in spec.metrics.items()),
    })
    params = {
        "search.mode": spec.mode, "search.num_samples": spec.num_samples, "search.metrics": spec.metrics,
        "scheduler": spec.scheduler, "resources.cpus": spec.cpus, "resources.gpus": spec.gpus,
        "max_concurrent": spec.max_concurrent, "max_failures": spec.max_failures, "analyze": spec.analyze is not None,
        "prune": ",".join(spec.prune.cells) if spec.prune else "",
        "trials": spec.num_trials(), "axes": ",".join(a.name for a in spec.axes),
    }
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "spec.yaml").write_text(spec.source)
        client.log_artifact(run.info.run_id, str(Path(tmp) / "spec.yaml"), "sweep")
    return run.info.run_id


def find_parent(client: MlflowClient, name: str) -> Run | None:
    """The latest parent run of the sweep ``name``, or None."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], f"tags.`{ROLE}` = 'sweep'", order_by=["start_time DESC"],
                              max_results=1)
    return runs[0] if runs else None


def child_runs(client: MlflowClient, exp_id: str, parent_id: str) -> list[Run]:
    """Every trial run of a parent run."""
    query = f"tags.`{PARENT_TAG}` = '{parent_id}' and tags.`{ROLE}` = 'trial'"
    return client.search_runs([exp_id], query, max_results=10000)


def find_child(client: MlflowClient, exp_id: str, parent_id: str, value: str, key: str = TRIAL_ID) -> Run | None:
    """The run under a parent whose tag ``key`` is ``value`` (by default: one trial's run), or None."""
    query = f"tags.`{PARENT_TAG}` = '{parent_id}' and tags.`{key}` = '{value}'"
    runs = client.search_runs([exp_id], query, max_results=1)
    return runs[0] if runs else None


def prune_runs(client: MlflowClient, exp_id: str, sweep: str, parents: set[str] | None = None) -> list[Run]:
    """The pruned trial runs of a sweep (each nested under its parent trial's run), optionally only
    those whose parent run id is in ``parents``."""
    query = f"tags.`{ROLE}` = '{ROLE_PRUNE}' and tags.`{SWEEP}` = '{sweep}'"
    runs = client.search_runs([exp_id], query, max_results=10000)
    return runs if parents is None else [r for r in runs if r.data.tags[LINEAGE] in parents]


def end_run(client: MlflowClient, run_id: str, status: str, tags: dict[str, str] | None = None) -> None:
    """Tag (values cut to MLflow's limit) and terminate a run."""
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, value[:5000])
    client.set_terminated(run_id, status)


def flatten(cfg: dict, prefix: str = "") -> dict[str, str]:
    """Nested config as ``a.b.c`` -> string, for MLflow params."""
    out = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out


class ChildRun:
    """One trial's MLflow run: created once, reopened by id (or trial tag) on every retry or resume."""

    def __init__(self, client: MlflowClient, run: Run):
        self.client = client
        self.run_id = run.info.run_id
        self.finished = run.info.status == "FINISHED"
        self.latest = dict(run.data.metrics)
        history = client.get_metric_history(self.run_id, "val_acc")
        self.last_logged_epoch = max((m.step for m in history), default=-1)

    @classmethod
    def open(cls, client: MlflowClient, exp_id: str, parent_id: str, tags: dict[str, str], params: dict[str, str],
             run_id: str | None, attempt_tags: dict[str, str], *, role: str = "trial", key: str = TRIAL_ID,
             run_name: str | None = None) -> "ChildRun":
        """Continue ``run_id`` (from the trial checkpoint) or the parent's child tagged ``key=tags[key]``,
        else create one.

        ``attempt_tags`` (where and from which epoch this attempt runs) are set on every start."""
        run = client.get_run(run_id) if run_id else find_child(client, exp_id, parent_id, tags[key], key)
        if run is None:
            name = run_name or f"{tags['unitlab.variant']} seed={tags['unitlab.seed']}"
            run = client.create_run(exp_id, run_name=name, tags={PARENT_TAG: parent_id, ROLE: role, **tags,
                                                                 "unitlab.attempts": "1"})
            client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
        elif run.info.status != "FINISHED":
            attempts = int(run.data.tags.get("unitlab.attempts", "1")) + 1
            client.set_tag(run.info.run_id, "unitlab.attempts", str(attempts))
            client.update_run(run.info.run_id, status="RUNNING")
        if run.info.status != "FINISHED":
            client.log_batch(run.info.run_id, tags=[RunTag(k, v) for k, v in attempt_tags.items()])
        return cls(client, client.get_run(run.info.run_id))

    def log_epoch(self, metrics: dict) -> None:
        """Per-epoch metrics at step=epoch; an epoch already logged by an earlier attempt is skipped."""
        epoch = int(metrics["epoch"])
        if epoch <= self.last_logged_epoch:
            return
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(metrics[k]), now, epoch) for k in EPOCH_METRICS])
        self.last_logged_epoch = epoch

    def finish(self, summary: dict, job_dir: Path) -> None:
        """Final metrics and the job's artifacts, then FINISHED."""
        now = int(time.time() * 1000)
        final = {k: float(summary[k]) for k in FINAL_METRICS}
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, 0) for k, v in final.items()])
        self.client.set_tag(self.run_id, "unitlab.device", summary["device"])
        for name, folder in ARTIFACTS.items():
            self.client.log_artifact(self.run_id, str(job_dir / name), folder)
        self.client.set_terminated(self.run_id, "FINISHED")

    def fail(self, error: BaseException) -> None:
        end_run(self.client, self.run_id, "FAILED", {ERROR: f"{type(error).__name__}: {error}"})
