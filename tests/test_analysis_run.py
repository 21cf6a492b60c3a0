"""The analysis pipeline end to end: CLI outputs, fast path vs brute force on trained taps, bad input,
and logging into a real MLflow (SQLite) trial run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import synthetic_job

from analysis.units.clusters import binarize, greedy_clusters
from analysis.units.features import collect_features
from analysis.units.pipeline import AnalysisConfig
from analysis.units.reference import reference_unit_matrices
from analysis.units.results import load_label_sets, load_matrices, load_readouts
from analysis.units.run import analyze, load_model, main
from trainables.config import prepare
from trainables.data import load_splits
from trainables.loader import to_model_input
from trainables.train import run_job

TINY = {"preset": "cct_tiny", "blocks": 2, "n_conv_blocks": 1}
FAST = ["--readout-epochs", "4", "--batch-size", "64"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run_job folder of a tiny conv-replaced CCT trained for two epochs on synthetic data."""
    out = tmp_path_factory.mktemp("run")
    run_job(prepare(synthetic_job(model=TINY, checkpoint=False)), out)
    return out


@pytest.fixture(scope="module")
def results(trained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "results"
    assert main(["--run-dir", str(trained), "--out", str(out), *FAST]) == 0
    return out


def test_cli_writes_consistent_outputs(results, trained):
    model = load_model(trained / "spec.json", trained / "model.pt")
    names = {"units.parquet", "coverage.parquet", "taps.parquet", "taps.json", "label_sets.json", "matrices.npz"}
    assert names <= {p.name for p in results.iterdir()}
    figures = {p.name for p in (results / "figures").iterdir()}
    assert {"depth.png", "shp_block.1.heads.png", "heads_labels.png"} <= figures

    units = pq.read_table(results / "units.parquet").to_pylist()
    matrices = load_matrices(results / "matrices.npz")
    label_sets = load_label_sets(results / "label_sets.json")
    assert list(matrices) == list(model.taps) == list(label_sets)
    for tap, kinds in matrices.items():
        for kind, m in kinds.items():
            rows = [u for u in units if u["tap"] == tap and u["unit_kind"] == kind]
            assert m.dtype == np.float32 and m.shape == (len(rows), 4, 4)
            assert [set(u["labels"]) for u in rows] == label_sets[tap][kind]
            assert all(u["n_labels"] == len(u["labels"]) == sum(map(len, u["clusters"])) for u in rows)
    assert set(matrices["conv_block.0"]) == {"filter"} and set(matrices["block.1.heads"]) == {"node", "head"}

    coverage = pq.read_table(results / "coverage.parquet").to_pylist()
    for tap, kinds in label_sets.items():
        for kind, sets in kinds.items():
            counts = [c["units"] for c in coverage if c["tap"] == tap and c["unit_kind"] == kind]
            assert counts == [sum(label in s for s in sets) for label in range(4)]

    taps = json.loads((results / "taps.json").read_text())
    heads = taps["taps"]["block.1.heads"]["heads_structure"]
    assert set(heads["control"]) >= {"mean_max_share", "mean_entropy", "jaccard"}
    assert np.array(heads["node_counts"]).shape == (2, 4)
    rows = pq.read_table(results / "taps.parquet").to_pylist()
    assert sum(r["primary"] for r in rows) == len(model.taps)
    assert all(0.0 <= r["readout_acc"] <= 1.0 for r in rows)


def test_rethresholding_matrices_npz_reproduces_every_unit(results):
    """binarize + greedy_clusters on matrices.npz at label_sets.json's threshold give every unit's
    labels, clusters, signal and noise exactly: the file holds the very values the analysis used."""
    label_file = json.loads((results / "label_sets.json").read_text())
    units = pq.read_table(results / "units.parquet").to_pylist()
    with np.load(results / "matrices.npz") as data:
        assert not [k for k in data.files if k.endswith("/scale")]
        assert all(data[k].dtype == np.float32 for k in data.files)
    matrices = load_matrices(results / "matrices.npz")
    assert sum(len(m) for kinds in matrices.values() for m in kinds.values()) == len(units)
    for row in units:
        M = matrices[row["tap"]][row["unit_kind"]][row["unit"]]
        B = binarize(M, label_file["threshold"])
        clusters = greedy_clusters(B) if B is not None else []
        signal = sum(len(c) ** 2 for c in clusters)
        noise = int(B.sum()) - signal if B is not None else 0
        labels = sorted(l for c in clusters for l in c)
        assert labels == label_file["taps"][row["tap"]][row["unit_kind"]][row["unit"]], row
        assert (len(labels), clusters, signal, noise) == (
            row["n_labels"],
            row["clusters"],
            row["signal"],
            row["noise"],
        ), row


def test_fast_path_equals_brute_force_on_trained_taps(trained):
    cfg = prepare(json.loads((trained / "config.json").read_text()))
    splits = load_splits(cfg.data, cfg.seed)
    model = load_model(trained / "spec.json", trained / "model.pt")
    taps = ["conv_block.0", "block.1.heads"]
    result = analyze(model, splits, AnalysisConfig(taps=tuple(taps), readout_epochs=4, batch_size=50))
    mean, std = torch.tensor(splits.mean), torch.tensor(splits.std)
    test_x = to_model_input(torch.from_numpy(splits.test.images), mean, std)
    feats = collect_features(model, test_x, taps)
    y = torch.from_numpy(splits.test.labels)
    for tap in taps:
        readout = result.readouts[tap].readout
        for kind, fast in result.matrices[tap].items():
            ref = reference_unit_matrices(readout, feats[tap], y, 4, kind, head_dim=model.taps[tap].head_dim)
            assert np.abs(fast - ref).max() <= 1e-4 * np.abs(ref).max(), (tap, kind)
        assert result.taps[tap]["accuracy"] == pytest.approx(float((readout(feats[tap]).argmax(1) == y).float().mean()))


def test_matrices_rebuild_from_saved_readouts_and_rows(trained, tmp_path):
    """readouts.npz + the model + the data recompute every stored unit matrix; the test subset is balanced."""
    cfg = prepare(json.loads((trained / "config.json").read_text()))
    splits = load_splits(cfg.data, cfg.seed)
    model = load_model(trained / "spec.json", trained / "model.pt")
    result = analyze(
        model, splits, AnalysisConfig(readout_epochs=3, recipe="paper", test_size=41), out_dir=tmp_path, figures=False
    )
    params, rows = load_readouts(tmp_path / "readouts.npz")
    stored = load_matrices(tmp_path / "matrices.npz")
    assert result.meta["test_subset"] == "class-balanced"
    where = {int(r): i for i, r in enumerate(splits.test.indices)}
    positions = np.array([where[int(r)] for r in rows["test_rows"]])
    labels = torch.from_numpy(splits.test.labels[positions])
    assert torch.bincount(labels, minlength=4).tolist() == [10, 10, 10, 10]  # 41 // 4 per label
    assert rows["train_rows"].tolist() == splits.train.indices.tolist()
    mean, std = torch.tensor(splits.mean), torch.tensor(splits.std)
    feats = collect_features(
        model, to_model_input(torch.from_numpy(splits.test.images[positions]), mean, std), list(model.taps)
    )
    for tap, info in model.taps.items():
        p = params[tap]
        z = feats[tap].double() / float(p["scale"])
        if info.kind == "token":  # sequence pooling with the saved vector, then the unit's own weights
            g = torch.softmax(z @ torch.from_numpy(p["pool"]).double(), dim=1)
            z = torch.einsum("nt,ntd->nd", g, z)
        r = z.flatten(1)
        w = torch.from_numpy(p["weight"]).double()
        for kind, matrices in result.matrices[tap].items():
            size = r.shape[1] // matrices.shape[0]
            for u in range(matrices.shape[0]):
                field = r[:, u * size : (u + 1) * size] @ w[:, u * size : (u + 1) * size].T  # (N, C)
                rebuilt = torch.stack([field[labels == l].mean(0) for l in range(4)]).numpy()
                scale = max(np.abs(rebuilt).max(), 1e-12)
                assert np.abs(matrices[u] - rebuilt).max() <= 1e-5 * scale, (tap, kind, u)
            assert np.array_equal(stored[tap][kind], matrices), (tap, kind)


def _write(path: Path, data: dict) -> str:
    path.write_text(json.dumps(data) if path.suffix == ".json" else yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize(
    "case, names",
    [
        ("checkpoint", "does not match"),
        ("tap", "--taps: unknown tap 'block.9.out'"),
        ("threshold0", "--threshold: must be in (0, 1), got 0.0"),
        ("threshold1.5", "--threshold: must be in (0, 1)"),
        ("classes", "data: 5 classes, but the model has 4 outputs"),
        ("recipe", "--recipe: must be one of"),
        ("epochs-lbfgs", "--readout-epochs: readout option 'epochs' does not apply to recipe 'lbfgs'"),
        ("batch", "--batch-size: must be >= 1, got 0"),
        ("labels", "label_sets"),
    ],
)
def test_bad_input_exits_2_with_one_line(case, names, trained, tmp_path, capsys):
    spec = json.loads((trained / "spec.json").read_text())
    data = {"name": "synthetic", "num_classes": 4, "image_size": 16, "train_size": 32, "test_size": 16}
    args = {"--checkpoint": str(trained / "model.pt"), "--spec": str(trained / "spec.json")}
    extra: list[str] = []
    if case == "checkpoint":
        args["--spec"] = _write(tmp_path / "wide.json", {**spec, "width": 48})
    elif case == "tap":
        extra = ["--taps", "block.1.heads,block.9.out"]
    elif case.startswith("threshold"):
        extra = ["--threshold", case.removeprefix("threshold")]
    elif case == "classes":
        data["num_classes"] = 5
    elif case == "recipe":
        extra = ["--recipe", "magic"]
    elif case == "epochs-lbfgs":
        extra = ["--recipe", "lbfgs", "--readout-epochs", "3"]
    elif case == "batch":
        extra = ["--batch-size", "0"]
    else:
        extra = ["--test-size", "2"]  # fewer than one image per label
        names = "test_size: a class-balanced subset needs at least one image per label"
    args["--data"] = _write(tmp_path / "data.yaml", data)
    out = tmp_path / "out"
    code = main([*(x for kv in args.items() for x in kv), "--out", str(out), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and names in err[0], err
    assert not out.exists()


def test_orchestrator_logs_into_trial_run(trained, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from orchestrator.cli import main as cli
    from orchestrator.workbench.analysis_log import config_from_params, depth_series

    def orchestrate(argv: list[str]) -> int:
        return cli(["analyze", *argv])

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("sweep-a", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(exp, tags={"unitlab.role": "sweep", "unitlab.sweep": "sweep-a"}).info.run_id
    trial = client.create_run(
        exp, tags={"unitlab.role": "trial", "unitlab.sweep": "sweep-a", "mlflow.parentRunId": parent}
    ).info.run_id
    for name in ("spec.json", "model.pt"):
        client.log_artifact(trial, str(trained / name), "model")
    for name in ("config.json", "summary.json"):
        client.log_artifact(trial, str(trained / name))
    client.set_terminated(trial)

    taps = "block.1.heads,final_norm"
    kept = tmp_path / "kept"
    assert orchestrate(["sweep-a", "--tracking-uri", uri, "--taps", taps, "--out", str(kept), *FAST]) == 0
    expected = depth_series(json.loads((kept / trial / "taps.json").read_text()))
    for name, steps in expected.items():  # one value per tap, at the tap's depth index
        history = client.get_metric_history(trial, name)
        assert {m.step: m.value for m in history} == pytest.approx(steps) and len(history) == len(steps)
    assert sorted(expected["readout_acc_by_depth"]) == [0, 1]  # block.1.heads, final_norm
    assert sorted(expected["heads_per_label_by_depth"]) == [0]
    assert {
        "snr_by_depth",
        "labels_per_unit_by_depth",
        "noise_per_unit_by_depth",
        "labels_per_head_by_depth",
        "head_max_share_control_by_depth",
    } <= set(expected)
    assert not [k for k in client.get_run(trial).data.metrics if "/" in k], "per-tap metrics are gone"
    logged = {f.path for f in client.list_artifacts(trial, "analysis")}
    assert {
        "analysis/taps.json",
        "analysis/units.parquet",
        "analysis/units.csv",
        "analysis/taps.csv",
        "analysis/depth_index.csv",
        "analysis/label_sets.json",
        "analysis/matrices.npz",
        "analysis/readouts.npz",
        "analysis/figures",
    } <= logged
    assert client.get_run(trial).data.tags["unitlab.analysis.threshold"] == "0.3"

    assert orchestrate([parent, "--tracking-uri", uri, "--taps", taps]) == 0  # already analysed: skipped
    assert "already analysed" in capsys.readouterr().out
    assert orchestrate(["no-such-sweep", "--tracking-uri", uri]) == 2
    assert config_from_params({"data.name": "synthetic", "data.num_classes": "4", "seed": "3", "lr": "0.1"}) == {
        "data": {"name": "synthetic", "num_classes": 4},
        "seed": 3,
    }


def test_report_prints_depth_and_head_tables(results, trained, tmp_path, capsys):
    from analysis.units.report import main as report_main

    assert report_main([str(results)]) == 0
    out = capsys.readouterr().out
    model = load_model(trained / "spec.json", trained / "model.pt")
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| tap")]
    head_taps = [t for t, info in model.taps.items() if info.heads]
    assert [r.split(" | ")[0][2:] for r in rows] == list(model.taps) + head_taps
    assert report_main([str(tmp_path)]) == 2 and "taps.json: not found" in capsys.readouterr().err


def test_a_retried_log_analysis_logs_each_series_point_once(results, tmp_path):
    """The spool retries a write whose reply was lost: logging the same results twice adds nothing."""
    import shutil

    from mlflow import MlflowClient

    from orchestrator.workbench.analysis_log import log_analysis

    folder = tmp_path / "results"
    shutil.copytree(results, folder)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("retry", artifact_location=(tmp_path / "artifacts").as_uri())  # not ./mlruns
    run_id = client.create_run(experiment).info.run_id
    series = log_analysis(run_id, folder, client)
    log_analysis(run_id, folder, client)
    for name, steps in series.items():
        assert sorted(m.step for m in client.get_metric_history(run_id, name)) == sorted(steps), name
