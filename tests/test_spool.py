"""The trial-side MLflow spool: writes go out in order, wait out an outage, and permanent errors surface."""

from __future__ import annotations

import threading
import time

import pytest
import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException, RestException

from orchestrator.workbench.spool import Spool, TrackingUnavailable, call_when_up, is_transient


class Server:
    """A stand-in for the network: writes fail with a connection error while ``up`` is False."""

    def __init__(self) -> None:
        self.up = True
        self.received: list[int] = []

    def write(self, value: int):
        def send() -> None:
            if not self.up:
                raise requests.exceptions.ConnectionError("Connection refused")
            self.received.append(value)

        return send


def test_writes_wait_out_an_outage_in_order_and_warn_once(capsys):
    server = Server()
    spool = Spool("http://example:5000", poll_s=0.05, wait_s=10)
    server.up = False
    started = time.monotonic()
    for i in range(20):
        spool.submit(f"epoch {i}", server.write(i))
    assert time.monotonic() - started < 0.5, "submit must not wait for the server"
    time.sleep(0.3)
    assert server.received == [] and spool.pending == 20
    threading.Timer(0.3, lambda: setattr(server, "up", True)).start()
    spool.drain()
    assert server.received == list(range(20)) and spool.pending == 0
    err = capsys.readouterr().err
    assert err.count("is not answering") == 1 and err.count("answers again") == 1
    assert spool.outages == 1


def test_drain_gives_up_after_its_wait_with_one_clear_error():
    server = Server()
    server.up = False
    spool = Spool("http://example:5000", poll_s=0.05, wait_s=0.3)
    spool.submit("epoch 0", server.write(0))
    with pytest.raises(TrackingUnavailable, match="1 writes not sent"):
        spool.drain()


def test_a_full_spool_refuses_more_writes():
    server = Server()
    server.up = False
    spool = Spool("http://example:5000", limit=3, poll_s=0.05, wait_s=1)
    for i in range(3):
        spool.submit("w", server.write(i))
    with pytest.raises(TrackingUnavailable, match="spool limit 3"):
        spool.submit("w", server.write(3))


def test_a_permanent_error_is_raised_not_retried():
    calls = []

    def bad() -> None:
        calls.append(1)
        raise MlflowException("INVALID_PARAMETER_VALUE: metric value must be a number")

    spool = Spool("sqlite:///x.db", poll_s=0.05, wait_s=5)
    spool.submit("bad", bad)
    with pytest.raises(MlflowException, match="INVALID_PARAMETER_VALUE"):
        spool.drain()
    assert calls == [1]
    with pytest.raises(MlflowException):
        spool.submit("next", lambda: None)


def test_an_unreachable_real_server_is_transient(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with pytest.raises(Exception) as caught:
        MlflowClient("http://127.0.0.1:9").get_run("0" * 32)
    assert is_transient(caught.value)
    assert not is_transient(MlflowException("RESOURCE_DOES_NOT_EXIST: run 123 not found"))
    pool = "BAD_REQUEST: QueuePool limit of size 5 overflow 10 reached, connection timed out, timeout 30.00"
    assert is_transient(RestException({"error_code": "BAD_REQUEST", "message": pool}))  # the server was full
    assert not is_transient(RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad metric"}))
    assert not is_transient(PermissionError(30, "Read-only file system"))


def test_call_when_up_retries_until_the_server_answers(capsys):
    server = Server()
    server.up = False
    threading.Timer(0.3, lambda: setattr(server, "up", True)).start()
    call_when_up(server.write(7), "http://example:5000", poll_s=0.05, wait_s=5)
    assert server.received == [7]
    assert capsys.readouterr().err.count("is not answering") == 1


def test_a_retried_finish_logs_final_metrics_once_and_clears_the_old_error(tmp_path):
    """A first finish fails on an unwritable artifact store (a file where its folder should be); the
    retried attempt finishes the same run: final metrics once, no stale error tag."""
    from orchestrator.sweeps.spec import FINAL_METRICS
    from orchestrator.workbench.tracking import ERROR, ChildRun

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    blocker = tmp_path / "artifacts"
    blocker.write_text("a file where the artifact folder should be")
    exp = client.create_experiment("finish", artifact_location=blocker.as_uri())
    parent = client.create_run(exp).info.run_id
    tags = {"unitlab.trial_id": "t0", "unitlab.variant": "v", "unitlab.seed": "0"}
    job = tmp_path / "job"
    job.mkdir()
    for name in ("spec.json", "model.pt", "summary.json", "config.json"):
        (job / name).write_text("{}")
    summary = {**{k: 0.5 for k in FINAL_METRICS}, "device": "cpu"}

    first = ChildRun.open(client, exp, parent, tags, {}, None, {})
    with pytest.raises(Exception) as caught:
        first.finish(summary, job)
    first.fail(caught.value)
    assert client.get_run(first.run_id).data.tags[ERROR]

    blocker.unlink()
    second = ChildRun.open(client, exp, parent, tags, {}, None, {})
    assert second.run_id == first.run_id
    second.finish(summary, job)
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and ERROR not in run.data.tags
    assert run.data.tags["unitlab.attempts"] == "2"
    for key in FINAL_METRICS:
        assert len(client.get_metric_history(first.run_id, key)) == 1
    assert {f.path for f in client.list_artifacts(first.run_id, "model")} == {"model/model.pt", "model/spec.json"}
