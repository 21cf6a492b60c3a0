"""Tune callbacks and naming shared by the sweep's stages (training trials, pruned trials)."""

from __future__ import annotations

import os
import sys
import time
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


class ProgressLines(tune.Callback):
    """The console of a sweep stage: one line per finished epoch of a trial (epoch, training loss,
    validation accuracy, seconds per epoch, time left for the trial) and one per ended trial, in place of Tune's
    status tables (``python -m orchestrator --verbose`` brings those back, see ``tune_verbosity``).

    ``name(trial)`` gives the short label a person recognises (the MLflow run name).
    """

    def __init__(self, name: Callable[[tune.experiment.Trial], str]):
        self.name = name

    def _print(self, trial, text: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {self.name(trial)} [{trial.trial_id}] {text}", flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if "epoch" not in result or "val_acc" not in result:
            return
        done, total = int(result["epoch"]) + 1, result.get("epochs")
        seconds = result.get("epoch_seconds")
        text = f"epoch {done}/{total or '?'}"
        if "train_loss" in result:
            text += f"  train_loss {result['train_loss']:.3f}"
        text += f"  val_acc {result['val_acc']:.4f}"
        if seconds:
            text += f"  {seconds:.1f} s/epoch"
            if total and total > done:
                text += f"  about {format_seconds(seconds * (total - done))} left"
        if "test_acc" in result:
            text += f"  test_acc {result['test_acc']:.4f}"
        self._print(trial, text)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._print(trial, "ended")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        lines = [line for line in str(trial.get_error()).splitlines() if line.strip()]
        self._print(trial, f"failed: {lines[-1][:200] if lines else 'unknown error'}")


def format_seconds(seconds: float) -> str:
    """``42 s``, ``3 min``, ``1 h 5 min``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


VERBOSE = "UNITLAB_VERBOSE"  # set by ``python -m orchestrator --verbose``; trials get it in their context


def verbose() -> bool:
    """Whether to show everything Ray, Tune and MLflow print (``--verbose``)."""
    return os.environ.get(VERBOSE, "") not in ("", "0")


def tune_verbosity() -> int:
    """Tune's own console output: its status tables and results under ``--verbose`` (``VERBOSE``
    set), else silent (the sweep prints ``ProgressLines``). Silent selects Tune's classic reporter
    (``RAY_AIR_NEW_OUTPUT=0``): the new one prints its experiment header and a TensorBoard hint at
    every verbosity."""
    if verbose():
        return 2
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    return 0
