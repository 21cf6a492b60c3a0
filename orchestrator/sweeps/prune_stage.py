"""The prune stage of a sweep: one Tune trial per (finished training trial, prune cell).

A pruned trial downloads its parent trial's model and job config from MLflow, takes the unit label
sets the parent's analysis logged (or recomputes them at another threshold), prunes, fine-tunes with
the mask enforced (``analysis.pruning.job.run_prune_job``) and logs everything into its own MLflow run,
nested under the parent trial's run:

- tags: ``unitlab.role=prune``, ``unitlab.lineage.parent_run`` (the parent trial's run id),
  ``unitlab.prune.cell`` (``afcc,threshold=0.3``), ``unitlab.prune.method``, and the parent's
  ``unitlab.variant`` / ``unitlab.seed`` / ``unitlab.dataset``;
- params ``prune.*``; metrics per fine-tuning epoch (step = epoch), then ``acc_before_val``,
  ``acc_pruned_val``, ``val_acc`` (after fine-tuning) and their ``test`` twins, ``dilution``,
  ``dilution/<parameter>``, ``units_emptied/<tap>``, ``params_kept``, ``params_total``;
- artifacts: ``model/`` (spec, parametrized state_dict, ``masks.pt``), ``probs/``, ``config.json``,
  ``summary.json``, ``analysis/label_sets.json``.

A (parent, cell) pair has one run: a rerun finds it, reports a finished one without work, and
continues an unfinished one in place.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
from mlflow import MlflowClient
from mlflow.entities import Run
from ray import tune

from analysis.pruning.job import (
    PruneConfig,
    prune_layers,
    run_prune_job,
    unit_label_sets,
)
from analysis.pruning.masks import needed_taps
from analysis.units.results import load_label_sets
from orchestrator.sweeps.callbacks import ChildRunCloser, ProgressLines, trial_dirname, tune_verbosity, verbose
from orchestrator.sweeps.spec import SweepSpec
from orchestrator.sweeps.trainable import take_trial_share
from orchestrator.workbench.analysis_log import analysed_at, fetch_run_dir
from orchestrator.workbench.logged_model import log_trial_model
from orchestrator.workbench.tracking import (
    CELL,
    DATASET,
    JOB_ARTIFACTS,
    LINEAGE,
    MODEL_FOLDER,
    NODE_ID,
    NUM_CLASSES,
    PRUNE_LABEL_SETS,
    PRUNE_METHOD,
    ROLE_PRUNE,
    SEED,
    SWEEP,
    VARIANT,
    ChildRun,
    connect,
    environment_tags,
    find_child,
    flatten,
)
from trainables.models import build_model
from trainables.run_folder import LABEL_SETS, MASKS, SPEC, RunFolder

# Files of a finished prune job and where they go in its run.
PRUNE_ARTIFACTS = {**JOB_ARTIFACTS, MASKS: MODEL_FOLDER, LABEL_SETS: "analysis"}
COPIED_TAGS = (VARIANT, SEED, DATASET, NUM_CLASSES)


@dataclass(frozen=True)
class PruneContext:
    """What every pruned trial shares."""

    spec: SweepSpec
    tracking_uri: str
    experiment_id: str
    verbose: bool = field(default_factory=verbose)  # the driver's --verbose: a cluster's trials lack its env


def prune_metrics(summary: dict) -> dict[str, float]:
    """The final metrics of a prune job summary. ``val_acc`` / ``val_loss`` are the last fine-tuning
    epoch's (logged per epoch); they appear here only when there was no fine-tuning."""
    out = {
        f"acc_{stage}_{split}": summary[f"acc_{stage}"][split]
        for stage in ("before", "pruned", "finetuned")
        for split in ("val", "test")
    }
    keys = ("test_acc", "test_loss", "params_kept", "params_total") + (
        () if summary["history"] else ("val_acc", "val_loss")
    )
    out.update({k: summary[k] for k in keys})
    out["dilution"] = summary["dilution_pruned_layers"]
    out.update({f"dilution/{param}": layer["dilution"] for param, layer in summary["layers"].items()})
    out.update({f"units_emptied/{tap}": n for tap, n in summary.get("units_emptied", {}).items()})
    out.update({f"seconds_{k}": v for k, v in summary["seconds"].items()})
    return {k: float(v) for k, v in out.items()}


def parent_label_sets(client: MlflowClient, parent: Run, config: PruneConfig, spec: dict, folder: Path) -> dict | None:
    """The label sets the parent's analysis logged, if they hold this cell's threshold and taps."""
    if not config.needs_label_sets or not analysed_at(parent, config.threshold):
        return None
    files = {f.path for f in client.list_artifacts(parent.info.run_id, "analysis")}
    if "analysis/label_sets.json" not in files:
        return None
    sets = load_label_sets(client.download_artifacts(parent.info.run_id, "analysis/label_sets.json", str(folder)))
    taps = needed_taps(prune_layers(build_model(spec), config))
    return sets if all(t in unit_label_sets(sets) for t in taps) else None


