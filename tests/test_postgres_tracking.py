"""The tracking store on a real PostgreSQL (the pgserver wheel, started here on a Unix socket): a
two-trial sweep through `mlflow server` on it, with its Optuna study in the same database, every
epoch logged exactly once; and a short load test (16 simulated trials at once) on PostgreSQL and on
SQLite with no metric point lost or duplicated."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO, sweep_spec, write
from mlflow import MlflowClient
from nodes import free_port

pgserver = pytest.importorskip("pgserver", reason="pgserver (a pip-installed PostgreSQL) is not installed")
sys.path.insert(0, str(REPO / "benchmarks"))
import tracking_load  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pg")
    try:
        server, uri = tracking_load.start_postgres(folder)
    except Exception as exc:  # noqa: BLE001 - a machine where PostgreSQL cannot start
        pytest.skip(f"PostgreSQL did not start here: {type(exc).__name__}: {exc}")
    server.psql("CREATE DATABASE optuna_studies;")
    port = free_port()
    mlflow = tracking_load.start_mlflow(uri, folder, port, workers=2)
    yield {
        "uri": f"http://127.0.0.1:{port}",
        "db": uri,
        "folder": folder,
        "studies": uri.replace("/mlflow_load", "/optuna_studies"),
    }
    tracking_load.stop(mlflow)
    server.cleanup()


def test_sweep_on_postgresql_logs_every_epoch_once(postgres, tmp_path):
    import optuna

    spec = sweep_spec("pg", epochs=3, axes={"attention": [{"heads": 2, "head_dim": 16}], "n_conv_blocks": [0, 1]})
    env = {**os.environ, "UNITLAB_STUDY_STORAGE": postgres["studies"], "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", "sweep", str(write(tmp_path, spec)), "--tracking-uri", postgres["uri"]]
        + ["--storage-path", str(tmp_path / "store")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = MlflowClient(postgres["uri"])
    runs = client.search_runs([client.get_experiment_by_name("pg").experiment_id])
    parents = [r for r in runs if r.data.tags.get("unitlab.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("unitlab.role") == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED" and len(children) == 2
    assert len({r.data.tags["unitlab.trial_id"] for r in children}) == 2  # one run per trial
    for run in children:
        assert run.info.status == "FINISHED"
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_acc")) == [0, 1, 2]
    assert parents[0].data.tags["unitlab.study_storage"] == postgres["studies"]  # no password in it to hide
    study = optuna.load_study(study_name="pg", storage=postgres["studies"])
    assert {t.user_attrs["mlflow_run_id"] for t in study.trials} == {r.info.run_id for r in children}
    assert all(
        t.values == [client.get_run(t.user_attrs["mlflow_run_id"]).data.metrics["val_acc"]] for t in study.trials
    )


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_sixteen_concurrent_trials_lose_and_duplicate_nothing(postgres, tmp_path, backend):
    if backend == "postgresql":
        uri = postgres["uri"]
        figures = tracking_load.load(uri, writers=16, epochs=4, processes=2, folder=tmp_path, timeout_s=240)
    else:
        port = free_port()
        server = tracking_load.start_mlflow(f"sqlite:///{tmp_path / 'load.db'}", tmp_path, port, workers=2)
        try:
            figures = tracking_load.load(f"http://127.0.0.1:{port}", 16, 4, 2, tmp_path, 240)
        finally:
            tracking_load.stop(server)
    assert not figures["timed_out"] and figures["errors"] == 0, figures
    assert figures["runs"] == 16 and figures["runs_unfinished"] == 0 and figures["runs_duplicated"] == 0
    assert figures["points_sent"] == 16 * 4 * 3 and figures["points_lost"] == 0 == figures["points_duplicated"]


def test_a_database_restart_under_the_server_loses_and_duplicates_nothing(tmp_path, monkeypatch):
    """PostgreSQL stops under a running `mlflow server` (a failover, a restart): the server answers
    500, the trial's spool keeps the writes and sends each once when the database is back."""
    from mlflow.entities import Metric
    from nodes import wait_for

    from orchestrator.workbench.spool import Spool, is_transient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # see each 500 at once (trials allow 3)
    server, db = tracking_load.start_postgres(tmp_path)
    port = free_port()
    mlflow = tracking_load.start_mlflow(db, tmp_path, port, workers=1)
    try:
        client = MlflowClient(f"http://127.0.0.1:{port}")
        run_id = client.create_run(client.create_experiment("restart")).info.run_id
        spool = Spool(client.tracking_uri, poll_s=0.5, wait_s=120)
        batch = lambda e: [Metric("val_acc", 0.1 * e, 1_000 + e, e)]  # noqa: E731
        spool.submit("epoch 0", lambda: client.log_batch(run_id, metrics=batch(0)))
        spool.drain()
        server.cleanup()  # the database goes away; the MLflow server stays up
        with pytest.raises(Exception) as caught:
            client.log_batch(run_id, metrics=batch(1))
        assert is_transient(caught.value), caught.value
        for e in (1, 2, 3):
            spool.submit(f"epoch {e}", lambda e=e: client.log_batch(run_id, metrics=batch(e)))
        wait_for(lambda: spool.outages == 1, 60, "the spool to meet the outage")
        server = pgserver.get_server(tmp_path / "pgdata", cleanup_mode="stop")  # back, same data
        spool.drain()
        assert spool.outages == 1
        steps = sorted(m.step for m in client.get_metric_history(run_id, "val_acc"))
        assert steps == [0, 1, 2, 3]  # every epoch once, none lost in the outage
    finally:
        tracking_load.stop(mlflow)
        server.cleanup()
