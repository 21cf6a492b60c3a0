"""The sweep driver: connect to Ray, open the parent run, run (or restore) the Tuner, close the sweep."""
from __future__ import annotations

import tempfile
from pathlib import Path

import optuna.distributions as od
from mlflow import MlflowClient
from mlflow.entities import Run
from optuna.samplers import TPESampler
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from orchestrator.callbacks import ChildRunCloser, trial_dirname
from orchestrator.cluster import start_driver
from orchestrator.prune_stage import PruneContext, run_prune_stage
from orchestrator.runs import format_runs
from orchestrator.sweep_spec import SCHEDULER_METRIC, Distribution, SweepError, SweepSpec, load_spec, parse_spec
from orchestrator.tracking import ENDED, STORAGE, TRIALS_FAILED, resolve_tracking_uri, store_exists, child_runs, prune_runs, experiment_id, find_child, find_parent, \
    open_client, open_parent
from orchestrator.trainable import TrialContext, train_trial


def make_trainable(context: TrialContext):
    """The trial function with the sweep's context bound and its resources per trial."""
    spec = context.spec
    return tune.with_resources(tune.with_parameters(train_trial, context=context), {"cpu": spec.cpus, "gpu": spec.gpus})


def optuna_distribution(dist: Distribution) -> od.BaseDistribution:
    """The Optuna distribution a spec declares."""
    if dist.type == "categorical":
        return od.CategoricalDistribution(list(dist.choices))
    if dist.type == "int":
        return od.IntDistribution(int(dist.low), int(dist.high), log=dist.log, step=int(dist.step or 1))
    return od.FloatDistribution(float(dist.low), float(dist.high), log=dist.log, step=dist.step)


def search_setup(spec: SweepSpec) -> tuple[dict, OptunaSearch | None]:
    """(param_space, search algorithm): the full grid, or Optuna TPE over the axes and distributions."""
    if spec.mode == "grid":
        return {a.name: tune.grid_search(a.choices()) for a in spec.axes}, None
    space = {a.name: od.CategoricalDistribution(a.choices()) for a in spec.axes}
    space.update({d.name: optuna_distribution(d) for d in spec.distributions})
    metrics, modes = list(spec.metrics), list(spec.metrics.values())
    single = len(metrics) == 1
    searcher = OptunaSearch(space, metric=metrics[0] if single else metrics, mode=modes[0] if single else modes,
                            sampler=TPESampler(seed=spec.search_seed))
    return {}, searcher


def build_tuner(context: TrialContext) -> tune.Tuner:
    """A Tuner for a new sweep: search, optional ASHA on val_acc, retries, checkpoints, run closer."""
    spec = context.spec
    param_space, searcher = search_setup(spec)
    scheduler = None
    if spec.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", metric=SCHEDULER_METRIC, mode="max",
                                  max_t=spec.max_epochs(), grace_period=spec.grace_period,
                                  reduction_factor=spec.reduction_factor)
    return tune.Tuner(
        make_trainable(context),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=scheduler, num_samples=spec.num_samples,
            max_concurrent_trials=spec.max_concurrent, reuse_actors=True, trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=spec.name,
            storage_path=spec.storage_path,
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=spec.keep_checkpoints),
            callbacks=[ChildRunCloser(context.tracking_uri, lambda client, trial: find_child(
                client, context.experiment_id, context.parent_run_id, trial.trial_id))],
        ),
    )


