"""Injected faults on real parts: an MLflow server outage longer than MLflow's own retry budget.
Nothing finished is lost, nothing is logged twice, nothing is left RUNNING. (A driver stopped with
SIGTERM: tests/test_sigterm.py; a killed driver: tests/test_driver_kill.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, stop_process, sweep_spec, write
from mlflow import MlflowClient
from nodes import free_port, start_mlflow_server, wait_for

pytestmark = pytest.mark.slow


def start_server(tmp_path: Path, port: int) -> subprocess.Popen:
    return start_mlflow_server(tmp_path, port)


def stop_server(server: subprocess.Popen) -> None:
    stop_process(server, group=True)  # the server's gunicorn/uvicorn workers too


def sweep_runs(client: MlflowClient, name: str) -> tuple[list, list]:
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id]) if exp else []
    return (
        [r for r in runs if r.data.tags.get("unitlab.role") == "sweep"],
        [r for r in runs if r.data.tags.get("unitlab.role") == "trial"],
    )


def test_sweep_survives_an_mlflow_outage_longer_than_the_retry_budget(tmp_path):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    spec = sweep_spec("outage", epochs=4, train_size=2048, max_concurrent=2)
    spec["axes"]["attention"] = spec["axes"]["attention"][:1]  # two trials
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        # MLflow's own budget shortened to about 2 s per request: the outage below outlasts it tenfold
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "2",
        "UNITLAB_MLFLOW_POLL_S": "1",
    }
    server = start_server(tmp_path, port)
    store = tmp_path / "store" / "outage"
    driver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "orchestrator",
            "sweep",
            str(write(tmp_path, spec)),
            "--tracking-uri",
            uri,
            "--storage-path",
            str(tmp_path / "store"),
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for(lambda: list(store.glob("*/checkpoint_000000")) or driver.poll() is not None, 240, "a first epoch")
        assert driver.poll() is None, "the sweep ended before the outage"
        stop_server(server)
        time.sleep(25)  # trials go on training meanwhile; the second epoch's write waits
        assert driver.poll() is None, "the sweep aborted during the outage"
        server = start_server(tmp_path, port)
        output, _ = driver.communicate(timeout=420)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        stop_server(server)
    assert driver.returncode == 0, output[-4000:]
    assert "is not answering" in output and "answers again" in output
    server = start_server(tmp_path, port)
    try:
        client = MlflowClient(uri)
        parents, children = sweep_runs(client, "outage")
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert len(children) == 2
        for run in children:
            assert run.info.status == "FINISHED", run.data.tags
            assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_acc")) == [0, 1, 2, 3]
            assert len(client.get_metric_history(run.info.run_id, "test_acc")) == 1
            assert {f.path for f in client.list_artifacts(run.info.run_id, "model")} == {
                "model/model.pt",
                "model/spec.json",
            }
    finally:
        stop_server(server)
