"""The Ray side of a sweep's driver: connect, check the cluster's resources, warm each node's data cache."""

from __future__ import annotations

import json
import os
import socket

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from orchestrator.schema import SweepError
from orchestrator.sweeps.spec import SweepSpec
from orchestrator.workbench.tracking import EPOCH_METRICS
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
        check_reachable(address)
        ray.init(address=address)
    else:
        ray.init(num_cpus=os.cpu_count(), num_gpus=torch.cuda.device_count(), dashboard_host=LOCAL_IP)


def check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """A HOST:PORT cluster address must accept a connection: Ray itself would retry for minutes.
    ("auto" and ray:// client addresses are left to Ray.)"""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise SweepError(
            f"--address {address}: no Ray cluster answers there ({exc.strerror or exc}); "
            f"start one with `ray start --head` or check RAY_ADDRESS"
        ) from None


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
    """Fail before anything is written when the cluster could never run a single trial.

    A cluster that autoscales (``ray up``: worker types from zero) may have nothing yet; then the
    trial must fit under the autoscaler's ceiling where Ray reports one (autoscaler v2), and is
    otherwise left to the autoscaler with one line saying so."""
    total = ray.cluster_resources()
    needs = {"CPU": spec.cpus, "GPU": spec.gpus}
    short = {key: need for key, need in needs.items() if need > total.get(key, 0)}
    if not short:
        return
    ceiling, autoscaling = autoscaler_limits()
    if not autoscaling:
        key, need = next(iter(short.items()))
        raise SweepError(
            f"sweep.resources.{key.lower()}s: a trial needs {need:g} {key}, the Ray cluster has {total.get(key, 0):g}"
        )
    for key, need in short.items():
        if ceiling is not None and need > ceiling.get(key, 0):
            raise SweepError(
                f"sweep.resources.{key.lower()}s: a trial needs {need:g} {key}, the Ray cluster "
                f"can autoscale to {ceiling.get(key, 0):g}"
            )
    have = ", ".join(f"{total.get(key, 0):g} {key}" for key in short)
    print(f"the cluster has {have} now; its autoscaler adds worker nodes as trials ask for them", flush=True)


def autoscaler_limits() -> tuple[dict[str, float] | None, bool]:
    """(the most of each resource the cluster can scale to, or None where Ray does not say; whether an
    autoscaler with its own node types runs). Autoscaler v2 publishes the ceiling; v1 only its
    status, whose node types are the cluster file's names (a fixed cluster mirrors each node as
    ``node_<id>``)."""
    from ray._private import ray_constants
    from ray._private.state import state
    from ray.experimental.internal_kv import _internal_kv_get

    ceiling = state.get_max_resources_from_cluster_config()
    if ceiling:
        return {k: float(v) for k, v in ceiling.items()}, True
    raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    try:
        active = json.loads(raw)["autoscaler_report"]["active_nodes"] if raw else {}
    except (ValueError, KeyError, TypeError):
        active = {}
    return None, any(not name.startswith("node_") for name in active or {})


@ray.remote(num_cpus=0)
def _decode(data_cfg: DataConfig) -> None:
    load_splits(data_cfg)


def warm_data_cache(spec: SweepSpec) -> None:
    """Decode each real dataset once on every node that runs trials, before the trials start."""
    datas = {repr(job.data): job.data for job in spec.jobs.values() if job.data.name != "synthetic"}
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
    tasks = [
        _decode.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(data)
        for node in nodes
        for data in datas.values()
    ]
    try:
        ray.get(tasks)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, DataError):  # an unreadable file: one line, before anything is written
            raise SweepError(f"sweep.data: {exc.cause}") from None
        raise
