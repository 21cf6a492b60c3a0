"""The cluster path a user takes, exercised on this machine.

cluster.yaml's node types run under Ray's fake multi-node autoscaler (a head with ``CPU: 0`` and a GPU
worker type scaling from zero, its resources faked); Tune's storage and MLflow's artifacts live in
an S3 bucket served on loopback by moto; an ``mlflow server`` proxies the artifacts there. The sweep
is submitted with ``ray job submit`` as README says, stopped with ``ray job stop`` mid-way, resumed
from the S3 checkpoints with a second job, and the idle workers are removed afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, stop_process
from mlflow import MlflowClient
from nodes import BIN, agent_ports, free_port, port_open, start_mlflow_server, stop_processes_matching, wait_for

pytestmark = pytest.mark.slow
BUCKET = "unitlab-cluster-test"
FAKE_HEAD_TYPE = "ray.head.default"  # the head type name Ray's fake provider gives its head node
FAKE_WORKER_RESOURCES = {"CPU": 1, "GPU": 1}  # what a cloud worker type's instance would report


def fake_cluster_config(cluster_file: Path, gcs_address: str, idle_timeout_minutes: float) -> dict:
    """The autoscaling config for Ray's fake multi-node provider, built from ``cluster_file``: the same
    node types with their min/max counts, the same cluster limits; worker resources faked (no cloud
    instance to detect them from), the head's kept; cloud details (instances, images, docker,
    setup commands) dropped; the idle timeout shortened so a test sees workers removed."""
    cluster = yaml.safe_load(cluster_file.read_text())
    types = {}
    for name, node_type in cluster["available_node_types"].items():
        if name == cluster["head_node_type"]:
            types[FAKE_HEAD_TYPE] = {"resources": node_type.get("resources", {}), "node_config": {}, "max_workers": 0}
        else:
            types[name] = {
                "resources": {**FAKE_WORKER_RESOURCES, **node_type.get("resources", {})},
                "node_config": {},
                "min_workers": node_type.get("min_workers", 0),
                "max_workers": node_type["max_workers"],
            }
    return {
        "cluster_name": cluster["cluster_name"],
        "max_workers": cluster["max_workers"],
        "upscaling_speed": cluster.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
        },
        "auth": {"ssh_user": "ray"},
        "available_node_types": types,
        "head_node_type": FAKE_HEAD_TYPE,
        **{
            key: []
            for key in (
                "cluster_synced_files",
                "rsync_exclude",
                "rsync_filter",
                "initialization_commands",
                "setup_commands",
                "head_setup_commands",
                "worker_setup_commands",
                "head_start_ray_commands",
                "worker_start_ray_commands",
            )
        },
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
    }


def test_fake_config_keeps_cluster_yaml_node_types() -> None:
    config = fake_cluster_config(REPO / "cluster.yaml", "127.0.0.1:1", 0.1)
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    assert config["available_node_types"][FAKE_HEAD_TYPE]["resources"] == {"CPU": 0}
    workers = {k: v for k, v in config["available_node_types"].items() if k != FAKE_HEAD_TYPE}
    assert set(workers) == set(cluster["available_node_types"]) - {cluster["head_node_type"]}
    assert all(v["min_workers"] == 0 and v["resources"]["GPU"] >= 1 for v in workers.values())
    assert config["max_workers"] == cluster["max_workers"]


@pytest.fixture
def s3():
    """An S3-compatible server on 127.0.0.1 with one bucket; the variables boto3, pyarrow and MLflow read."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": url,
        "MLFLOW_S3_ENDPOINT_URL": url,
    }
    client = boto3.client(
        "s3", endpoint_url=url, aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )
    client.create_bucket(Bucket=BUCKET)
    try:
        yield {"url": url, "env": env, "client": client}
    finally:
        server.stop()


def bucket_keys(s3: dict, prefix: str) -> list[str]:
    pages = s3["client"].get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


