"""The sweep driver: connect to Ray, open the parent run, run (or restore) the Tuner, close the sweep."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import ray
import torch
from mlflow import MlflowClient
from optuna.distributions import CategoricalDistribution
from optuna.samplers import TPESampler
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from orchestrator.runs import format_runs
from orchestrator.sweep_spec import EPOCH_METRICS, SCHEDULER_METRIC, SweepError, SweepSpec, load_spec, parse_spec
from orchestrator.tracking import ERROR, STORAGE, end_run, experiment_id, find_child, find_parent, open_client, \
    open_parent
from orchestrator.trainable import TrialContext, train_trial
from trainables.data import load_splits
from trainables.train import prepare


def connect_ray(address: str | None) -> None:
    """Join ``address`` (or RAY_ADDRESS) when given; else start Ray here with every CPU and GPU."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=os.cpu_count(), num_gpus=torch.cuda.device_count())


def start_driver(spec: SweepSpec, address: str | None) -> None:
    """Connect to Ray, check the cluster can run a trial, decode the data on every node."""
    if any(m not in EPOCH_METRICS for m in spec.metrics):
        # Final-only objectives (latency) are in a trial's last result only, which is what Optuna
        # reads for multi-objective searches; epoch results need not carry them.
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    connect_ray(address)
    check_resources(spec)
    warm_data_cache(spec)


def check_resources(spec: SweepSpec) -> None:
    """Fail before anything is written when no node of the cluster could run a single trial."""
    total = ray.cluster_resources()
    for key, need in (("CPU", spec.cpus), ("GPU", spec.gpus)):
        if need > total.get(key, 0):
            raise SweepError(f"sweep.resources.{key.lower()}s: a trial needs {need:g} {key}, "
                             f"the Ray cluster has {total.get(key, 0):g}")


@ray.remote(num_cpus=0)
def _decode(data_cfg: dict) -> None:
    load_splits(data_cfg)


def warm_data_cache(spec: SweepSpec) -> None:
    """Decode each real dataset once on every node that runs trials, before the trials start."""
    datas = {}
    for point in spec.check_points().values():
        data = prepare(spec.job_config(point))[0]["data"]
        if data["name"] != "synthetic":
            datas[repr(sorted(data.items()))] = data
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
    ray.get([_decode.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(data)
             for node in nodes for data in datas.values()])


class ChildRunCloser(tune.Callback):
    """Ends the child runs that their trainable could not end: stopped early by the scheduler (KILLED)
    or lost with their worker after the last retry (FAILED, with the error as a tag)."""

    def __init__(self, tracking_uri: str, exp_id: str, parent_id: str):
        self.tracking_uri, self.exp_id, self.parent_id = tracking_uri, exp_id, parent_id

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._close(trial.trial_id, "KILLED", {"unitlab.stopped": "scheduler"})

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        lines = [line for line in str(trial.get_error()).splitlines() if line.strip()]
        self._close(trial.trial_id, "FAILED", {ERROR: lines[-1] if lines else "unknown error"})

    def _close(self, trial_id: str, status: str, tags: dict[str, str]) -> None:
        client = MlflowClient(self.tracking_uri)
        run = find_child(client, self.exp_id, self.parent_id, trial_id)
        if run is not None and run.info.status == "RUNNING":
            end_run(client, run.info.run_id, status, tags)


def trial_dirname(trial) -> str:
    return trial.trial_id


def make_trainable(context: TrialContext):
    spec = context.spec
    return tune.with_resources(tune.with_parameters(train_trial, context=context), {"cpu": spec.cpus, "gpu": spec.gpus})


def search_setup(spec: SweepSpec) -> tuple[dict, OptunaSearch | None]:
    """(param_space, search algorithm): the full grid, or Optuna TPE over the axes and distributions."""
    if spec.mode == "grid":
        return {a.name: tune.grid_search(a.choices()) for a in spec.axes}, None
    space = {a.name: CategoricalDistribution(a.choices()) for a in spec.axes}
    space.update({d.name: d.to_optuna() for d in spec.distributions})
    metrics, modes = list(spec.metrics), list(spec.metrics.values())
    single = len(metrics) == 1
    searcher = OptunaSearch(space, metric=metrics[0] if single else metrics, mode=modes[0] if single else modes,
                            sampler=TPESampler(seed=spec.search_seed))
    return {}, searcher


def build_tuner(context: TrialContext) -> tune.Tuner:
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
            callbacks=[ChildRunCloser(context.tracking_uri, context.experiment_id, context.parent_run_id)],
        ),
    )


def run_sweep(spec_file: str | Path, address: str | None, tracking_uri: str | None,
              storage_path: str | None) -> int:
    """Validate, start and run a sweep; returns the exit code."""
    spec = load_spec(spec_file, storage_path)
    if tune.Tuner.can_restore(spec.experiment_path):
        raise SweepError(f"sweep.name: {spec.name!r} already exists at {spec.experiment_path}; continue it with "
                         f"`python -m orchestrator resume {spec.name}` or choose another name")
    start_driver(spec, address)
    client, uri = open_client(tracking_uri, create=True)
    exp_id = experiment_id(client, spec.name, uri)
    context = TrialContext(spec, uri, exp_id, open_parent(client, exp_id, spec))
    return close_sweep(client, context, build_tuner(context).fit())


def resume_sweep(name: str, address: str | None, tracking_uri: str | None, storage_path: str | None) -> int:
    """Restore an interrupted sweep: unfinished and errored trials go on, finished ones are kept."""
    client, uri = open_client(tracking_uri, create=False)
    parent = find_parent(client, name)
    if parent is None:
        raise SweepError(f"resume {name}: no sweep of that name in {uri}")
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(client.download_artifacts(parent.info.run_id, "sweep/spec.yaml", tmp)).read_text()
    spec = parse_spec(text, storage_path or parent.data.tags[STORAGE], origin=f"of sweep {name}")
    if not tune.Tuner.can_restore(spec.experiment_path):
        raise SweepError(f"resume {name}: no Tune experiment at {spec.experiment_path} (pass --storage-path)")
    start_driver(spec, address)
    client.update_run(parent.info.run_id, status="RUNNING")
    context = TrialContext(spec, uri, parent.info.experiment_id, parent.info.run_id)
    tuner = tune.Tuner.restore(spec.experiment_path, make_trainable(context), resume_unfinished=True,
                               resume_errored=True)
    return close_sweep(client, context, tuner.fit())


def close_sweep(client: MlflowClient, context: TrialContext, results: tune.ResultGrid) -> int:
    """End the parent run (unless interrupted), print the trials; 0 all finished, 1 errors, 130 interrupted."""
    spec, parent_id = context.spec, context.parent_run_id
    errors, terminated = results.num_errors, results.num_terminated
    interrupted = errors + terminated < spec.num_trials()
    if not interrupted:
        client.set_tag(parent_id, "unitlab.trials_errored", str(errors))
        client.set_terminated(parent_id, "FAILED" if errors else "FINISHED")
    print(format_runs(client, spec.name, context.tracking_uri))
    if interrupted:
        print(f"sweep {spec.name} interrupted: continue with `python -m orchestrator resume {spec.name}`")
        return 130
    return 1 if errors else 0