def run_sweep(spec_file: str | Path, address: str | None, tracking_uri: str | None,
              storage_path: str | None) -> int:
    """Validate, start and run a sweep; returns the exit code."""
    spec = load_spec(spec_file, storage_path)
    if tune.Tuner.can_restore(spec.experiment_path):
        raise SweepError(f"sweep.name: {spec.name!r} already exists at {spec.experiment_path}; continue it with "
                         f"`python -m orchestrator resume {spec.name}` or choose another name")
    uri = resolve_tracking_uri(tracking_uri)
    if store_exists(uri):  # a new SQLite file is created only once every check has passed
        client, uri = open_client(uri, create=False)
        earlier = find_parent(client, spec.name)
        if earlier is not None and earlier.data.tags.get(STORAGE, spec.storage_path) != spec.storage_path:
            raise SweepError(f"sweep.name: {spec.name!r} already has a sweep in {uri} stored at "
                             f"{earlier.data.tags[STORAGE]}; continue it with `python -m orchestrator resume "
                             f"{spec.name}` or choose another name")
    start_driver(spec, address)
    client, uri = open_client(uri, create=True)
    exp_id = experiment_id(client, spec.name, uri)
    context = TrialContext(spec, uri, exp_id, open_parent(client, exp_id, spec))
    build_tuner(context).fit()
    return after_training(client, context)


def resume_sweep(name: str, address: str | None, tracking_uri: str | None, storage_path: str | None) -> int:
    """Restore an interrupted sweep: unfinished and errored trials go on, finished ones are kept."""
    client, uri = open_client(tracking_uri, create=False)
    parent = find_parent(client, name)
    if parent is None:
        raise SweepError(f"resume {name}: no sweep of that name in {uri}")
    spec = logged_spec(client, parent, storage_path)
    if not tune.Tuner.can_restore(spec.experiment_path):
        raise SweepError(f"resume {name}: no Tune experiment at {spec.experiment_path} (pass --storage-path)")
    start_driver(spec, address)
    client.update_run(parent.info.run_id, status="RUNNING")
    context = TrialContext(spec, uri, parent.info.experiment_id, parent.info.run_id)
    tuner = tune.Tuner.restore(spec.experiment_path, make_trainable(context), resume_unfinished=True,
                               resume_errored=True)
    tuner.fit()
    return after_training(client, context)


def logged_spec(client: MlflowClient, parent: Run, storage_path: str | None) -> SweepSpec:
    """The sweep spec logged on a sweep's parent run (its storage path unless ``storage_path``)."""
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(client.download_artifacts(parent.info.run_id, "sweep/spec.yaml", tmp)).read_text()
    return parse_spec(text, storage_path or parent.data.tags[STORAGE], origin=f"of sweep {parent.info.run_name}")


def after_training(client: MlflowClient, context: TrialContext) -> int:
    """Run the prune stage once every training trial has ended, then close the sweep."""
    spec = context.spec
    ended = [r for r in child_runs(client, context.experiment_id, context.parent_run_id)
             if r.info.status in ENDED]
    if spec.prune is not None and len(ended) == spec.num_trials():
        run_prune_stage(PruneContext(spec, context.tracking_uri, context.experiment_id),
                        [r for r in ended if r.info.status == "FINISHED"])
    return close_sweep(client, context)


def close_sweep(client: MlflowClient, context: TrialContext) -> int:
    """End the parent run unless trials are left (an interrupt), print the trials.

    Counts the training trials and, with a prune stage, one pruned trial per finished training trial
    and cell. Returns 0 when every trial finished, 1 when some failed, 130 when some never ended.
    """
    spec, parent_id = context.spec, context.parent_run_id
    runs = child_runs(client, context.experiment_id, parent_id)
    expected = spec.num_trials()
    if spec.prune is not None:
        parents = {r.info.run_id for r in runs if r.info.status == "FINISHED"}
        runs += prune_runs(client, context.experiment_id, spec.name, parents)
        expected += len(parents) * len(spec.prune.cells)
    statuses = [r.info.status for r in runs]
    ended = sum(s in ENDED for s in statuses)
    failed = statuses.count("FAILED")
    if ended == expected:
        client.set_tag(parent_id, TRIALS_FAILED, str(failed))
        client.set_terminated(parent_id, "FAILED" if failed else "FINISHED")
    print(format_runs(client, spec.name, context.tracking_uri))
    if ended < expected:
        print(f"sweep {spec.name}: {ended} of {expected} trials ended; "
              f"continue with `python -m orchestrator resume {spec.name}`")
        return 130
    return 1 if failed else 0
