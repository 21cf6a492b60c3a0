"""What mattered in a sweep: fANOVA importance from a study joined to MLflow rows, the note when
there is too little to fit, and the parallel-coordinates figure."""

from __future__ import annotations

import itertools

import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from orchestrator.workbench.importance import MIN_TRIALS, importance, plot_parallel_coordinates

HEADS = CategoricalDistribution(["heads=4", "heads=16"])
CONV = CategoricalDistribution([0, 1])
LR = FloatDistribution(1e-4, 1e-2, log=True)


def trials_and_rows(n_seeds: int = 2):
    """A grid of heads x conv x lr x seeds whose val accuracy is set by conv alone (plus a seed
    wobble) and whose latency by heads alone."""
    trials, rows = [], []
    for i, (heads, conv, lr, seed) in enumerate(
        itertools.product(HEADS.choices, CONV.choices, (1e-3, 5e-3), range(n_seeds))
    ):
        run_id = f"run{i}"
        trials.append(
            create_trial(
                state=TrialState.COMPLETE,
                params={"attention": heads, "n_conv_blocks": conv, "recipe.lr": lr},
                distributions={"attention": HEADS, "n_conv_blocks": CONV, "recipe.lr": LR},
                values=[0.3 + 0.1 * conv + 0.001 * seed],
                user_attrs={"mlflow_run_id": run_id, "seed": seed},
            )
        )
        metrics = {"val_acc": 0.3 + 0.1 * conv + 0.001 * seed, "latency_ms_b1": 1.0 + (heads == "heads=16")}
        rows.append({"run_id": run_id, "status": "FINISHED", "metrics": metrics, "val_acc": metrics["val_acc"]})
    return trials, rows


def test_importance_finds_the_axis_that_sets_each_objective(tmp_path):
    trials, rows = trials_and_rows()
    result = importance(trials, rows)
    assert result.axes == ["attention", "n_conv_blocks", "recipe.lr"]
    val, latency = result.scores["val_acc"], result.scores["latency_ms_b1"]
    assert sum(val.values()) == pytest.approx(1.0) and val["n_conv_blocks"] > 0.9
    assert latency["attention"] > 0.9
    (first, second) = result.lines()
    assert first.startswith("importance for val accuracy (fANOVA, 16 trials): n_conv_blocks 1.00,")
    assert second.startswith("importance for latency at batch 1 (fANOVA, 16 trials): attention")
    figure = plot_parallel_coordinates(result, tmp_path / "pc.png")
    assert figure.read_bytes()[:4] == b"\x89PNG"


def test_importance_says_so_instead_of_fitting_noise():
    trials, rows = trials_and_rows()
    few = importance(trials[: MIN_TRIALS - 1], rows)
    assert not few.scores and few.lines() == [
        f"importance needs at least {MIN_TRIALS} finished trials; this sweep has 3"
    ]
    failed = [dict(r, status="FAILED") for r in rows]  # runs that did not finish are left out
    assert importance(trials, failed).lines()[0].endswith("this sweep has 0")
    trials4, rows4 = trials_and_rows(n_seeds=4)
    cell = [t for t in trials4 if t.params == {"attention": "heads=4", "n_conv_blocks": 0, "recipe.lr": 1e-3}]
    assert len(cell) == 4  # four seeds of one cell: only noise
    assert importance(cell, rows4).lines() == [
        "importance: no axis varies across the finished trials (seeds are noise, not an axis)"
    ]
    no_latency = [dict(r, metrics={"val_acc": r["metrics"]["val_acc"]}) for r in rows]
    assert set(importance(trials, no_latency).scores) == {"val_acc"}  # latency not measured: not scored


def test_study_urls_never_show_a_password(monkeypatch, tmp_path):
    from orchestrator.workbench.study_store import logged_study_url, public_url, study_storage

    url = "postgresql+psycopg://mlflow:s3cret@10.0.0.5:5432/optuna"
    assert public_url(url) == "postgresql+psycopg://mlflow:***@10.0.0.5:5432/optuna"
    assert public_url("postgresql+psycopg://mlflow@10.0.0.5:5432/optuna").endswith("mlflow@10.0.0.5:5432/optuna")
    monkeypatch.delenv("UNITLAB_STUDY_STORAGE", raising=False)
    assert logged_study_url(public_url(url)) is None  # hidden: only the environment can say it
    monkeypatch.setenv("UNITLAB_STUDY_STORAGE", url)
    assert logged_study_url(public_url(url)) == url and study_storage("sqlite:///x/mlflow.db") == url
    monkeypatch.delenv("UNITLAB_STUDY_STORAGE")
    assert study_storage(f"sqlite:///{tmp_path}/mlflow.db") == f"sqlite:///{tmp_path}/optuna.db"
    assert logged_study_url(f"sqlite:///{tmp_path}/optuna.db") is None  # no file: nothing is created by reading
    assert not (tmp_path / "optuna.db").exists()


def test_a_study_left_by_another_sweep_of_the_same_name_is_replaced(tmp_path):
    """`make clean-runs` or a deleted experiment frees a sweep name in MLflow; its old study must not
    collect the new sweep's trials."""
    from conftest import sweep_spec, write

    from orchestrator.sweeps.spec import load_spec
    from orchestrator.sweeps.study import study_id
    from orchestrator.workbench.study_store import open_storage

    spec = load_spec(write(tmp_path, sweep_spec("again")))
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    first = study_id(storage, spec, "parent-1")
    storage.create_new_trial(first)
    assert study_id(storage, spec, "parent-1") == first and len(storage.get_all_trials(first)) == 1  # resume
    second = study_id(storage, spec, "parent-2")
    assert storage.get_study_user_attrs(second)["mlflow_parent_run_id"] == "parent-2"
    assert storage.get_all_trials(second) == []  # the earlier sweep's trial is gone with its study
    assert [s.study_name for s in storage.get_all_studies()] == ["again"]
