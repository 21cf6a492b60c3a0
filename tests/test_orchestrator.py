"""Sweeps on real Ray and real MLflow (SQLite): spec validation, a full sweep, and faults.

Faults: a trial's worker process killed mid-training resumes from its last checkpoint in the same
MLflow run; a killed driver is continued by ``resume`` without rerunning or duplicating trials.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml
from conftest import REPO, cli_args, sweep_spec, write
from mlflow import MlflowClient
from nodes import free_port

from orchestrator.cli import main
from orchestrator.sweeps.spec import FINAL_METRICS, load_spec, point_key
from trainables.config import JobConfig, prepare
from trainables.data import load_splits
from trainables.models import build_model
from trainables.probs import read_probs
from trainables.train import evaluate, make_loaders, run_job


def wait_for_json(url: str, seconds: float) -> dict:
    """GET ``url`` until it answers with JSON (a server still starting), at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                return json.loads(reply.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def trial_runs(tmp_path: Path, name: str) -> tuple[list, list]:
    """(parent runs, child runs) of a sweep's experiment."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id]) if exp else []
    return (
        [r for r in runs if r.data.tags.get("unitlab.role") == "sweep"],
        [r for r in runs if r.data.tags.get("unitlab.role") == "trial"],
    )


def steps(tmp_path: Path, run_id: str) -> list[int]:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return sorted(m.step for m in client.get_metric_history(run_id, "val_acc"))


# ---------------------------------------------------------------- bad specs


def _set(path: str, value):
    def apply(spec: dict) -> None:
        *head, last = path.split(".")
        node = spec
        for key in head:
            node = node[key]
        node[last] = value

    return apply


BAD_SPECS = {
    "unknown key": (_set("epochz", 3), "sweep.epochz: unknown key"),
    "wrong type": (_set("max_concurrent", "two"), "sweep.max_concurrent: must be int"),
    "empty axis": (_set("axes.n_conv_blocks", []), "sweep.axes.n_conv_blocks: empty axis"),
    "impossible model": (_set("axes.n_conv_blocks", [0, 3]), "model.n_conv_blocks: 3 exceeds model.blocks"),
    "missing data": (_set("data", {"name": "cifar100", "data_dir": "/nonexistent/data"}), "sweep.data:"),
    "unknown base key": (_set("base.epochz", 1), "sweep.base: config.epochz"),
    "unknown model field": (_set("axes.head_size", [4]), "model.head_size: unknown key"),
    "bad search mode": (_set("search", {"mode": "random"}), "sweep.search.mode"),
    "single final objective": (
        _set("search", {"mode": "optuna", "metrics": {"latency_ms_b1": "min"}}),
        "sweep.search.metrics.latency_ms_b1",
    ),
    "bad distribution": (
        _set("search", {"mode": "optuna", "distributions": {"recipe.lr": {"type": "float", "low": 1.0, "high": 0.1}}}),
        "sweep.search.distributions.recipe.lr",
    ),
    "bad scheduler": (_set("scheduler", "hyperband"), "sweep.scheduler"),
    "no gpus on the cluster": (_set("resources", {"cpus": 1, "gpus": 8}), "sweep.resources.gpus"),
    "analysis threshold": (_set("analyze", {"threshold": 1.5}), "sweep.analyze.threshold: must be in (0, 1)"),
    "unknown analysis tap": (_set("analyze", {"taps": ["block.9.out"]}), "unknown tap 'block.9.out'"),
    "readout option of another recipe": (
        _set("analyze", {"readout_max_iter": 50}),
        "sweep.analyze.readout_max_iter: readout option 'max_iter' does not apply to recipe 'paper100'",
    ),
    "unknown readout recipe": (
        _set("analyze", {"recipe": "fast"}),
        "sweep.analyze.recipe: must be one of paper100, paper",
    ),
    "prune without analysis": (_set("prune", {"methods": ["andc"]}), "which come from the analysis"),
    "prune method of another family": (
        lambda s: s.update(analyze=True, prune={"methods": ["afcc"]}),
        "'afcc' does not apply to a cct model",
    ),
    "prune level out of range": (
        lambda s: s.update(prune={"methods": ["random"], "thresholds": [], "levels": [1.5]}),
        "sweep.prune.levels: must be in [0, 1]",
    ),
    "unknown prune method": (
        lambda s: s.update(analyze=True, prune={"methods": ["snip"]}),
        "sweep.prune.methods: must be one of",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_spec_is_one_line_exit_2_and_writes_nothing(case, tmp_path, capsys, local_ray):
    mutate, message = BAD_SPECS[case]
    spec = sweep_spec("bad")
    mutate(spec)
    assert main(["sweep", str(write(tmp_path, spec)), *cli_args(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "store").exists()


def test_unreadable_data_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, local_ray):
    root = tmp_path / "data" / "cifar100"
    root.mkdir(parents=True)
    for split in ("train", "test"):
        (root / f"{split}-00000-of-00001.parquet").write_bytes(b"not parquet")
    spec = sweep_spec("bad", data={"name": "cifar100", "data_dir": str(tmp_path / "data"), "val_size": 10})
    assert main(["sweep", str(write(tmp_path, spec)), *cli_args(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: sweep.data: data file") and "Parquet" in err, err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "store").exists()


def test_cli_process_rejects_a_bad_spec(tmp_path):
    spec = sweep_spec("bad", axes={"heads": []})
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", "sweep", str(write(tmp_path, spec)), *cli_args(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and result.stderr.strip() == "error: sweep.axes.heads: empty axis"
    assert not (tmp_path / "mlflow.db").exists()


def test_grid_and_optuna_specs_expand_to_trials(tmp_path):
    grid = load_spec(write(tmp_path, sweep_spec("grid", search={"num_samples": 2})))
    assert grid.num_trials() == 8
    assert [grid.variant(p) for p in grid.grid_points()][:2] == [
        "heads=2,head_dim=16,n_conv_blocks=0",
        "heads=2,head_dim=16,n_conv_blocks=1",
    ]
    job = grid.job_config(grid.grid_points()[-1])
    assert job["model"] == {"preset": "cct_tiny", "heads": 4, "head_dim": 8, "n_conv_blocks": 1} and job["seed"] == 0
    optuna = load_spec(
        write(
            tmp_path,
            sweep_spec(
                "opt",
                search={
                    "mode": "optuna",
                    "num_samples": 5,
                    "metrics": {"val_acc": "max", "latency_ms_b1": "min"},
                    "distributions": {"recipe.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
                },
            ),
        )
    )
    assert optuna.num_trials() == 5 and optuna.metrics == {"val_acc": "max", "latency_ms_b1": "min"}
    assert optuna.job_config({"recipe.lr": 0.001})["recipe"]["lr"] == 0.001


def test_each_trial_gets_its_job_resolved_once_when_the_spec_loads(tmp_path):
    """load_spec resolves every grid cell's JobConfig; the trainable takes that object as is, and
    run_job accepts nothing but a resolved JobConfig."""
    spec = load_spec(write(tmp_path, sweep_spec("once")))
    for point in spec.grid_points():
        job = spec.job(point)
        assert isinstance(job, JobConfig) and job is spec.jobs[point_key(point)] is spec.job(point)
        assert job.model["family"] == "cct" and job.model["num_classes"] == 4  # sized to the data
    optuna = load_spec(
        write(
            tmp_path,
            sweep_spec(
                "opt",
                search={
                    "mode": "optuna",
                    "num_samples": 2,
                    "distributions": {"recipe.lr": {"type": "float", "low": 1e-4, "high": 1e-2}},
                },
            ),
        )
    )
    point = {**optuna.grid_points()[0], "recipe.lr": 0.002}  # an Optuna sample: resolved when the trial starts
    assert point_key(point) not in optuna.jobs and optuna.job(point).recipe.lr == 0.002
    with pytest.raises(TypeError, match="resolved JobConfig"):
        run_job(spec.job_config(spec.grid_points()[0]), tmp_path / "job")


def test_shipped_sweep_specs_are_valid(data_dir, monkeypatch):
    monkeypatch.setenv("DATA_DIR", str(data_dir))
    paths = [p for p in sorted((REPO / "configs").glob("*.yaml")) if "axes" in yaml.safe_load(p.read_text())]
    assert len(paths) >= 5
    for path in paths:
        spec = load_spec(path)
        assert spec.num_trials() >= 1 and (spec.prune or spec.num_trials() >= 2), path
    cells = load_spec(REPO / "configs/afcc_vgg11.yaml").prune.cells
    assert {"afcc,threshold=0.3", "random,threshold=0.3", "none"} <= set(cells)
    assert cells["random,threshold=0.3"].control_of == "afcc"
    nodal = load_spec(REPO / "configs/nodal_vgg11.yaml").prune.cells
    assert nodal["random,threshold=0.3"].control_of == "nodal"


# ---------------------------------------------------------------- a whole sweep


@pytest.mark.slow
def test_sweep_logs_parent_and_children_with_loadable_artifacts(local_ray, tmp_path, capsys):
    spec = sweep_spec("e2e")
    assert main(["sweep", str(write(tmp_path, spec)), *cli_args(tmp_path)]) == 0
    parents, children = trial_runs(tmp_path, "e2e")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED" and len(children) == 4
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert [a.path for a in client.list_artifacts(parents[0].info.run_id, "sweep")] == ["sweep/spec.yaml"]
    assert {r.data.tags["unitlab.variant"] for r in children} == {
        f"heads={h},head_dim={d},n_conv_blocks={n}" for h, d in ((2, 16), (4, 8)) for n in (0, 1)
    }
    for run in children:
        tags = run.data.tags
        assert run.info.status == "FINISHED" and tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert tags["unitlab.dataset"] == "synthetic" and tags["unitlab.num_classes"] == "4"
        assert steps(tmp_path, run.info.run_id) == [0, 1]
        assert set(FINAL_METRICS) <= set(run.data.metrics) and run.data.params["model.heads"] in ("2", "4")
    for i, run in enumerate(children):  # every trial: the documented rebuild reproduces the logged accuracy
        local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / f"art{i}")))
        for name in (
            "model/spec.json",
            "model/model.pt",
            "probs/probs_val.parquet",
            "probs/probs_test.parquet",
            "figures/curves.png",
            "summary.json",
            "config.json",
        ):
            assert (local / name).is_file(), name
        model = build_model(json.loads((local / "model/spec.json").read_text()))
        model.load_state_dict(torch.load(local / "model/model.pt", weights_only=True))
        cfg = prepare(json.loads((local / "config.json").read_text()))
        loaders = make_loaders(load_splits(cfg.data, cfg.seed), cfg, torch.device("cpu"), False)
        _, acc, probs = evaluate(model, loaders["test"])
        assert acc == run.data.metrics["test_acc"]
        np.testing.assert_allclose(probs, read_probs(local / "probs/probs_test.parquet")[2], atol=1e-5, rtol=0)
    # the same sweep as an Optuna study beside the tracking store: values equal the MLflow metrics
    assert parents[0].data.tags["unitlab.study_storage"] == f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.load_study(study_name="e2e", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    by_run = {t.user_attrs["mlflow_run_id"]: t for t in study.trials}
    assert len(study.trials) == 4 and set(by_run) == {r.info.run_id for r in children}
    for run in children:
        trial = by_run[run.info.run_id]
        assert trial.state == optuna.trial.TrialState.COMPLETE and trial.values == [run.data.metrics["val_acc"]]
        history = client.get_metric_history(run.info.run_id, "val_acc")
        assert trial.intermediate_values == {m.step: m.value for m in history}
        assert trial.params["n_conv_blocks"] == int(run.data.params["model.n_conv_blocks"])
        assert (
            trial.params["attention"]
            == f"heads={run.data.params['model.heads']},head_dim={run.data.params['model.head_dim']}"
        )
        assert trial.user_attrs["seed"] == 0 and "seed" not in trial.params  # seeds are noise, not a parameter
    # what mattered, on the parent run: fANOVA importance of the two axes for each objective
    logged = client.get_run(parents[0].info.run_id).data.metrics
    for prefix in ("importance", "importance_latency_ms_b1"):
        scores = [logged[f"{prefix}/{axis}"] for axis in ("attention", "n_conv_blocks")]
        assert sum(scores) == pytest.approx(1.0) and all(0 <= v <= 1 for v in scores)
    figures = {a.path for a in client.list_artifacts(parents[0].info.run_id, "summary/figures")}
    assert "summary/figures/parallel_coordinates.png" in figures
    # ... served by optuna-dashboard: its API lists the study's four trials
    port = free_port()
    dashboard = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "dashboard", "e2e", "--port", str(port), *cli_args(tmp_path)[:2]],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        first = dashboard.stdout.readline()
        assert first.startswith("study e2e (sqlite:///") and f"http://127.0.0.1:{port}/dashboard/studies/" in first
        studies = wait_for_json(f"http://127.0.0.1:{port}/api/studies", 60)
        (listed,) = [s for s in studies["study_summaries"] if s["study_name"] == "e2e"]
        detail = wait_for_json(f"http://127.0.0.1:{port}/api/studies/{listed['study_id']}", 10)
        listed_runs = {a["value"] for t in detail["trials"] for a in t["user_attrs"] if a["key"] == "mlflow_run_id"}
        assert listed_runs == {r.info.run_id for r in children}
        assert len(detail["trials"]) == 4 and all(t["state"] == "Complete" for t in detail["trials"])
        assert {p["name"] for t in detail["trials"] for p in t["params"]} == {"attention", "n_conv_blocks"}
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=30)
    capsys.readouterr()
    assert main(["runs", "e2e", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 0
    out = capsys.readouterr().out
    assert sum(" FINISHED " in line for line in out.splitlines()) == 4
    assert "mlflow ui --backend-store-uri sqlite:///" in out
    assert "ran on: cpu (" in out and f"torch {torch.__version__}" in out and "eval fp32" in out


@pytest.mark.slow
def test_optuna_multi_objective_with_asha_ends_every_run(local_ray, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TUNE_DISABLE_STRICT_METRIC_CHECKING", "0")  # the sweep sets it; restored afterwards
    spec = sweep_spec(
        "optuna",
        epochs=3,
        scheduler={"name": "asha", "grace_period": 1, "reduction_factor": 2},
        search={
            "mode": "optuna",
            "num_samples": 4,
            "metrics": {"val_acc": "max", "latency_ms_b1": "min"},
            "distributions": {"recipe.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
        },
    )
    assert main(["sweep", str(write(tmp_path, spec)), *cli_args(tmp_path)]) == 0
    parents, children = trial_runs(tmp_path, "optuna")
    assert parents[0].info.status == "FINISHED" and len(children) == 4
    for run in children:
        history = steps(tmp_path, run.info.run_id)
        if run.info.status == "KILLED":  # stopped early by ASHA
            assert run.data.tags["unitlab.stopped"] == "scheduler" and len(history) < 3
        else:
            assert run.info.status == "FINISHED" and history == [0, 1, 2] and "latency_ms_b1" in run.data.metrics
    lrs = {float(r.data.params["recipe.lr"]) for r in children}
    assert len(lrs) == 4 and all(1e-4 <= lr <= 1e-2 for lr in lrs)
    study = optuna.load_study(study_name="optuna", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"] and len(study.trials) == 4
    by_run = {t.user_attrs["mlflow_run_id"]: t for t in study.trials}
    for run in children:
        trial = by_run[run.info.run_id]
        assert trial.params["recipe.lr"] == pytest.approx(float(run.data.params["recipe.lr"]))
        if run.info.status == "KILLED":
            assert trial.state == optuna.trial.TrialState.PRUNED and len(trial.intermediate_values) < 3
        else:
            m = run.data.metrics
            assert trial.state == optuna.trial.TrialState.COMPLETE
            assert trial.values == [m["val_acc"], m["latency_ms_b1"]]
    assert "pareto" in capsys.readouterr().out


# ---------------------------------------------------------------- faults


def ancestors(pid: int) -> list[int]:
    chain = []
    while pid > 1:
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError):
            break
        chain.append(pid)
    return chain


def descendants(root: int) -> list[int]:
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    return [p for p in pids if root in ancestors(p)]


def trial_workers(root: int) -> list[int]:
    """Processes of Ray trial actors (titled ``ray::ImplicitFunc``) started under ``root``."""
    found = []
    for pid in descendants(root):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::ImplicitFunc"):
                found.append(pid)
        except FileNotFoundError:
            pass
    return found


@pytest.mark.slow
def test_killed_worker_resumes_from_its_checkpoint_in_the_same_run(local_ray, tmp_path):
    spec = sweep_spec("workerkill", epochs=4, train_size=2048, axes={"n_conv_blocks": [1]})
    store = tmp_path / "store" / "workerkill"
    killed = []

    def kill_the_trial_after_its_second_checkpoint():
        # Not after the first: the driver may not have registered checkpoint 0 when its folder appears,
        # and Tune then restarts from scratch. By checkpoint 1's upload it has long processed epoch 0.
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            workers = trial_workers(os.getpid())
            if workers and list(store.glob("*/checkpoint_000001")):
                os.kill(workers[0], signal.SIGKILL)
                killed.append(workers[0])
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_trial_after_its_second_checkpoint)
    killer.start()
    assert main(["sweep", str(write(tmp_path, spec)), *cli_args(tmp_path)]) == 0
    killer.join()
    assert killed
    _, children = trial_runs(tmp_path, "workerkill")
    assert len(children) == 1 and children[0].info.status == "FINISHED"
    assert steps(tmp_path, children[0].info.run_id) == [0, 1, 2, 3]
    assert children[0].data.tags["unitlab.attempts"] == "2" and int(children[0].data.tags["unitlab.start_epoch"]) >= 1


def test_dashboard_bad_input_is_one_line_and_creates_nothing(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("old", artifact_location=(tmp_path / "art").as_uri())
    client.create_run(exp, tags={"unitlab.role": "sweep", "unitlab.sweep": "old"})
    capsys.readouterr()
    assert main(["dashboard", "nope", "--tracking-uri", uri]) == 2
    assert capsys.readouterr().err.strip() == f"error: dashboard nope: no sweep of that name in {uri}"
    assert main(["dashboard", "old", "--tracking-uri", uri]) == 2  # a sweep from before studies were recorded
    assert capsys.readouterr().err.strip().startswith(f"error: dashboard old: no study file {tmp_path / 'optuna.db'}")
    assert not (tmp_path / "optuna.db").exists()


def test_verbose_travels_to_trials_in_their_context_not_their_environment(tmp_path, monkeypatch):
    """On a cluster a trial's process does not inherit the driver's environment: ``--verbose`` is
    captured in the context Ray ships to it."""
    import logging
    import pickle

    from orchestrator.sweeps.callbacks import VERBOSE
    from orchestrator.sweeps.trainable import QUIET_LOGGERS, TrialContext, take_trial_share

    spec = load_spec(write(tmp_path, sweep_spec("loud")))
    monkeypatch.setenv(VERBOSE, "1")
    loud = TrialContext(spec, "sqlite:///x.db", "1", "parent")
    monkeypatch.delenv(VERBOSE)
    quiet = TrialContext(spec, "sqlite:///x.db", "1", "parent")
    shipped = pickle.loads(pickle.dumps(loud))  # as Ray sends it to a trial process without the variable
    logger = logging.getLogger(QUIET_LOGGERS[0])
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    threads = torch.get_num_threads()  # take_trial_share sets this process's share
    try:
        take_trial_share(spec, shipped.verbose)
        assert shipped.verbose and logger.level == logging.NOTSET
        take_trial_share(spec, quiet.verbose)
        assert not quiet.verbose and logger.level == logging.WARNING
    finally:
        torch.set_num_threads(threads)
