"""The sweep's after-training stages on real Ray and MLflow: per-trial analysis, then pruned trials.

One training trial (tiny CCT, synthetic data) with ``analyze: true`` and a ``prune`` section of six
cells; each pruned trial must start from its parent's logged model, reuse the parent's label sets at
the analysis threshold, log lineage, dilution and accuracies, and rebuild exactly from its artifacts.
A resume of the finished sweep must not create or rerun any run.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import ray
import torch
from conftest import cli_args, sweep_spec, write
from mlflow import MlflowClient

from analysis.pruning.masks import load_masks, rebuild_pruned
from orchestrator.cli import main
from trainables.config import prepare
from trainables.data import load_splits
from trainables.probs import read_probs
from trainables.run_folder import load_model
from trainables.train import evaluate, make_loaders

pytestmark = pytest.mark.slow

CELLS = {
    "none",
    "andc,threshold=0.3",
    "andc,threshold=0.4",
    "random,threshold=0.3",
    "random,threshold=0.4",
    "random,level=0.5",
}


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A finished sweep with analysis and a prune stage: (tmp folder, client, experiment id)."""
    tmp = tmp_path_factory.mktemp("prune_stage")
    spec = sweep_spec(
        "staged",
        epochs=2,
        axes={"attention": [{"heads": 2, "head_dim": 16}], "seed": [0]},
        analyze={"train_size": 128, "test_size": 64},
        prune={"methods": ["none", "andc", "random"], "thresholds": [0.3, 0.4], "levels": [0.5], "finetune_epochs": 1},
    )
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        assert main(["sweep", str(write(tmp, spec)), *cli_args(tmp)]) == 0
    finally:
        ray.shutdown()
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    return tmp, client, client.get_experiment_by_name("staged").experiment_id


