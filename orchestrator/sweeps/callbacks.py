"""Tune callbacks and naming shared by the sweep's stages (training trials, pruned trials)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from mlflow import MlflowClient
from mlflow.entities import Run
from ray import tune

from orchestrator.workbench.tracking import ERROR, STOPPED, connect, end_run

Locate = Callable[[MlflowClient, "tune.experiment.Trial"], "Run | None"]


class ChildRunCloser(tune.Callback):
    """Ends the MLflow runs that their trainable could not end: stopped early by the scheduler (KILLED)
    or lost with their worker after the last retry (FAILED, with the error as a tag).

    ``locate(client, trial)`` finds a Tune trial's MLflow run (None if it never opened one).
    """

    def __init__(self, tracking_uri: str, locate: Locate):
        self.tracking_uri, self.locate = tracking_uri, locate

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._close(trial, "KILLED", {STOPPED: "scheduler"})

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        lines = [line for line in str(trial.get_error()).splitlines() if line.strip()]
        self._close(trial, "FAILED", {ERROR: lines[-1] if lines else "unknown error"})

    def _close(self, trial, status: str, tags: dict[str, str]) -> None:
        """Never raises into Tune's loop: an MLflow outage must not abort the sweep (the run stays
        open; ``resume`` or the sweep's close marks it)."""
        try:
            client = connect(self.tracking_uri)
            run = self.locate(client, trial)
            if run is not None and run.info.status == "RUNNING":
                end_run(client, run.info.run_id, status, tags)
        except Exception as exc:  # noqa: BLE001 - reported, the sweep goes on
            text = str(exc).strip().splitlines()
            print(
                f"unitlab: could not mark trial {trial.trial_id}'s MLflow run {status} "
                f"({type(exc).__name__}: {text[0][:200] if text else ''}); the sweep goes on",
                file=sys.stderr,
                flush=True,
            )


def trial_dirname(trial) -> str:
    """Trial folders named by trial id alone (the default name holds the whole config)."""
    return trial.trial_id