def cell_label_short(cell: str) -> str:
    """A prune cell's label for run names: ``andc,threshold=0.3`` -> ``andc@0.3``, ``none`` -> ``none``,
    ``andc,threshold=0.3,epochs=5`` -> ``andc@0.3/5``."""
    method, *settings = cell.split(",")
    return method + ("@" + "/".join(s.split("=", 1)[1] for s in settings) if settings else "")


class PruneRun(ChildRun):
    """A pruned trial's MLflow run, nested under its parent trial's run."""

    @classmethod
    def open_for(cls, client: MlflowClient, context: PruneContext, parent: Run, cell: str) -> PruneRun:
        config = context.spec.prune.cells[cell]
        tags = {
            SWEEP: context.spec.name,
            LINEAGE: parent.info.run_id,
            CELL: cell,
            PRUNE_METHOD: config.method,
            **{k: parent.data.tags[k] for k in COPIED_TAGS if k in parent.data.tags},
        }
        params = flatten(config.to_dict(), "prune.")
        attempt = {NODE_ID: ray.get_runtime_context().get_node_id()}
        name = f"{parent.info.run_name}·{cell_label_short(cell)}"
        return cls.open(
            client,
            context.experiment_id,
            parent.info.run_id,
            tags,
            params,
            None,
            attempt,
            role=ROLE_PRUNE,
            key=CELL,
            run_name=name,
        )

    def finish(self, summary: dict, job_dir: Path) -> None:
        """Final metrics and the prune job's artifacts, then FINISHED."""
        self.close_finished(
            prune_metrics(summary),
            [(job_dir / name, folder) for name, folder in PRUNE_ARTIFACTS.items()],
            environment_tags(summary),
        )


def prune_trial(config: dict, context: PruneContext) -> None:
    """Prune one finished trial with one cell, fine-tune, log; report each fine-tuning epoch to Tune."""
    take_trial_share(context.spec, context.verbose)
    client = connect(context.tracking_uri)
    parent = client.get_run(config["parent_run"])
    cell = context.spec.prune.cells[config["cell"]]
    run = PruneRun.open_for(client, context, parent, config["cell"])
    if run.finished:  # finished by an earlier attempt or an interrupted sweep: report, do not rerun
        tune.report(run.latest)
        return

    def on_epoch(metrics: dict) -> None:
        run.log_epoch(metrics)
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        tune.report({**numbers, "epochs": cell.finetune_epochs})

    with tempfile.TemporaryDirectory(prefix="unitlab-prune-") as tmp:
        parent_dir = Path(tmp) / "parent"
        parent_dir.mkdir()
        try:
            fetch_run_dir(client, parent, parent_dir)
            spec = RunFolder(parent_dir).read_json(SPEC)
            label_sets = parent_label_sets(client, parent, cell, spec, Path(tmp))
            summary = run_prune_job(parent_dir, Path(tmp) / "job", cell, label_sets=label_sets, on_epoch=on_epoch)
            if label_sets is not None:
                run.submit("label sets tag", lambda: client.set_tag(run.run_id, PRUNE_LABEL_SETS, "parent analysis"))
            job = RunFolder(Path(tmp) / "job")
            run.submit(
                "model",
                lambda: log_trial_model(context.tracking_uri, run.run_id, job.path, job.job_config(), summary["norm"]),
            )
            run.finish(summary, job.path)
        except Exception as exc:
            run.fail(exc)
            raise
    tune.report({**prune_metrics(summary), "val_acc": summary["val_acc"]})


def run_prune_stage(context: PruneContext, parents: list[Run]) -> None:
    """One Tune run over parents x cells; finished (parent, cell) runs report without work."""
    spec = context.spec
    if not parents:
        print(f"sweep {spec.name}: no finished trials to prune")
        return
    trainable = tune.with_resources(
        tune.with_parameters(prune_trial, context=context), {"cpu": spec.cpus, "gpu": spec.gpus}
    )

    def locate(client: MlflowClient, trial) -> Run | None:
        return find_child(client, context.experiment_id, trial.config["parent_run"], trial.config["cell"], CELL)

    tuner = tune.Tuner(
        trainable,
        param_space={
            "parent_run": tune.grid_search([p.info.run_id for p in parents]),
            "cell": tune.grid_search(list(spec.prune.cells)),
        },
        tune_config=tune.TuneConfig(
            max_concurrent_trials=spec.max_concurrent, reuse_actors=True, trial_dirname_creator=trial_dirname
        ),
        run_config=tune.RunConfig(
            name=f"prune-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=f"{spec.experiment_path}.stages",
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            callbacks=[
                ChildRunCloser(context.tracking_uri, locate),
                ProgressLines(lambda t: f"{cell_label_short(t.config['cell'])} of {t.config['parent_run'][:8]}"),
            ],
            verbose=tune_verbosity(),
        ),
    )
    tuner.fit()