@pytest.fixture
def autoscaling_cluster(tmp_path, s3):
    """cluster.yaml's head and worker types under Ray's fake autoscaler, and an MLflow server whose
    artifacts go to the S3 bucket, all on loopback; every process is stopped afterwards."""
    env = {
        **os.environ,
        **s3["env"],
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
        "PYTHONPATH": str(REPO),
        "RAY_FAKE_CLUSTER": "1",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "RAY_JOB_STOP_WAIT_TIME_S": "60",
    }  # `ray job stop` leaves the sweep time to save (cluster.yaml sets it too)
    gcs_port, dash_port, mlflow_port = free_port(), free_port(), free_port()
    ray_tmp = Path("/tmp") / f"ray-as-{os.getpid()}"
    config_file = tmp_path / "fake_cluster.json"
    config = fake_cluster_config(REPO / "cluster.yaml", f"127.0.0.1:{gcs_port}", idle_timeout_minutes=0.1)
    config_file.write_text(json.dumps(config))
    head_cpus = config["available_node_types"][FAKE_HEAD_TYPE]["resources"].get("CPU", 0)
    server = None
    try:
        started = time.time()
        subprocess.run(
            [
                BIN / "ray",
                "start",
                "--head",
                f"--port={gcs_port}",
                "--node-ip-address=127.0.0.1",
                f"--num-cpus={head_cpus}",
                "--num-gpus=0",
                f"--dashboard-port={dash_port}",
                "--dashboard-host=127.0.0.1",
                f"--autoscaling-config={config_file}",
                f"--temp-dir={ray_tmp}",
                "--disable-usage-stats",
                f"--ray-client-server-port={free_port()}",
                *agent_ports(),
            ],
            check=True,
            env=env,
            cwd=tmp_path,
            capture_output=True,
            timeout=180,
        )
        server = start_mlflow_server(tmp_path, mlflow_port, env=env, artifacts=f"s3://{BUCKET}/mlflow")
        wait_for(lambda: port_open(dash_port), 60, "ray dashboard")
        yield {
            "dashboard": f"http://127.0.0.1:{dash_port}",
            "gcs": f"127.0.0.1:{gcs_port}",
            "mlflow": f"http://127.0.0.1:{mlflow_port}",
            "env": env,
            "events": ray_tmp / "session_latest" / "logs",
            "start_s": time.time() - started,
        }
    finally:
        if server is not None:
            stop_process(server, group=True)
        # the head's client server names neither the temp folder nor 127.0.0.1 (it takes the host's IP)
        stop_processes_matching((str(ray_tmp), f"127.0.0.1:{gcs_port}", f":{gcs_port} "))
        shutil.rmtree(ray_tmp, ignore_errors=True)


def autoscaler_events(logs: Path) -> list[tuple[float, str]]:
    """(time, message) of every autoscaler event, e.g. 'Adding 1 node(s) of type gpu_worker.'."""
    path = logs / "events" / "event_AUTOSCALER.log"
    if not path.is_file():
        return []
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(float(e["timestamp"]), e["message"]) for e in events]


