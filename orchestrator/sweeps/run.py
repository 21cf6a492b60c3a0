"""The sweep driver: connect to Ray, open the parent run, run (or restore) the Tuner, close the sweep."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import optuna.distributions as od
from mlflow import MlflowClient
from mlflow.entities import Param, Run
from optuna.samplers import TPESampler
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from orchestrator.sweeps.callbacks import ChildRunCloser, ProgressLines, trial_dirname, tune_verbosity
from orchestrator.sweeps.cluster import start_driver
from orchestrator.sweeps.prune_stage import PruneContext, run_prune_stage
from orchestrator.sweeps.spec import (
    SCHEDULER_METRIC,
    SweepError,
    SweepSpec,
    load_spec,
    parse_spec,
)
from orchestrator.sweeps.storage import check_remote_storage
from orchestrator.sweeps.study import StudyRecorder, optuna_distribution
from orchestrator.sweeps.trainable import TrialContext, train_trial
from orchestrator.workbench.runs import format_runs
from orchestrator.workbench.spool import call_when_up
from orchestrator.workbench.study_store import public_url, study_storage
from orchestrator.workbench.summary import summarize_sweep
from orchestrator.workbench.tracking import (
    CELL,
    ENDED,
    ERROR,
    METRICS,
    ROLE,
    ROLE_SWEEP,
    STOPPED,
    STORAGE,
    STUDY,
    SWEEP,
    TRIALS_FAILED,
    child_runs,
    connect,
    end_run,
    experiment_id,
    find_child,
    find_parent,
    open_client,
    prune_runs,
    resolve_tracking_uri,
    store_exists,
)


def open_parent(client: MlflowClient, exp_id: str, spec: SweepSpec, study_url: str) -> str:
    """Create the sweep's parent run with its tags (``study_url``: where its Optuna study lives),
    settings and the spec text; returns its id."""
    run = client.create_run(
        exp_id,
        run_name=spec.name,
        tags={
            ROLE: ROLE_SWEEP,
            SWEEP: spec.name,
            STORAGE: spec.storage_path,
            METRICS: ",".join(f"{k}:{v}" for k, v in spec.metrics.items()),
            STUDY: study_url,
        },
    )
    params = {
        "search.mode": spec.mode,
        "search.num_samples": spec.num_samples,
        "search.metrics": spec.metrics,
        "scheduler": spec.scheduler,
        "resources.cpus": spec.cpus,
        "resources.gpus": spec.gpus,
        "max_concurrent": spec.max_concurrent,
        "max_failures": spec.max_failures,
        "analyze": spec.analyze is not None,
        "prune": ",".join(spec.prune.cells) if spec.prune else "",
        "trials": spec.num_trials(),
        "axes": ",".join(a.name for a in spec.axes),
    }
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "spec.yaml").write_text(spec.source)
        client.log_artifact(run.info.run_id, str(Path(tmp) / "spec.yaml"), "sweep")
    return run.info.run_id


def make_trainable(context: TrialContext):
    """The trial function with the sweep's context bound and its resources per trial."""
    spec = context.spec
    return tune.with_resources(tune.with_parameters(train_trial, context=context), {"cpu": spec.cpus, "gpu": spec.gpus})


def search_setup(spec: SweepSpec) -> tuple[dict, OptunaSearch | None]:
    """(param_space, search algorithm): the full grid, or Optuna TPE over the axes and distributions."""
    if spec.mode == "grid":
        return {a.name: tune.grid_search(a.choices()) for a in spec.axes}, None
    space = {a.name: od.CategoricalDistribution(a.choices()) for a in spec.axes}
    space.update({d.name: optuna_distribution(d) for d in spec.distributions})
    metrics, modes = list(spec.metrics), list(spec.metrics.values())
    single = len(metrics) == 1
    searcher = OptunaSearch(
        space,
        metric=metrics[0] if single else metrics,
        mode=modes[0] if single else modes,
        sampler=TPESampler(seed=spec.search_seed),
    )
    return {}, searcher


