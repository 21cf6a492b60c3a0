"""A trial's logged MLflow Model: loads from code and plain artifacts, reproduces the trial's test
probabilities, and answers `mlflow models serve` requests (a malformed one with a clear 4xx)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import urllib.error
import urllib.request

import mlflow
import numpy as np
import pytest
from conftest import REPO, stop_process, synthetic_job
from mlflow import MlflowClient
from nodes import BIN, free_port, port_open, wait_for

from orchestrator.workbench.logged_model import MODEL_NAME, log_dataset, log_trial_model
from trainables.config import prepare
from trainables.data import load_splits
from trainables.probs import read_probs
from trainables.train import run_job


@pytest.fixture(scope="module", params=[False, True], ids=["fp32", "bf16"])
def logged(tmp_path_factory, request):
    """A tiny job trained in fp32 or in bf16 (forced, whatever the CPU), logged as an MLflow Model."""
    tmp = tmp_path_factory.mktemp("logged")
    cfg = prepare(synthetic_job(epochs=1, checkpoint=False, bf16=request.param, channels_last=request.param))
    summary = run_job(cfg, tmp / "job")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("models", artifact_location=(tmp / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    model_uri = log_trial_model(uri, run_id, tmp / "job", cfg, summary["norm"])
    log_dataset(client, run_id, cfg)
    return {"tmp": tmp, "cfg": cfg, "uri": uri, "client": client, "run_id": run_id, "model_uri": model_uri}


def test_logged_model_reproduces_the_trial_and_names_its_data(logged):
    mlflow.set_tracking_uri(logged["uri"])
    model = mlflow.pyfunc.load_model(logged["model_uri"])
    splits = load_splits(logged["cfg"].data, logged["cfg"].seed)
    probs = model.predict(splits.test.images)
    _, labels, stored, _ = read_probs(logged["tmp"] / "job" / "probs_test.parquet")
    assert probs.shape == stored.shape and probs.dtype == np.float32
    np.testing.assert_allclose(probs, stored, atol=1e-5, rtol=0)
    assert (probs.argmax(1) == stored.argmax(1)).all()
    summary = json.loads((logged["tmp"] / "job" / "summary.json").read_text())
    assert float((probs.argmax(1) == labels).mean()) == summary["test_acc"]
    inputs = model.metadata.get_input_schema().inputs[0]
    assert inputs.type == np.dtype(np.uint8) and inputs.shape == (-1, 16, 16, 3)
    run = logged["client"].get_run(logged["run_id"])
    logged_model = logged["client"].get_logged_model(logged["model_uri"].rsplit("/", 1)[-1])
    assert logged_model.experiment_id == run.info.experiment_id and logged_model.source_run_id == run.info.run_id
    assert not (logged["tmp"].parent / "mlruns").exists()
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name.startswith("synthetic") and len(dataset.dataset.digest) == 12
    with pytest.raises(Exception, match="uint8|dtype|type"):
        model.predict(splits.test.images.astype(np.float64))


@contextlib.contextmanager
def served(model_uri: str, tracking_uri: str):
    """`mlflow models serve` of ``model_uri`` on a free loopback port; yields ``post(body) -> (status, json)``."""
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "PYTHONPATH": str(REPO),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }  # the scoring server runs uvicorn from the venv
    server = subprocess.Popen(
        [
            BIN / "mlflow",
            "models",
            "serve",
            "-m",
            model_uri,
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )

    def post(body: dict) -> tuple[int, dict]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")

    try:
        wait_for(lambda: port_open(port), 120, "mlflow models serve")
        yield post
    finally:
        stop_process(server, group=True)


@pytest.mark.slow
@pytest.mark.parametrize("logged", [False], ids=["fp32"], indirect=True)
def test_mlflow_models_serve_answers_like_the_model_in_memory(logged):
    images = load_splits(logged["cfg"].data, logged["cfg"].seed).test.images[:4]
    mlflow.set_tracking_uri(logged["uri"])
    expected = mlflow.pyfunc.load_model(logged["model_uri"]).predict(images)
    with served(logged["model_uri"], logged["uri"]) as post:
        status, answer = post({"inputs": images.tolist()})
        assert status == 200
        np.testing.assert_allclose(np.asarray(answer["predictions"], dtype=np.float32), expected, atol=1e-5)
        status, answer = post({"inputs": [[1, 2, 3]]})  # not an image batch
        assert 400 <= status < 500 and answer.get("message"), answer


def test_model_name_is_stable():
    assert MODEL_NAME == "pyfunc"
