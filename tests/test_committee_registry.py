"""A committee registered as an MLflow Model: `models:/NAME@ALIAS` reproduces the offline committee on
the stored test set, `committee predict` labels a folder of images, bad members register nothing."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import synthetic_job
from mlflow import MlflowClient
from PIL import Image

from orchestrator.cli import main
from orchestrator.workbench.tracking import JOB_ARTIFACTS
from trainables.config import prepare
from trainables.data import load_splits
from trainables.train import run_job


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Three trained tiny CCTs (two head shapes, two seeds of one) logged as a sweep's trial runs; the
    first and last train in bf16 (forced, whatever the CPU), the second in fp32."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("reg", artifact_location=(root / "artifacts").as_uri())
    parent = client.create_run(exp, tags={"unitlab.role": "sweep", "unitlab.sweep": "reg"}).info.run_id
    client.set_terminated(parent)
    runs = []
    for i, (heads, dim, seed, bf16) in enumerate(((2, 16, 0, True), (4, 8, 0, False), (2, 16, 1, True))):
        job = synthetic_job(
            epochs=2,
            seed=seed,
            checkpoint=False,
            bf16=bf16,
            model={"preset": "cct_tiny", "heads": heads, "head_dim": dim},
        )
        job["data"].update(train_size=512, val_size=128, test_size=128)
        folder = root / f"job{i}"
        run_job(prepare(job), folder)
        run_id = client.create_run(
            exp,
            run_name=f"t{i}",
            tags={
                "mlflow.parentRunId": parent,
                "unitlab.role": "trial",
                "unitlab.sweep": "reg",
                "unitlab.trial_id": f"t{i}",
                "unitlab.dataset": "synthetic",
                "unitlab.num_classes": "4",
                "unitlab.variant": f"heads={heads}",
                "unitlab.seed": str(seed),
            },
        ).info.run_id
        for name, where in JOB_ARTIFACTS.items():
            client.log_artifact(run_id, str(folder / name), where)
        client.set_terminated(run_id)
        runs.append(run_id)
    return {"root": root, "uri": uri, "client": client, "runs": runs, "job": prepare(job)}


def test_registered_committee_reproduces_the_offline_committee(store, capsys):
    uri = store["uri"]
    assert (
        main(
            [
                "committee",
                "--experiment",
                "reg",
                "--size",
                "3",
                "--tracking-uri",
                uri,
                "--register",
                "toy-committee",
                "--alias",
                "champion",
            ]
        )
        == 0
    )
    assert "registered: models:/toy-committee@champion" in capsys.readouterr().out
    client = store["client"]
    (committee,) = client.search_runs(
        [client.get_experiment_by_name("reg").experiment_id], "tags.`unitlab.role` = 'committee'"
    )
    folder = store["root"] / "committee_files"
    members = list(
        __import__("csv").DictReader(
            open(client.download_artifacts(committee.info.run_id, "committee/members.csv", str(folder)))
        )
    )
    # the offline committee, recomputed from the stored probabilities with the logged weights and temperatures
    from analysis.committees.calibration import scale
    from trainables.probs import read_probs

    offline = 0
    for m in members:
        _, labels, probs, _ = read_probs(
            client.download_artifacts(m["run_id"], "probs/probs_test.parquet", str(folder / m["run_id"]))
        )
        offline = offline + float(m["weight"]) * scale(probs, float(m["temperature"])).astype(np.float64)
    assert float((offline.argmax(1) == labels).mean()) == pytest.approx(committee.data.metrics["committee_test_acc"])

    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/toy-committee@champion")
    images = load_splits(store["job"].data, store["job"].seed).test.images
    served = model.predict(images)
    np.testing.assert_allclose(served["probs"], offline, atol=1e-5, rtol=0)
    assert (served["label"] == offline.argmax(1)).all()  # to the last sample


def test_committee_predict_labels_a_folder_of_images(store, tmp_path, capsys):
    images = load_splits(store["job"].data, store["job"].seed).test.images[:5]
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"img{i}.png")
    out = tmp_path / "pred.parquet"
    if not store["client"].search_registered_models("name = 'toy-committee'"):
        pytest.skip("needs the registered committee of the test above")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'elsewhere.db'}")  # --tracking-uri wins over the fluent API's
    assert (
        main(
            [
                "committee",
                "predict",
                "models:/toy-committee@champion",
                str(folder),
                "--out",
                str(out),
                "--tracking-uri",
                store["uri"],
            ]
        )
        == 0
    )
    table = pq.read_table(out).to_pydict()
    assert table["source"] == [f"img{i}.png" for i in range(5)] and len(table["probs"][0]) == 4
    mlflow.set_tracking_uri(store["uri"])
    expected = mlflow.pyfunc.load_model("models:/toy-committee@champion").predict(images)["label"]
    assert table["label"] == expected.tolist()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(folder / "small.png")
    capsys.readouterr()
    assert (
        main(
            [
                "committee",
                "predict",
                "models:/toy-committee@champion",
                str(folder),
                "--out",
                str(tmp_path / "p2.parquet"),
                "--tracking-uri",
                store["uri"],
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "image small.png is 8x8 px, the model takes 16x16" in err[0], err
    assert not (tmp_path / "p2.parquet").exists()
    (folder / "small.png").unlink()
    if not torch.cuda.is_available():
        assert (
            main(
                [
                    "committee",
                    "predict",
                    "models:/toy-committee@champion",
                    str(folder),
                    "--out",
                    str(tmp_path / "p3.parquet"),
                    "--device",
                    "cuda",
                    "--tracking-uri",
                    store["uri"],
                ]
            )
            == 2
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--device: cuda requested but no CUDA device is visible" in err[0], err


def test_a_member_without_weights_registers_nothing(store, capsys):
    client = store["client"]
    exp = client.get_experiment_by_name("reg").experiment_id
    parent = client.search_runs([exp], "tags.`unitlab.role` = 'sweep'")[0].info.run_id
    broken = client.create_run(
        exp,
        tags={
            "mlflow.parentRunId": parent,
            "unitlab.role": "trial",
            "unitlab.sweep": "reg",
            "unitlab.trial_id": "broken",
            "unitlab.dataset": "synthetic",
            "unitlab.num_classes": "4",
            "unitlab.variant": "heads=8",
            "unitlab.seed": "0",
        },
    )
    source = Path(client.download_artifacts(store["runs"][0], "probs", str(store["root"] / "copy")))
    for name in ("probs_val.parquet", "probs_test.parquet"):
        client.log_artifact(broken.info.run_id, str(source / name), "probs")
    client.set_terminated(broken.info.run_id)
    before = len(client.search_registered_models())
    committees = len(client.search_runs([exp], "tags.`unitlab.role` = 'committee'"))
    capsys.readouterr()
    code = main(
        [
            "committee",
            "--experiment",
            "reg",
            "--size",
            "4",
            "--method",
            "topk",
            "--tracking-uri",
            store["uri"],
            "--register",
            "broken-committee",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"member {broken.info.run_id}: weights missing" in err[0], err
    assert len(client.search_registered_models()) == before
    assert len(client.search_runs([exp], "tags.`unitlab.role` = 'committee'")) == committees
    client.delete_run(broken.info.run_id)


@pytest.mark.slow
def test_served_committee_answers_two_images_with_the_same_labels(store):
    from test_logged_model import served

    if not store["client"].search_registered_models("name = 'toy-committee'"):
        pytest.skip("needs the registered committee of the first test")
    images = load_splits(store["job"].data, store["job"].seed).test.images[:2]
    mlflow.set_tracking_uri(store["uri"])
    expected = mlflow.pyfunc.load_model("models:/toy-committee@champion").predict(images)
    with served("models:/toy-committee@champion", store["uri"]) as post:
        status, answer = post({"inputs": images.tolist()})
        assert status == 200, answer
        assert answer["predictions"]["label"] == expected["label"].tolist()
        status, answer = post({"instances": "not images"})
        assert 400 <= status < 500 and answer.get("message"), answer


def test_committee_of_explicit_runs_and_unknown_ids(store, capsys):
    ids = store["runs"][:2]
    assert (
        main(["committee", "--runs", ",".join(ids), "--size", "2", "--method", "topk", "--tracking-uri", store["uri"]])
        == 0
    )
    out = capsys.readouterr().out
    assert all(i in out for i in ids) and store["runs"][2] not in out.split("excluded runs")[0]
    assert main(["committee", "--runs", "nope", "--tracking-uri", store["uri"]]) == 2
    assert "--runs: unknown run id 'nope'" in capsys.readouterr().err
    assert main(["committee", "--experiment", "reg,nope", "--tracking-uri", store["uri"]]) == 2
    assert "unknown experiment 'nope'" in capsys.readouterr().err