def build_tuner(context: TrialContext) -> tune.Tuner:
    """A Tuner for a new sweep: search, optional ASHA on val_acc, retries, checkpoints, run closer."""
    spec = context.spec
    param_space, searcher = search_setup(spec)
    scheduler = None
    if spec.scheduler == "asha":
        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            metric=SCHEDULER_METRIC,
            mode="max",
            max_t=spec.max_epochs(),
            grace_period=spec.grace_period,
            reduction_factor=spec.reduction_factor,
        )
    return tune.Tuner(
        make_trainable(context),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=spec.num_samples,
            max_concurrent_trials=spec.max_concurrent,
            reuse_actors=True,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=spec.name,
            storage_path=spec.storage_path,
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=spec.keep_checkpoints),
            callbacks=[
                ChildRunCloser(
                    context.tracking_uri,
                    lambda client, trial: find_child(
                        client, context.experiment_id, context.parent_run_id, trial.trial_id
                    ),
                ),
                ProgressLines(lambda trial: spec.run_name(trial.config)),
                StudyRecorder(
                    spec,
                    study_storage(context.tracking_uri),
                    context.parent_run_id,
                    lambda trial: _run_id(context, trial),
                ),
            ],
            verbose=tune_verbosity(),
        ),
    )


def _run_id(context: TrialContext, trial) -> str | None:
    """A Tune trial's MLflow run id, or None when it never opened one."""
    run = find_child(connect(context.tracking_uri), context.experiment_id, context.parent_run_id, trial.trial_id)
    return run.info.run_id if run else None


def free_name(spec: SweepSpec, client: MlflowClient | None, new: bool) -> str:
    """The sweep's name, or with ``new`` the first ``NAME-2``, ``NAME-3``... that neither Tune's storage
    nor the tracking store holds; without ``new`` a name in use is refused (one line)."""
    for n in range(1, 1000):
        name = spec.name if n == 1 else f"{spec.name}-{n}"
        path = f"{spec.storage_path.rstrip('/')}/{name}"
        earlier = find_parent(client, name) if client is not None else None
        in_use = tune.Tuner.can_restore(path) or (
            earlier is not None and (new or earlier.data.tags.get(STORAGE, spec.storage_path) != spec.storage_path)
        )
        if not in_use:
            return name
        if not new:
            where = path if tune.Tuner.can_restore(path) else earlier.data.tags[STORAGE]
            raise SweepError(
                f"sweep.name: {name!r} already has a sweep stored at {where}; continue it with "
                f"`python -m orchestrator resume {name}`, or pass --new to start it under a new name"
            )
    raise SweepError(f"sweep.name: no free name {spec.name}-N for N < 1000")


def run_sweep(
    spec_file: str | Path, address: str | None, tracking_uri: str | None, storage_path: str | None, new: bool = False
) -> int:
    """Validate, start and run a sweep; returns the exit code."""
    spec = load_spec(spec_file, storage_path)
    uri = resolve_tracking_uri(tracking_uri)
    client = (
        open_client(uri, create=False)[0] if store_exists(uri) else None
    )  # a new SQLite file only after every check
    check_remote_storage(spec.storage_path)
    name = free_name(spec, client, new)
    if name != spec.name:
        print(f"sweep {spec.name}: that name is in use; this sweep is {name}")
        spec = dataclasses.replace(spec, name=name)
    start_driver(spec, address)
    client, uri = open_client(uri, create=True)
    exp_id = experiment_id(client, spec.name, uri)
    context = TrialContext(spec, uri, exp_id, open_parent(client, exp_id, spec, public_url(study_storage(uri))))
    with closing_on_exit(client, context):
        build_tuner(context).fit()
        return call_when_up(lambda: after_training(client, context), uri)


def resume_sweep(name: str, address: str | None, tracking_uri: str | None, storage_path: str | None) -> int:
    """Restore an interrupted sweep: unfinished and errored trials go on, finished ones are kept."""
    client, uri = open_client(tracking_uri, create=False)
    parent = find_parent(client, name)
    if parent is None:
        raise SweepError(f"resume {name}: no sweep of that name in {uri}")
    spec = logged_spec(client, parent, storage_path)
    done = completed(client, parent, spec)
    if done:
        print(f"sweep {name} is complete ({done}); nothing to resume")
        return 0
    check_remote_storage(spec.storage_path)
    if not tune.Tuner.can_restore(spec.experiment_path):
        raise SweepError(f"resume {name}: no Tune experiment at {spec.experiment_path} (pass --storage-path)")
    start_driver(spec, address)
    client.update_run(parent.info.run_id, status="RUNNING")
    context = TrialContext(spec, uri, parent.info.experiment_id, parent.info.run_id)
    with closing_on_exit(client, context):
        tuner = tune.Tuner.restore(
            spec.experiment_path, make_trainable(context), resume_unfinished=True, resume_errored=True
        )
        tuner.fit()
        return call_when_up(lambda: after_training(client, context), uri)


