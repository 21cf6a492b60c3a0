"""The Ray side of a sweep's driver: connect, check the cluster's resources, warm each node's data cache."""
from __future__ import annotations

import os

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from orchestrator.sweep_spec import EPOCH_METRICS, SweepError, SweepSpec
from trainables.data import DataConfig, DataError, load_splits


LOCAL_IP = "127.0.0.1"


def connect_ray(address: str | None) -> None:
    """Join ``address`` (or RAY_ADDRESS) when given; else start Ray here with every CPU and GPU.

    A Ray started here requires its token on every RPC and HTTP entry point (Ray 2.60's default for a
    new local cluster unless ``RAY_AUTH_MODE`` says otherwise; the token is kept in ~/.ray) and
    serves its dashboard and job API on 127.0.0.1 only. Ray 2.60's core servers (GCS, raylet, workers) listen on every
    interface and have no setting to restrict them: the token is what keeps other hosts out."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=os.cpu_count(), num_gpus=torch.cuda.device_count(), dashboard_host=LOCAL_IP)


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
def _decode(data_cfg: DataConfig) -> None:
    load_splits(data_cfg)


def warm_data_cache(spec: SweepSpec) -> None:
    """Decode each real dataset once on every node that runs trials, before the trials start."""
    datas = {repr(job.data): job.data for job in spec.jobs.values() if job.data.name != "synthetic"}
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
    tasks = [_decode.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(data)
             for node in nodes for data in datas.values()]
    try:
        ray.get(tasks)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, DataError):  # an unreadable file: one line, before anything is written
            raise SweepError(f"sweep.data: {exc.cause}") from None
        raise
