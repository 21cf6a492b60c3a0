"""The sweep as a researcher sees it in MLflow, checked through a real `mlflow server`'s REST API (what
the UI reads): the parent run's summary, short run names, analysis depth series, the HTML report."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO, sweep_spec, write
from mlflow import MlflowClient
from nodes import free_port
from test_faults import start_server, stop_server

from orchestrator.cli import main as orchestrator_main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served_sweep(tmp_path_factory):
    """A finished two-trial sweep (2 heads trained in bf16, 4 in fp32, whatever the CPU; analysed, one
    prune cell) on an MLflow server."""
    tmp = tmp_path_factory.mktemp("workbench")
    port = free_port()
    server = start_server(tmp, port)
    uri = f"http://127.0.0.1:{port}"
    spec = sweep_spec(
        "bench",
        epochs=2,
        axes={
            "attention": [{"heads": 2, "head_dim": 16, "bf16": True}, {"heads": 4, "head_dim": 8, "bf16": False}],
            "seed": [0],
        },
        analyze={"train_size": 128, "test_size": 64, "readout_epochs": 4},
        prune={"methods": ["none"], "finetune_epochs": 1},
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        swept = subprocess.run(
            [
                sys.executable,
                "-m",
                "orchestrator",
                "sweep",
                str(write(tmp, spec)),
                "--tracking-uri",
                uri,
                "--storage-path",
                str(tmp / "store"),
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert swept.returncode == 0, swept.stdout[-3000:] + swept.stderr[-3000:]
        committee = ["committee", "--experiment", "bench", "--method", "topk", "--size", "2", "--tracking-uri", uri]
        assert orchestrator_main(committee) == 0
        report = subprocess.run(
            [
                sys.executable,
                "-m",
                "orchestrator",
                "report",
                "bench",
                "--tracking-uri",
                uri,
                "--out",
                str(tmp / "report"),
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
        yield {
            "client": MlflowClient(uri),
            "uri": uri,
            "tmp": tmp,
            "sweep_out": swept.stdout,
            "sweep_console": swept.stdout + swept.stderr,
            "report_out": report.stdout,
        }
    finally:
        stop_server(server)


def runs_of(client: MlflowClient, role: str) -> list:
    exp = client.get_experiment_by_name("bench")
    return [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("unitlab.role") == role]


def test_console_has_a_line_per_epoch_and_no_noise(served_sweep):
    """What a person watching the sweep reads: a line per epoch of each trial and of each pruned trial,
    with accuracy and time left; not Tune's tables, per-checkpoint lines or MLflow's warnings."""
    console = served_sweep["sweep_console"]
    epochs = re.findall(r"\[(\w+)\] epoch (\d)/2  train_loss \d+\.\d{3}  val_acc \d\.\d{4}  [\d.]+ s/epoch", console)
    assert len({trial for trial, _ in epochs}) == 2 and {e for _, e in epochs} == {"1", "2"}, console[-3000:]
    assert re.search(r"none of \w{8} \[\w+\] epoch 1/1  train_loss [\d.]+  val_acc", console), console[-3000:]
    for noise in (
        "Trial status",
        "Checkpoint successfully created",
        "Add type hints",
        "interpreted in multiple ways",
        "TensorBoard",
        "Validating input example",
    ):
        assert noise not in console, noise


def test_parent_run_summarises_the_sweep(served_sweep, tmp_path):
    client = served_sweep["client"]
    (parent,) = runs_of(client, "sweep")
    trials = runs_of(client, "trial")
    metrics, tags = parent.data.metrics, parent.data.tags
    assert metrics["n_trials_finished"] == 2 == metrics["n_trials"]
    best = {r.info.run_id: r for r in trials}[tags["unitlab.best_run_id"]]
    assert best.data.metrics["val_acc"] == max(r.data.metrics["val_acc"] for r in trials)
    assert metrics["best_val_acc"] == pytest.approx(best.data.metrics["val_acc"])
    assert metrics["best_test_acc"] == pytest.approx(best.data.metrics["test_acc"])  # chosen on val, not on test
    note = tags["mlflow.note.content"]
    assert best.info.run_name in note and "| trial | variant |" in note
    files = {f.path for f in client.list_artifacts(parent.info.run_id, "summary")}
    assert {"summary/trials.csv", "summary/summary.md", "summary/figures"} <= files
    figures = {f.path for f in client.list_artifacts(parent.info.run_id, "summary/figures")}
    assert {
        f"summary/figures/{n}.png"
        for n in ("accuracy_by_variant", "accuracy_vs_latency", "snr_by_depth", "heads_per_label")
    } <= figures
    rows = list(
        csv.DictReader(open(client.download_artifacts(parent.info.run_id, "summary/trials.csv", str(tmp_path))))
    )
    assert sorted(r["run_id"] for r in rows) == sorted(r.info.run_id for r in trials)


def test_trial_runs_have_short_names_and_depth_series(served_sweep, tmp_path):
    client = served_sweep["client"]
    trials = runs_of(client, "trial")
    assert sorted(r.info.run_name for r in trials) == ["h2d16bTrue", "h4d8bFalse"]  # varying axes only
    for run in trials:
        assert run.data.tags["unitlab.variant"].startswith("heads=")
        index = list(
            csv.DictReader(
                open(
                    client.download_artifacts(
                        run.info.run_id, "analysis/depth_index.csv", str(tmp_path / run.info.run_id)
                    )
                )
            )
        )
        for series in ("snr_by_depth", "readout_acc_by_depth", "labels_per_unit_by_depth"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, series)]
            assert sorted(steps) == list(range(len(index))), series
        head_steps = [int(r["step"]) for r in index if r["tap"].endswith(".heads")]
        assert (
            sorted(m.step for m in client.get_metric_history(run.info.run_id, "heads_per_label_by_depth")) == head_steps
        )
        assert not [k for k in run.data.metrics if "/" in k]
        files = {f.path for f in client.list_artifacts(run.info.run_id, "analysis")}
        assert {"analysis/taps.csv", "analysis/units.csv", "analysis/coverage.csv"} <= files
    names = {r.info.run_id: r.info.run_name for r in trials}
    pruned = runs_of(client, "prune")
    assert (
        sorted(r.info.run_name for r in pruned)
        == sorted(f"{names[r.data.tags['unitlab.lineage.parent_run']]}·none" for r in pruned)
        == ["h2d16bTrue·none", "h4d8bFalse·none"]
    )


def test_report_is_one_self_contained_page_logged_to_the_parent(served_sweep):
    client = served_sweep["client"]
    (parent,) = runs_of(client, "sweep")
    page = (served_sweep["tmp"] / "report" / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 5  # 4 sweep figures + a depth figure per trial + pruning
    assert "http://" not in page.replace(served_sweep["uri"], "") and "<script" not in page
    assert "Pruning" in page and "h2d16" in page and "h4d8" in page
    assert re.search(r"<td>\d{1,3}\.\d\d %</td>", page) and not re.search(r"<td>\d+\.0000</td>", page)
    assert re.search(r"<td>\d{1,3}(,\d{3})+</td>", page)  # parameter counts as integers
    assert "Pareto front" in page and "rise with depth" in page  # a sentence under each figure
    assert "importance needs at least 4 finished trials; this sweep has 2" in page  # not noise drawn as a finding
    assert "report/report.html" in {f.path for f in client.list_artifacts(parent.info.run_id, "report")}
    link = f"{served_sweep['uri']}/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}"
    assert link in served_sweep["report_out"] and link in served_sweep["sweep_out"]
    assert "workflowType=machine_learning" in served_sweep["sweep_out"]


def test_report_opens_with_a_recap_read_back_from_mlflow(served_sweep):
    """The lines that end `report` (and `make demo`): each number is the logged one."""
    client, out = served_sweep["client"], served_sweep["report_out"]
    (committee,) = runs_of(client, "committee")
    m = committee.data.metrics
    assert f"committee of 2 ({committee.info.run_name}): test {100 * m['committee_test_acc']:.1f} %" in out
    assert f"{100 * m['gain']:+.2f} points [95 % CI {100 * m['gain_ci_low']:+.2f}," in out
    assert "no seed control" in out  # two head structures, one seed each
    (parent,) = runs_of(client, "sweep")
    best = client.get_run(parent.data.tags["unitlab.best_run_id"])  # chosen on validation
    assert f"best trial {best.info.run_name}: val {100 * best.data.metrics['val_acc']:.1f} %" in out
    assert re.search(
        r"readout accuracy rises from the first to the last tap in \d of 2 trials \(\d+ of \d+ steps up\)", out
    )
    (pruned,) = [r for r in runs_of(client, "prune") if r.data.tags["mlflow.parentRunId"] == best.info.run_id]
    after = f"none {100 * pruned.data.metrics['acc_pruned_val']:.1f} % -> {100 * pruned.data.metrics['acc_finetuned_val']:.1f} %"
    assert after in out, out
    page = (served_sweep["tmp"] / "report" / "report.html").read_text()
    assert "In short" in page and "over its best member" in page and "Readout accuracy rises" in page


@pytest.mark.parametrize(
    ("series", "expected"),
    [
        ([[0.1, 0.2, 0.15, 0.3], [0.3, 0.2]], "in 1 of 2 trials (2 of 4 steps up)"),
        ([[0.1, 0.2], [0.5]], "in 1 of 1 trials (1 of 1 steps up)"),
    ],
)
def test_depth_rise_counts_trials_and_steps(series, expected):
    from orchestrator.workbench.recap import depth_rise

    assert depth_rise(series).endswith(expected)
    assert depth_rise([[0.4]]) is None


def test_trials_log_a_loadable_model_and_their_dataset(served_sweep, tmp_path):
    import mlflow
    import numpy as np

    from trainables.config import prepare
    from trainables.data import load_splits
    from trainables.probs import read_probs

    client = served_sweep["client"]
    mlflow.set_tracking_uri(served_sweep["uri"])
    for run in runs_of(client, "trial"):
        model = mlflow.pyfunc.load_model(run.data.tags["unitlab.model_uri"])
        config = prepare(
            json.loads(
                open(client.download_artifacts(run.info.run_id, "config.json", str(tmp_path / run.info.run_id))).read()
            )
        )
        images = load_splits(config.data, config.seed).test.images
        _, labels, stored, _ = read_probs(
            client.download_artifacts(run.info.run_id, "probs/probs_test.parquet", str(tmp_path / run.info.run_id))
        )
        probs = model.predict(images)
        np.testing.assert_allclose(probs, stored, atol=1e-5, rtol=0)
        assert float((probs.argmax(1) == labels).mean()) == run.data.metrics["test_acc"]
        tags = run.data.tags
        assert tags["unitlab.train_precision"] == ("bf16" if config.bf16 else "fp32")
        assert tags["unitlab.eval_precision"] == "fp32" and tags["unitlab.torch"] and tags["unitlab.cpu"]
        (dataset,) = run.inputs.dataset_inputs
        assert dataset.dataset.name.startswith("synthetic")