def active_workers(cluster: dict) -> int:
    """Worker nodes alive now, by `ray status` (the head excluded)."""
    out = subprocess.run(
        [BIN / "ray", "status", "--address", cluster["gcs"]],
        env=cluster["env"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    active = out.split("Active:")[1].split("Pending:")[0] if "Active:" in out else ""
    return sum(
        int(line.split()[0])
        for line in active.splitlines()
        if line.strip() and line.split()[0].isdigit() and FAKE_HEAD_TYPE not in line
    )


def submit(cluster: dict, submission_id: str, *args: str) -> None:
    """`ray job submit --no-wait` of an orchestrator command, retried while the head's job agent starts."""
    command = [
        BIN / "ray",
        "job",
        "submit",
        "--address",
        cluster["dashboard"],
        "--submission-id",
        submission_id,
        "--no-wait",
        "--",
        sys.executable,
        "-m",
        "orchestrator",
        *args,
        "--tracking-uri",
        cluster["mlflow"],
    ]
    deadline = time.time() + 180
    while True:
        done = subprocess.run(command, env=cluster["env"], cwd=REPO, capture_output=True, text=True, timeout=120)
        if done.returncode == 0 or "No available agent" not in done.stderr + done.stdout or time.time() > deadline:
            break
        time.sleep(2)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def wait_job(cluster: dict, submission_id: str, timeout: float):
    from ray.job_submission import JobStatus, JobSubmissionClient

    jobs = JobSubmissionClient(cluster["dashboard"])
    terminal = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED)
    wait_for(lambda: jobs.get_job_status(submission_id) in terminal, timeout, f"job {submission_id}")
    return jobs.get_job_status(submission_id), jobs.get_job_logs(submission_id)


def trial_runs(client: MlflowClient, name: str) -> list:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return []
    return [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("unitlab.role") == "trial"]


def test_sweep_on_an_autoscaling_cluster_with_s3_storage_stops_and_resumes(autoscaling_cluster, s3, tmp_path):
    cluster, epochs = autoscaling_cluster, 4
    spec = {
        "name": "cloudflow",
        "data": {
            "name": "synthetic",
            "num_classes": 4,
            "image_size": 16,
            "train_size": 3072,
            "val_size": 32,
            "test_size": 32,
        },
        "base": {
            "model": {"preset": "cct_tiny"},
            "epochs": epochs,
            "batch_size": 32,
            "recipe": {"name": "adamw_cosine", "lr": 0.003, "warmup_epochs": 0},
            "latency": {"large_batch": 8, "repeats": 2},
        },
        "axes": {"seed": [0, 1, 2]},
        "resources": {"cpus": 1, "gpus": 1},  # what configs/lsmha_cifar100.yaml asks (4 CPUs, 1 GPU), scaled down
        "max_concurrent": 2,
        "storage_path": f"s3://{BUCKET}/tune",
    }
    spec_file = tmp_path / "cloudflow.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    client = MlflowClient(cluster["mlflow"])
    submitted = time.time()
    submit(cluster, "cloudflow-sweep", "sweep", str(spec_file))

    # Stop the job once one trial has finished and another is training (the third still waits).
    def mid_sweep() -> bool:
        runs = trial_runs(client, "cloudflow")
        done = [r for r in runs if r.info.status == "FINISHED"]
        training = [r for r in runs if r.info.status == "RUNNING" and r.data.metrics.get("val_acc") is not None]
        return bool(done) and bool(training)

    wait_for(mid_sweep, 300, "one finished and one training trial")
    finished_before = {r.info.run_id: r for r in trial_runs(client, "cloudflow") if r.info.status == "FINISHED"}
    stop = subprocess.run(
        [BIN / "ray", "job", "stop", "--address", cluster["dashboard"], "cloudflow-sweep"],
        env=cluster["env"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert stop.returncode == 0, stop.stderr[-2000:]
    status, logs = wait_job(cluster, "cloudflow-sweep", 180)
    assert status.value == "STOPPED", logs[-3000:]
    parent = client.search_runs(
        [client.get_experiment_by_name("cloudflow").experiment_id], "tags.`unitlab.role` = 'sweep'"
    )[0]
    assert parent.info.status == "KILLED" and parent.data.tags.get("unitlab.stopped"), parent.data.tags

    submit(cluster, "cloudflow-resume", "resume", "cloudflow")
    status, logs = wait_job(cluster, "cloudflow-resume", 420)
    assert status.value == "SUCCEEDED", logs[-4000:]
    ended = time.time()

    runs = trial_runs(client, "cloudflow")
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs), [r.info.status for r in runs]
    for run in runs:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")]
        assert sorted(steps) == list(range(epochs)), (run.info.run_name, steps)
        assert len(client.get_metric_history(run.info.run_id, "test_acc")) == 1
    nodes = {r.data.tags["unitlab.node_id"] for r in runs}
    assert len(nodes) >= 2 and not any(n.endswith("00000") for n in nodes), nodes  # workers, never the CPU-0 head
    for run_id, before in finished_before.items():  # a finished trial is not trained again
        after = client.get_run(run_id)
        assert after.info.end_time == before.info.end_time
        assert after.data.tags.get("unitlab.attempts") == before.data.tags.get("unitlab.attempts")

    # Every artifact and checkpoint is in the bucket: MLflow's proxied artifacts and Tune's storage.
    mlflow_keys = bucket_keys(s3, "mlflow/")
    for run in runs:
        mine = [k for k in mlflow_keys if f"/{run.info.run_id}/" in k]
        assert any(k.endswith("probs/probs_test.parquet") for k in mine), mine[:20]
        assert any(k.endswith("summary.json") for k in mine), mine[:20]
    tune_keys = bucket_keys(s3, "tune/cloudflow/")
    assert len({k.split("/")[2] for k in tune_keys if "/checkpoint_" in k}) == 3, tune_keys[:20]

    # Workers were launched from zero for the trials and removed once idle.
    wait_for(lambda: active_workers(cluster) == 0, 120, "idle workers to be removed")
    events = autoscaler_events(cluster["events"])
    added = [t for t, m in events if m.startswith("Adding") and "gpu_worker" in m]
    removed = [t for t, m in events if m.startswith("Removing") and "(idle)" in m]
    assert added and removed and min(added) >= submitted - 1, events
    print(
        json.dumps(
            {
                "cluster_start_s": round(cluster["start_s"], 1),
                "first_worker_added_after_submit_s": round(min(added) - submitted, 1),
                "sweep_stop_resume_s": round(ended - submitted, 1),
                "last_worker_removed_after_resume_s": round(max(removed) - ended, 1),
                "workers_added": len(added),
                "workers_removed_events": len(removed),
            }
        )
    )


def test_resume_with_an_unreachable_bucket_is_one_line(s3, tmp_path, monkeypatch, capsys):
    """A sweep whose bucket does not exist stops before Ray starts, with one line naming it."""
    from orchestrator.cli import main

    for key, value in s3["env"].items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    spec = {
        "name": "nobucket",
        "data": {
            "name": "synthetic",
            "num_classes": 4,
            "image_size": 16,
            "train_size": 64,
            "val_size": 16,
            "test_size": 16,
        },
        "base": {"model": {"preset": "cct_tiny"}, "epochs": 1},
        "axes": {"seed": [0]},
        "storage_path": "s3://no-such-bucket/tune",
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert main(["sweep", str(tmp_path / "spec.yaml")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [
        "error: sweep.storage_path: s3://no-such-bucket/tune: its bucket or top folder does not exist; create it first"
    ], err
    assert not (tmp_path / "mlflow.db").exists()
