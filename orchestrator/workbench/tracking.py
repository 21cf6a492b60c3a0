"""The one MLflow layer: tag names, clients, paged searches, and the records of a sweep (the
experiment, the parent run, one child run per trial).

Every ``unitlab.*`` tag name is defined here and nowhere else; other modules import the names and
open clients with ``connect`` / ``open_client``. The layout follows docs/design.md. Nothing here
imports Ray; the driver and the trainables both use it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag

from orchestrator.schema import SweepError
from orchestrator.workbench.spool import TRIAL_HTTP_DEFAULTS, Spool, call_when_up
from trainables.device import ENVIRONMENT_KEYS
from trainables.run_folder import CONFIG, PROBS, SPEC, SUMMARY, WEIGHTS

PARENT_TAG = "mlflow.parentRunId"
ROLE, SWEEP, TRIAL_ID = "unitlab.role", "unitlab.sweep", "unitlab.trial_id"
ROLE_SWEEP, ROLE_TRIAL, ROLE_PRUNE, ROLE_COMMITTEE = "sweep", "trial", "prune", "committee"
ERROR, STOPPED = "unitlab.error", "unitlab.stopped"
STORAGE, METRICS, TRIALS_FAILED = "unitlab.storage_path", "unitlab.metrics", "unitlab.trials_failed"
BEST_RUN = "unitlab.best_run_id"  # on the parent run: the trial chosen on validation
# what a trial run records about itself
VARIANT, SEED, DATASET, NUM_CLASSES = "unitlab.variant", "unitlab.seed", "unitlab.dataset", "unitlab.num_classes"
NODE_ID, START_EPOCH, ATTEMPTS = "unitlab.node_id", "unitlab.start_epoch", "unitlab.attempts"
STUDY = "unitlab.study_storage"  # on the parent run: the RDB URL of the sweep's Optuna study (no password)
MODEL_URI = "unitlab.model_uri"  # the trial's logged MLflow Model (models:/m-...)
ANALYSIS = "unitlab.analysis"  # "done" once the trial's analysis is logged
ANALYSIS_THRESHOLD, ANALYSIS_RECIPE = f"{ANALYSIS}.threshold", f"{ANALYSIS}.recipe"
# pruned trials
LINEAGE, CELL = "unitlab.lineage.parent_run", "unitlab.prune.cell"
PRUNE_METHOD, PRUNE_LABEL_SETS = "unitlab.prune.method", "unitlab.prune.label_sets"
# committees
METHOD, MEMBERS = "unitlab.method", "unitlab.members"
SEED_VARIANT, SEED_MEMBERS = "unitlab.seed_variant", "unitlab.seed_members"
ENDED = ("FINISHED", "FAILED", "KILLED")  # run statuses of a trial that will not run again
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
REACH_SECONDS = 10.0  # how long a tracking server may take to answer before a command gives up
# What every trial run records: metrics at each epoch (step = epoch), and those known when it ends.
EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "epoch_seconds", "images_per_sec", "lr")
FINAL_METRICS = ("test_acc", "test_loss", "latency_ms_b1", "latency_ms_per_image_large_batch", "params", "macs")
MODEL_FOLDER = "model"  # where a run keeps spec.json and model.pt among its artifacts
# Files of a finished job (trainables.train.run_job) and where they go in the child run.
JOB_ARTIFACTS = {  # what every job folder (run_job, a prune job) holds, and where it goes in the run
    SPEC: MODEL_FOLDER,
    WEIGHTS: MODEL_FOLDER,
    PROBS["val"]: "probs",
    PROBS["test"]: "probs",
    SUMMARY: None,
    CONFIG: None,  # the resolved job config, which the analysis rebuilds the data from
}
ARTIFACTS = {**JOB_ARTIFACTS, "curves.png": "figures"}  # a trial adds its training curves


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``uri``, else MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here; SQLite paths made absolute.

    A URI of a scheme MLflow 3 does not track to (a plain path, ``file:``, a typo) and a SQLite file
    that is not a SQLite database raise one ``SweepError`` line naming the URI and where it came from."""
    source = "MLFLOW_TRACKING_URI" if not uri and os.environ.get("MLFLOW_TRACKING_URI") else "--tracking-uri"
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else uri.strip()
    if scheme not in TRACKING_SCHEMES:
        raise SweepError(
            f"{source}: {uri!r} is not a tracking URI MLflow accepts (give sqlite:///PATH, "
            f"http(s)://HOST:PORT, postgresql://, mysql://, mssql:// or databricks)"
        )
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if path.exists() and not _is_sqlite(path):
            raise SweepError(f"{source}: {uri} names a file that is not a SQLite database")
    return uri


