"""A sweep driver stopped with SIGTERM marks the sweep and its running trials KILLED; `resume`
finishes it with every epoch logged once. (Its own file so that xdist runs it beside the other
long fault tests.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import optuna
import pytest
from conftest import REPO, cli_args, sweep_spec, write
from mlflow import MlflowClient
from test_faults import sweep_runs
from test_multinode import wait_for

pytestmark = pytest.mark.slow


def test_sigterm_marks_the_sweep_killed_and_resume_finishes_it(tmp_path):
    spec = sweep_spec("sigterm", epochs=4, train_size=2048)
    store = tmp_path / "store" / "sigterm"
    driver = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "sweep", str(write(tmp_path, spec)), *cli_args(tmp_path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for(lambda: list(store.glob("*/checkpoint_000001")) or driver.poll() is not None, 240, "two epochs")
        assert driver.poll() is None, "the sweep ended before it could be stopped"
        driver.send_signal(signal.SIGTERM)
        output, _ = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 130, output[-4000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parents, children = sweep_runs(client, "sigterm")
    assert parents[0].info.status == "KILLED" and "unitlab.stopped" in parents[0].data.tags
    assert not [r for r in children if r.info.status == "RUNNING"]
    stopped = [r for r in children if r.info.status == "KILLED"]
    assert stopped and all("unitlab.stopped" in r.data.tags for r in stopped)

    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", "resume", "sigterm", *cli_args(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    parents, children = sweep_runs(client, "sigterm")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 4
    for run in children:
        assert run.info.status == "FINISHED"
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_acc")) == [0, 1, 2, 3]
    # the Optuna study went on with resume: one trial per Tune trial, none doubled
    study = optuna.load_study(study_name="sigterm", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(study.trials) == 4 and {t.state for t in study.trials} == {optuna.trial.TrialState.COMPLETE}
    assert {t.user_attrs["mlflow_run_id"] for t in study.trials} == {r.info.run_id for r in children}
    assert all(sorted(t.intermediate_values) == [0, 1, 2, 3] for t in study.trials)
