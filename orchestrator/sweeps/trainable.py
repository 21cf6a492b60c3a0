"""The Ray Tune function trainable: one trial runs ``trainables.train.run_job`` for one cell.

Every epoch's checkpoint folder (with the MLflow run id written into it) is reported to Tune, so a
retried or resumed trial continues from its last epoch in the same MLflow child run.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import ray
import torch
from ray import tune

from analysis.units.run import analyze_run_dir
from orchestrator.sweeps.callbacks import verbose
from orchestrator.sweeps.spec import SweepSpec
from orchestrator.workbench.analysis_log import log_analysis
from orchestrator.workbench.figures import plot_curves
from orchestrator.workbench.logged_model import log_dataset, log_trial_model
from orchestrator.workbench.tracking import (
    DATASET,
    FINAL_METRICS,
    NODE_ID,
    NUM_CLASSES,
    SEED,
    START_EPOCH,
    SWEEP,
    TRIAL_ID,
    VARIANT,
    ChildRun,
    connect,
    flatten,
)
from trainables.train import run_job

RUN_ID_FILE = "mlflow_run_id.txt"


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a sweep shares: the spec and where its MLflow records go."""

    spec: SweepSpec
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    verbose: bool = field(default_factory=verbose)  # the driver's --verbose: a cluster's trials lack its env


class EpochReporter:
    """``on_epoch`` callback: run id into the checkpoint, metrics to MLflow, metrics and checkpoint to Tune.

    The last epoch is reported after the final evaluation, so Tune's last result (what Optuna and
    ``runs`` read) also holds the test metrics and the latency.
    """

    def __init__(self, child: ChildRun, epochs: int):
        self.child = child
        self.epochs = epochs
        self.last: tuple[dict, Path] | None = None

    def __call__(self, metrics: dict, ckpt_dir: Path) -> None:
        (ckpt_dir / RUN_ID_FILE).write_text(self.child.run_id)
        self.child.log_epoch(metrics)
        if metrics["epoch"] + 1 < self.epochs:
            tune.report({**metrics, "epochs": self.epochs}, checkpoint=tune.Checkpoint.from_directory(ckpt_dir))
        else:
            self.last = (metrics, ckpt_dir)

    def report_last(self, summary: dict) -> None:
        metrics, ckpt_dir = self.last
        final = {k: summary[k] for k in FINAL_METRICS}
        tune.report({**metrics, **final, "epochs": self.epochs}, checkpoint=tune.Checkpoint.from_directory(ckpt_dir))


def restore(checkpoint: tune.Checkpoint | None, folder: Path) -> tuple[Path | None, str | None, list[dict]]:
    """(local checkpoint folder, MLflow run id, the epochs trained so far) of a restored trial."""
    if checkpoint is None:
        return None, None, []
    checkpoint.to_directory(str(folder))
    history = json.loads((folder / "meta.json").read_text())["history"]
    return folder, (folder / RUN_ID_FILE).read_text().strip(), history


# INFO loggers that speak once per epoch or per logged model inside a trial process
QUIET_LOGGERS = ("ray.train._internal.storage", "ray.train.v2._internal.execution.storage", "mlflow.pyfunc")


def take_trial_share(spec: SweepSpec, loud: bool) -> None:
    """Inside a trial process: torch threads = its CPU share; with a fraction of a GPU
    (``resources.gpus`` < 1, trials packed on one GPU) this process's CUDA memory is capped at that
    fraction, so one trial's allocator cannot starve the others (each trial is its own process with
    its own CUDA context and default stream). Ray's "Checkpoint successfully created" line, one per
    epoch, and MLflow's "Validating input example" line, one per logged model, are muted unless
    ``--verbose`` (``loud``): the sweep's console prints one line per epoch already."""
    if not loud:
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(spec.threads)
    if 0 < spec.gpus < 1 and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(spec.gpus)


def train_trial(config: dict, context: TrialContext) -> None:
    """Train the trial's cell; log its child run; report and checkpoint every epoch."""
    spec = context.spec
    take_trial_share(spec, context.verbose)
    cfg = spec.job(config)
    trial_id = tune.get_context().get_trial_id()
    tags = {
        SWEEP: spec.name,
        TRIAL_ID: trial_id,
        DATASET: cfg.data.name,
        NUM_CLASSES: str(cfg.model["num_classes"]),
        VARIANT: spec.variant(config),
        SEED: str(spec.seed(config)),
    }
    client = connect(context.tracking_uri)
    for stale in Path(tempfile.gettempdir()).glob(f"unitlab-{trial_id}-*"):  # left by a killed attempt
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=f"unitlab-{trial_id}-") as tmp:
        resume_from, run_id, trained = restore(tune.get_checkpoint(), Path(tmp) / "restored")
        attempt = {START_EPOCH: str(len(trained)), NODE_ID: ray.get_runtime_context().get_node_id()}
        child = ChildRun.open(
            client,
            context.experiment_id,
            context.parent_run_id,
            tags,
            flatten(cfg.to_dict()),
            run_id,
            attempt,
            run_name=spec.run_name(config),
        )
        if child.finished:  # finished before an interrupted driver could record it: report, do not rerun
            tune.report(child.latest)
            return
        for metrics in trained:  # epochs whose queued writes died with an earlier attempt
            child.log_epoch(metrics)
        reporter = EpochReporter(child, cfg.epochs)
        job_dir = Path(tmp) / "job"
        try:
            summary = run_job(cfg, job_dir, on_epoch=reporter, resume_from=resume_from)
            plot_curves(summary["history"], job_dir / "curves.png", title=f"{spec.name}: {tags[VARIANT]}")
            if spec.analyze is not None:  # before FINISHED, so a finished run always holds its analysis
                analyze_run_dir(job_dir, job_dir / "analysis", spec.analyze)
                child.submit("analysis", lambda: log_analysis(child.run_id, job_dir / "analysis", client))
            child.submit(
                "model", lambda: log_trial_model(context.tracking_uri, child.run_id, job_dir, cfg, summary["norm"])
            )
            child.submit("dataset", lambda: log_dataset(client, child.run_id, cfg))
            child.finish(summary, job_dir)
        except Exception as exc:
            child.fail(exc)
            raise
        reporter.report_last(summary)