TRACKING_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks", "databricks-uc")


def _is_sqlite(path: Path) -> bool:
    """Whether ``path`` is a SQLite database file (or an empty file, which SQLite fills)."""
    try:
        with path.open("rb") as handle:
            head = handle.read(16)
    except OSError:
        return False
    return head in (b"", b"SQLite format 3\0")


def add_tracking_uri(parser: argparse.ArgumentParser, nested: bool = False) -> None:
    """The ``--tracking-uri`` flag, declared here once for every command (``nested``: a subcommand's
    copy, which leaves its parent command's value alone when not given)."""
    parser.add_argument(
        "--tracking-uri",
        default=argparse.SUPPRESS if nested else None,
        metavar="URI",
        help=f"MLflow tracking URI (default: MLFLOW_TRACKING_URI, else {DEFAULT_TRACKING_URI})",
    )


def open_client(uri: str | None, create: bool) -> tuple[MlflowClient, str]:
    """(client, resolved URI); without ``create`` a missing SQLite file is an error, not a new database;
    a server must answer within ``REACH_SECONDS`` (else one line, not minutes of retries)."""
    uri = resolve_tracking_uri(uri)
    if not create and uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise SweepError(f"--tracking-uri: no MLflow database at {uri.removeprefix('sqlite:///')}")
    if uri.startswith(("http://", "https://")):
        check_reachable(uri)
    return MlflowClient(uri), uri


def store_exists(uri: str) -> bool:
    """Whether the tracking store holds anything yet (a server always does; SQLite once its file exists)."""
    return not uri.startswith("sqlite:///") or Path(uri.removeprefix("sqlite:///")).is_file()


def check_reachable(uri: str, seconds: float = REACH_SECONDS) -> None:
    """Raise SweepError unless the tracking server at ``uri`` answers its health check in time."""
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=seconds).close()
    except urllib.error.HTTPError:
        return  # it answered (e.g. 401 behind basic auth): reachable
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SweepError(f"--tracking-uri: cannot reach {uri} within {seconds:g} s ({reason})") from None


LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a SQLite store by default


def ui_links(uri: str, experiment_id: str, run_id: str | None = None, what: str = "run") -> str:
    """Lines telling where to look in the MLflow UI: the experiment's runs table (the classic view,
    not the GenAI overview) and, given ``run_id``, that run's page."""
    server = uri.startswith(("http://", "https://"))
    base = uri.rstrip("/") if server else LOCAL_UI
    lines = [] if server else [f"MLflow UI: mlflow ui --backend-store-uri {uri}   (then open the links below)"]
    lines.append(f"  runs: {base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning")
    if run_id:
        lines.append(f"  {what}: {base}/#/experiments/{experiment_id}/runs/{run_id}")
    return "\n".join(lines)


def connect(uri: str) -> MlflowClient:
    """A client for an already resolved tracking URI (inside trials, stages and Tune callbacks).

    MLflow's own per-request retries are cut to about a minute in this process (unless set): these
    callers retry on their own (``orchestrator.workbench.spool``) instead of blocking for minutes per call."""
    for key, value in TRIAL_HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    return MlflowClient(uri)