def runs_by_role(client: MlflowClient, exp_id: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for run in client.search_runs([exp_id], max_results=1000):
        out.setdefault(run.data.tags["unitlab.role"], []).append(run)
    return out


def test_trial_runs_the_analysis_before_it_finishes(swept):
    _, client, exp_id = swept
    (trial,) = runs_by_role(client, exp_id)["trial"]
    tags, metrics = trial.data.tags, trial.data.metrics
    assert trial.info.status == "FINISHED" and tags["unitlab.analysis"] == "done"
    assert tags["unitlab.analysis.threshold"] == "0.3"
    assert 0 <= metrics["readout_acc_by_depth"] <= 1 and metrics["labels_per_unit_by_depth"] >= 0
    files = {f.path for f in client.list_artifacts(trial.info.run_id, "analysis")}
    assert {"analysis/taps.json", "analysis/units.parquet", "analysis/label_sets.json"} <= files


def test_pruned_trials_log_lineage_dilution_and_accuracies(swept):
    _, client, exp_id = swept
    roles = runs_by_role(client, exp_id)
    (trial,) = roles["trial"]
    pruned = {r.data.tags["unitlab.prune.cell"]: r for r in roles["prune"]}
    assert set(pruned) == CELLS and len(roles["prune"]) == len(CELLS)
    for run in pruned.values():
        tags, m = run.data.tags, run.data.metrics
        assert run.info.status == "FINISHED"
        assert tags["mlflow.parentRunId"] == tags["unitlab.lineage.parent_run"] == trial.info.run_id
        assert tags["unitlab.variant"] == trial.data.tags["unitlab.variant"]
        assert m["acc_before_val"] == trial.data.metrics["val_acc"]  # started from the parent's weights
        assert m["params_kept"] <= m["params_total"]
        assert len(client.get_metric_history(run.info.run_id, "val_acc")) == 1  # one fine-tuning epoch
    assert pruned["none"].data.metrics["dilution"] == 0
    assert pruned["none"].data.metrics["params_kept"] == pruned["none"].data.metrics["params_total"]
    guided, control = pruned["andc,threshold=0.3"].data.metrics, pruned["random,threshold=0.3"].data.metrics
    per_layer = sorted(k for k in guided if k.startswith("dilution/"))
    assert per_layer == ["dilution/blocks.0.mlp.fc1.weight", "dilution/blocks.0.mlp.fc2.weight"]
    assert [guided[k] for k in per_layer] == [control[k] for k in per_layer]  # same dilution, random mask
    assert abs(pruned["random,level=0.5"].data.metrics["dilution"] - 0.5) < 0.01
    assert pruned["andc,threshold=0.3"].data.tags.get("unitlab.prune.label_sets") == "parent analysis"
    assert "unitlab.prune.label_sets" not in pruned["andc,threshold=0.4"].data.tags  # recomputed at 0.4


def test_pruned_model_rebuilds_from_its_artifacts(swept):
    tmp, client, exp_id = swept
    run = next(
        r for r in runs_by_role(client, exp_id)["prune"] if r.data.tags["unitlab.prune.cell"] == "andc,threshold=0.3"
    )
    local = Path(client.download_artifacts(run.info.run_id, "", str(tmp / "pruned")))
    masks = load_masks(local / "model/masks.pt")
    model = rebuild_pruned(
        json.loads((local / "model/spec.json").read_text()),
        torch.load(local / "model/model.pt", weights_only=True),
        masks,
    )
    cfg = prepare(json.loads((local / "config.json").read_text()))
    loaders = make_loaders(load_splits(cfg.data, cfg.seed), cfg, torch.device("cpu"), False)
    _, acc, _ = evaluate(model, loaders["test"])
    assert acc == run.data.metrics["test_acc"] == run.data.metrics["acc_finetuned_test"]
    mask = masks["blocks.0.mlp.fc1.weight"]
    assert 0 < int(mask.sum()) < mask.numel() and not model.get_submodule("blocks.0.mlp.fc1").weight[~mask].any()
    # deployable: the plain weights load like any trained model, and the run logged an MLflow Model
    plain = load_model(local / "model/spec.json", local / "model/model.pt")
    assert evaluate(plain, loaders["test"])[1] == acc
    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlflow.db'}")
    served = mlflow.pyfunc.load_model(run.data.tags["unitlab.model_uri"])
    _, labels, stored, _ = read_probs(local / "probs/probs_test.parquet")
    probs = served.predict(load_splits(cfg.data, cfg.seed).test.images)
    np.testing.assert_allclose(probs, stored, atol=1e-5, rtol=0)
    assert float((probs.argmax(1) == labels).mean()) == acc


def test_resume_of_a_finished_sweep_adds_no_runs(swept, capsys):
    tmp, client, exp_id = swept
    before = {r.info.run_id: r.info.end_time for r in client.search_runs([exp_id], max_results=1000)}
    capsys.readouterr()
    assert main(["resume", "staged", *cli_args(tmp)]) == 0  # complete: nothing to restore, so no Ray either
    after = {r.info.run_id: r.info.end_time for r in client.search_runs([exp_id], max_results=1000)}
    assert after == before
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["sweep staged is complete (7 of 7 trials ended); nothing to resume"], out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["nosuch", "--methods", "none"], "prune nosuch: neither a sweep name nor a run id"),
        (
            ["staged", "--methods", "andc", "--thresholds", "0.5"],
            "was analysed at threshold 0.3, andc,threshold=0.5 needs 0.5",
        ),
        (["staged", "--methods", "afcc"], "'afcc' does not apply to a cct model"),
        (
            ["staged", "--methods", "random", "--thresholds", "", "--levels", "1.5"],
            "--levels: must be in [0, 1], got 1.5",
        ),
    ],
)
def test_prune_command_rejects_bad_input(swept, capsys, argv, message):
    tmp, client, exp_id = swept
    before = len(client.search_runs([exp_id], max_results=1000))
    assert main(["prune", *argv, *cli_args(tmp)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert len(client.search_runs([exp_id], max_results=1000)) == before


def test_prune_command_needs_the_analysis_or_computes_it(swept, capsys):
    tmp, client, exp_id = swept
    (trial,) = runs_by_role(client, exp_id)["trial"]
    client.delete_tag(trial.info.run_id, "unitlab.analysis")
    try:
        assert main(["prune", trial.info.run_id, "--methods", "andc", *cli_args(tmp)]) == 2
        assert f"run {trial.info.run_id} has no analysis" in capsys.readouterr().err
    finally:
        client.set_tag(trial.info.run_id, "unitlab.analysis", "done")
    args = ["prune", trial.info.run_id, "--methods", "andc", "--thresholds", "0.5", "--analyze", *cli_args(tmp)]
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        assert main(args) == 0
        new = [
            r
            for r in runs_by_role(client, exp_id)["prune"]
            if r.data.tags["unitlab.prune.cell"] == "andc,threshold=0.5"
        ]
        assert len(new) == 1 and new[0].info.status == "FINISHED"
        assert new[0].data.tags["unitlab.lineage.parent_run"] == trial.info.run_id
        assert main(args) == 0  # the same command again: reported, not rerun
        budgets = ["--methods", "structured", "--thresholds", "0.3", "--finetune-budgets", "0,2"]
        assert main(["prune", trial.info.run_id, *budgets, *cli_args(tmp)]) == 0
    finally:
        ray.shutdown()
    twins = {
        r.data.tags["unitlab.prune.cell"]: r
        for r in runs_by_role(client, exp_id)["prune"]
        if r.data.tags["unitlab.prune.method"] == "structured"
    }
    assert set(twins) == {"structured,threshold=0.3,epochs=0", "structured,threshold=0.3,epochs=2"}
    for cell, epochs in (("structured,threshold=0.3,epochs=0", 0), ("structured,threshold=0.3,epochs=2", 2)):
        run = twins[cell]
        assert run.info.status == "FINISHED" and run.data.params["prune.finetune_epochs"] == str(epochs)
        assert len(client.get_metric_history(run.info.run_id, "val_acc")) == max(epochs, 1)  # the curve
        assert any(k.startswith("units_emptied/block.") for k in run.data.metrics)
    assert len(runs_by_role(client, exp_id)["prune"]) == len(CELLS) + 3
    assert "9 pruned trials" in capsys.readouterr().out


def test_pruned_trials_are_committee_candidates(swept, capsys):
    tmp, client, exp_id = swept
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    assert (
        main(
            [
                "committee",
                "--experiment",
                "staged",
                "--include-pruned",
                "--size",
                "3",
                "--method",
                "topk",
                "--tracking-uri",
                uri,
                "--register",
                "with-pruned",
            ]
        )
        == 0
    )
    (committee,) = [r for r in client.search_runs([exp_id]) if r.data.tags.get("unitlab.role") == "committee"]
    assert "registered: models:/with-pruned/1" in capsys.readouterr().out
    pruned = [r for r in runs_by_role(client, exp_id)["prune"] if r.info.status == "FINISHED"]
    assert len(pruned) >= len(CELLS) and committee.data.metrics["valid_runs"] == 1 + len(pruned)
    members = committee.data.tags["unitlab.members"].split(",")
    roles = {client.get_run(m).data.tags["unitlab.role"] for m in members}
    assert "prune" in roles or len(members) == 3
