"""Two Ray nodes on loopback (`ray start --head` + `ray start --address`) and an `mlflow server` on
127.0.0.1: a worker node dies mid-sweep and its trial continues on the head in the same run.
(A sweep submitted with `ray job submit` to an autoscaling cluster is tests/test_cluster_flow.py.)"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, stop_process
from mlflow import MlflowClient
from nodes import BIN, agent_ports, free_port, port_open, start_mlflow_server, stop_processes_matching, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(tmp_path):
    """A head node, a second node with its own custom resource, and an MLflow server, all on loopback."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    gcs_port, dash_port, mlflow_port = free_port(), free_port(), free_port()
    ray_tmp = Path("/tmp") / f"ray-mn-{os.getpid()}"  # short: Ray's socket paths have a length limit
    started = []
    try:
        subprocess.run(
            [
                BIN / "ray",
                "start",
                "--head",
                f"--port={gcs_port}",
                "--node-ip-address=127.0.0.1",
                "--num-cpus=1",
                "--num-gpus=0",
                f"--dashboard-port={dash_port}",
                "--dashboard-host=127.0.0.1",
                "--include-dashboard=true",
                f"--temp-dir={ray_tmp}",
                '--resources={"head_node": 1}',
                "--disable-usage-stats",
                f"--ray-client-server-port={free_port()}",
                *agent_ports(),
            ],
            check=True,
            env=env,
            cwd=tmp_path,
            capture_output=True,
        )
        started.append("ray")
        subprocess.run(
            [
                BIN / "ray",
                "start",
                f"--address=127.0.0.1:{gcs_port}",
                "--node-ip-address=127.0.0.1",
                "--num-cpus=1",
                "--num-gpus=0",
                '--resources={"second_node": 1}',
                "--disable-usage-stats",
                *agent_ports(),
            ],
            check=True,
            env=env,
            cwd=tmp_path,
            capture_output=True,
        )
        server = start_mlflow_server(tmp_path, mlflow_port, env=env)
        started.append(server)
        wait_for(lambda: port_open(dash_port), 60, "ray dashboard")
        yield {
            "gcs": f"127.0.0.1:{gcs_port}",
            "dashboard": f"http://127.0.0.1:{dash_port}",
            "mlflow": f"http://127.0.0.1:{mlflow_port}",
            "env": env,
        }
    finally:
        for item in started:
            if isinstance(item, subprocess.Popen):
                stop_process(item, group=True)
        stop_processes_matching((str(ray_tmp), f"127.0.0.1:{gcs_port}"))
        shutil.rmtree(ray_tmp, ignore_errors=True)


def raylets() -> dict[int, str]:
    """pid -> command line of every raylet process on this machine."""
    found = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "/raylet" in cmdline.split(" ")[0]:
                found[int(proc.name)] = cmdline
    return found


def test_a_lost_worker_node_moves_its_trial_to_the_head_in_the_same_run(cluster, tmp_path):
    spec = {
        "name": "lostnode",
        # long enough (8 epochs) that the second node's trial is still training when its node dies
        "data": {
            "name": "synthetic",
            "num_classes": 4,
            "image_size": 16,
            "train_size": 4096,
            "val_size": 32,
            "test_size": 32,
        },
        "base": {
            "model": {"preset": "cct_tiny"},
            "epochs": 8,
            "batch_size": 32,
            "recipe": {"name": "adamw_cosine", "lr": 0.003, "warmup_epochs": 0},
            "latency": {"large_batch": 8, "repeats": 2},
        },
        "axes": {"n_conv_blocks": [0, 1], "seed": [0]},
        "resources": {"cpus": 1, "gpus": 0},
        "max_concurrent": 2,
        "max_failures": 2,
        "storage_path": str(tmp_path / "tune"),  # one folder both loopback nodes see
    }
    spec_file = tmp_path / "lostnode.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    second = [pid for pid, cmd in raylets().items() if "second_node" in cmd]
    assert len(second) == 1, "cannot tell the second node's raylet"
    driver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "orchestrator",
            "sweep",
            str(spec_file),
            "--address",
            cluster["gcs"],
            "--tracking-uri",
            cluster["mlflow"],
        ],
        cwd=REPO,
        env=cluster["env"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    client = MlflowClient(cluster["mlflow"])

    def trial_runs() -> list:
        exp = client.get_experiment_by_name("lostnode")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        return [r for r in runs if r.data.tags.get("unitlab.role") == "trial"]

    def both_trained_an_epoch() -> bool:
        runs = trial_runs()
        return len(runs) == 2 and all(len(client.get_metric_history(r.info.run_id, "val_acc")) >= 2 for r in runs)

    try:
        wait_for(lambda: both_trained_an_epoch() or driver.poll() is not None, 300, "two epochs on both nodes")
        assert driver.poll() is None, "the sweep ended before the node could be lost"
        nodes = {r.info.run_id: r.data.tags["unitlab.node_id"] for r in trial_runs()}
        assert len(set(nodes.values())) == 2, "the trials did not use both nodes"
        assert all(r.info.status == "RUNNING" for r in trial_runs()), "a trial ended before its node could be lost"
        os.kill(second[0], signal.SIGKILL)  # the second node's raylet: the node and its workers die
        output, _ = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, output[-4000:]
    runs = trial_runs()
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    moved = [r for r in runs if r.data.tags["unitlab.node_id"] != nodes[r.info.run_id]]
    assert len(moved) == 1 and moved[0].data.tags["unitlab.attempts"] == "2"
    assert int(moved[0].data.tags["unitlab.start_epoch"]) >= 1, "the moved trial did not restart from its checkpoint"
    for run in runs:
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_acc")) == list(range(8))