def completed(client: MlflowClient, parent: Run, spec: SweepSpec) -> str | None:
    """What a finished sweep ran ("4 of 4 trials finished"), or None while it has work left: its parent
    run must be FINISHED with its summary logged, and every training (and pruned) trial FINISHED or
    stopped early by the scheduler."""
    if parent.info.status != "FINISHED" or "n_trials" not in parent.data.metrics:
        return None
    runs = child_runs(client, parent.info.experiment_id, parent.info.run_id)
    expected = spec.num_trials()
    if spec.prune is not None:
        finished = {r.info.run_id for r in runs if r.info.status == "FINISHED"}
        runs += [
            r
            for r in prune_runs(client, parent.info.experiment_id, spec.name, finished)
            if r.data.tags.get(CELL) in spec.prune.cells
        ]  # not those of a later `orchestrator prune`
        expected += len(finished) * len(spec.prune.cells)
    done = [
        r
        for r in runs
        if r.info.status == "FINISHED" or (r.info.status == "KILLED" and r.data.tags.get(STOPPED) == "scheduler")
    ]
    if len(runs) < expected or len(done) < len(runs):
        return None
    return f"{len(runs)} of {expected} trials ended"


def _sigterm_as_sigint(signum, frame) -> None:
    """SIGTERM (``kill``, a scheduler, ``ray job stop``) takes Ctrl+C's path: Tune stops and saves."""
    os.kill(os.getpid(), signal.SIGINT)


@contextlib.contextmanager
def closing_on_exit(client: MlflowClient, context: TrialContext) -> Iterator[None]:
    """While a sweep runs: SIGTERM stops it like Ctrl+C; an exception or interrupt marks the parent run
    and its open trial runs (FAILED for an error, KILLED for an interrupt) with the reason, then
    propagates. ``close_sweep`` does the same for a Tune run that returned with trials left."""
    previous = signal.signal(signal.SIGTERM, _sigterm_as_sigint)
    try:
        yield
    except BaseException as exc:
        interrupted = isinstance(exc, KeyboardInterrupt)
        reason = "interrupted" if interrupted else f"driver error: {type(exc).__name__}: {exc}"
        mark_open_runs(client, context, "KILLED" if interrupted else "FAILED", reason)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def mark_open_runs(client: MlflowClient, context: TrialContext, status: str, reason: str) -> None:
    """End the parent run and every trial or pruned run still RUNNING with ``status``, tagging why;
    ``resume`` reopens them. Best effort: an unreachable store is reported, not raised."""
    try:
        spec, parent_id = context.spec, context.parent_run_id
        runs = child_runs(client, context.experiment_id, parent_id) + prune_runs(
            client, context.experiment_id, spec.name
        )
        tag = ERROR if status == "FAILED" else STOPPED
        for run in runs:
            if run.info.status == "RUNNING":
                end_run(client, run.info.run_id, status, {tag: reason})
        end_run(client, parent_id, status, {tag: reason})
    except Exception as exc:  # noqa: BLE001 - the driver's own exit reason matters more
        print(
            f"unitlab: could not mark the sweep's open runs {status} ({type(exc).__name__}); "
            f"`python -m orchestrator resume {context.spec.name}` will",
            file=sys.stderr,
        )


def logged_spec(client: MlflowClient, parent: Run, storage_path: str | None) -> SweepSpec:
    """The sweep spec logged on a sweep's parent run (its storage path unless ``storage_path``)."""
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(client.download_artifacts(parent.info.run_id, "sweep/spec.yaml", tmp)).read_text()
    spec = parse_spec(text, storage_path or parent.data.tags[STORAGE], origin=f"of sweep {parent.info.run_name}")
    return dataclasses.replace(spec, name=parent.data.tags[SWEEP])  # a sweep started with --new keeps its new name


def after_training(client: MlflowClient, context: TrialContext) -> int:
    """Run the prune stage once every training trial has ended, then close the sweep."""
    spec = context.spec
    ended = [r for r in child_runs(client, context.experiment_id, context.parent_run_id) if r.info.status in ENDED]
    if spec.prune is not None and len(ended) == spec.num_trials():
        run_prune_stage(
            PruneContext(spec, context.tracking_uri, context.experiment_id),
            [r for r in ended if r.info.status == "FINISHED"],
        )
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
        summarize_sweep(client, client.get_run(parent_id))
        client.set_terminated(parent_id, "FAILED" if failed else "FINISHED")
    print(format_runs(client, spec.name, context.tracking_uri))
    if ended < expected:
        mark_open_runs(client, context, "KILLED", f"sweep stopped with {ended} of {expected} trials ended")
        print(
            f"sweep {spec.name}: {ended} of {expected} trials ended; "
            f"continue with `python -m orchestrator resume {spec.name}`"
        )
        return 130
    return 1 if failed else 0