def search_all(
    client: MlflowClient, experiment_ids: list[str], query: str = "", order_by: list[str] | None = None
) -> list[Run]:
    """Every run matching ``query``, page by page (MLflow returns at most 1,000 per call)."""
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, query, max_results=1000, order_by=order_by, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def experiment_id(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """The sweep's experiment, created on first use; a SQLite store keeps artifacts beside the db."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        location = (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts" / name).as_uri()
    return client.create_experiment(name, artifact_location=location)


def find_parent(client: MlflowClient, name: str) -> Run | None:
    """The latest parent run of the sweep ``name``, or None."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id], f"tags.`{ROLE}` = '{ROLE_SWEEP}'", order_by=["start_time DESC"], max_results=1
    )
    return runs[0] if runs else None


def child_runs(client: MlflowClient, exp_id: str, parent_id: str) -> list[Run]:
    """Every trial run of a parent run."""
    return search_all(client, [exp_id], f"tags.`{PARENT_TAG}` = '{parent_id}' and tags.`{ROLE}` = '{ROLE_TRIAL}'")


def find_child(client: MlflowClient, exp_id: str, parent_id: str, value: str, key: str = TRIAL_ID) -> Run | None:
    """The run under a parent whose tag ``key`` is ``value`` (by default: one trial's run), or None."""
    query = f"tags.`{PARENT_TAG}` = '{parent_id}' and tags.`{key}` = '{value}'"
    runs = client.search_runs([exp_id], query, max_results=1)
    return runs[0] if runs else None


def prune_runs(client: MlflowClient, exp_id: str, sweep: str, parents: set[str] | None = None) -> list[Run]:
    """The pruned trial runs of a sweep (each nested under its parent trial's run), optionally only
    those whose parent run id is in ``parents``."""
    runs = search_all(client, [exp_id], f"tags.`{ROLE}` = '{ROLE_PRUNE}' and tags.`{SWEEP}` = '{sweep}'")
    return runs if parents is None else [r for r in runs if r.data.tags[LINEAGE] in parents]


def end_run(client: MlflowClient, run_id: str, status: str, tags: dict[str, str] | None = None) -> None:
    """Tag (values cut to MLflow's limit) and terminate a run."""
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, value[:5000])
    client.set_terminated(run_id, status)


def environment_tags(summary: dict) -> dict[str, str]:
    """A job summary's description of where it ran (``trainables.device.describe``) as ``unitlab.*`` tags."""
    return {f"unitlab.{key}": str(summary[key]) for key in ENVIRONMENT_KEYS if key in summary}


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
    """One trial's MLflow run: created once, reopened by id (or trial tag) on every retry or resume.

    Writes after the opening go through a ``Spool``: training does not wait for MLflow, and a
    server outage delays the writes (in order) instead of failing the trial.
    """

    def __init__(self, client: MlflowClient, run: Run):
        self.client = client
        self.run_id = run.info.run_id
        self.finished = run.info.status == "FINISHED"
        self.latest = dict(run.data.metrics)
        self.tags = dict(run.data.tags)
        history = client.get_metric_history(self.run_id, "val_acc")
        self.last_logged_epoch = max((m.step for m in history), default=-1)
        self.spool = Spool(client.tracking_uri)

    @classmethod
    def open(
        cls,
        client: MlflowClient,
        exp_id: str,
        parent_id: str,
        tags: dict[str, str],
        params: dict[str, str],
        run_id: str | None,
        attempt_tags: dict[str, str],
        *,
        role: str = "trial",
        key: str = TRIAL_ID,
        run_name: str | None = None,
    ) -> ChildRun:
        """Continue ``run_id`` (from the trial checkpoint) or the parent's child tagged ``key=tags[key]``,
        else create one; waits (with a warning) while the server is away.

        ``attempt_tags`` (where and from which epoch this attempt runs) are set on every start."""

        def attempt() -> ChildRun:
            run = client.get_run(run_id) if run_id else find_child(client, exp_id, parent_id, tags[key], key)
            if run is None:
                name = run_name or f"{tags[VARIANT]} seed={tags[SEED]}"
                run = client.create_run(
                    exp_id, run_name=name, tags={PARENT_TAG: parent_id, ROLE: role, **tags, ATTEMPTS: "1"}
                )
                client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
            elif run.info.status != "FINISHED":
                attempts = int(run.data.tags.get(ATTEMPTS, "1")) + 1
                client.set_tag(run.info.run_id, ATTEMPTS, str(attempts))
                client.update_run(run.info.run_id, status="RUNNING")
            if run.info.status != "FINISHED":
                client.log_batch(run.info.run_id, tags=[RunTag(k, v) for k, v in attempt_tags.items()])
            return cls(client, client.get_run(run.info.run_id))

        return call_when_up(attempt, client.tracking_uri)

    def submit(self, what: str, write: Callable[[], object]) -> None:
        """Queue one more write to this run (sent in order, kept while the server is away)."""
        self.spool.submit(what, write)

    def log_epoch(self, metrics: dict) -> None:
        """Per-epoch metrics at step=epoch, queued.

        An epoch already logged by an earlier attempt is not logged again: a resumed attempt retrains
        it from the checkpoint, which holds every random state, and reproduces the logged values
        (tests/test_train.py), so one value per step stays the truth."""
        epoch = int(metrics["epoch"])
        if epoch <= self.last_logged_epoch:
            return
        batch = [Metric(k, float(metrics[k]), int(time.time() * 1000), epoch) for k in EPOCH_METRICS if k in metrics]
        self.submit(f"epoch {epoch}", lambda: self.client.log_batch(self.run_id, metrics=batch))
        self.last_logged_epoch = epoch

    def finish(self, summary: dict, job_dir: Path) -> None:
        """Final metrics, the device and the job's artifacts, then FINISHED."""
        final = {k: float(summary[k]) for k in FINAL_METRICS}
        artifacts = [(job_dir / name, folder) for name, folder in ARTIFACTS.items()]
        self.close_finished(final, artifacts, environment_tags(summary))

    def close_finished(
        self, metrics: dict[str, float], artifacts: list[tuple[Path, str | None]], tags: dict[str, str]
    ) -> None:
        """Queue the final metrics (once: those an earlier attempt logged are kept), tags, artifacts, the
        removal of an earlier attempt's error tag, and FINISHED; return once all of it is sent."""
        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, 0) for k, v in metrics.items() if k not in self.latest]
        for start in range(0, len(batch), 1000):  # MLflow's batch limit
            part = batch[start : start + 1000]
            self.submit("final metrics", lambda part=part: self.client.log_batch(self.run_id, metrics=part))
        if tags:
            self.submit(
                "tags", lambda: self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            )
        if ERROR in self.tags:
            self.submit("clear error", lambda: self.client.delete_tag(self.run_id, ERROR))
        for path, folder in artifacts:
            if path.is_file():
                self.submit(
                    f"artifact {path.name}", lambda p=str(path), f=folder: self.client.log_artifact(self.run_id, p, f)
                )
        self.submit("finished", lambda: self.client.set_terminated(self.run_id, "FINISHED"))
        self.spool.drain()

    def fail(self, error: BaseException) -> None:
        """Mark the run FAILED with the error, best effort (the driver's run closer tries again)."""
        try:
            self.spool.drain_now()
            end_run(self.client, self.run_id, "FAILED", {ERROR: f"{type(error).__name__}: {error}"})
        except Exception as exc:  # noqa: BLE001 - the trial's own error is the one to raise
            print(
                f"unitlab: could not mark run {self.run_id} FAILED ({type(exc).__name__}); the driver will",
                file=sys.stderr,
                flush=True,
            )
