"""How many concurrent trials one tracking server holds: N simulated trials against `mlflow server` on
127.0.0.1, backed by SQLite and by PostgreSQL, with every metric point counted afterwards.

    python benchmarks/tracking_load.py                      # 16, 64, 128 writers on both backends
    python benchmarks/tracking_load.py --writers 16 --epochs 5 --backends postgresql

Each simulated trial does what a sweep's trial does, through the trial's own write path
(``orchestrator.workbench.spool``: ordered, retried while the server is away, idempotent because a
retried batch carries the same timestamps): open a child run under one parent, log its params, log
three metrics per epoch for E epochs, log a small artifact, end the run. The writers start together,
spread over ``--processes`` worker processes with one thread per trial (the server sees N concurrent
request streams either way; 128 Python processes with MLflow imported would not fit beside the rest
of a 24 GB machine). Afterwards every run's metric history is read back through the server and
compared with what was sent: points lost, points duplicated.

PostgreSQL comes from the ``pgserver`` wheel: a PostgreSQL 16 build that pip installs and that
starts as any user (root included) in under a second on a Unix socket in a temporary folder; a
system PostgreSQL needs a package manager, a service user and a port. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

METRIC_KEYS = ("train_loss", "val_acc", "lr")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_postgres(folder: Path):
    """A fresh PostgreSQL (pgserver) and the SQLAlchemy URI of a new database on it."""
    import pgserver

    server = pgserver.get_server(folder / "pgdata", cleanup_mode="stop")
    server.psql("CREATE DATABASE mlflow_load;")
    socket_dir = urllib.parse.parse_qs(urllib.parse.urlsplit(server.get_uri()).query)["host"][0]
    return server, f"postgresql+psycopg://postgres@/mlflow_load?host={socket_dir}"


def start_mlflow(
    backend_uri: str,
    folder: Path,
    port: int,
    workers: int = 4,
    artifacts: str | None = None,
    env: dict | None = None,
) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:port over ``backend_uri``, proxying artifacts to ``artifacts``
    (default ``folder/artifacts``), in its own session, its log in ``folder/server.log``; returns once
    it answers ``/health``. ``env``: the server's environment (default this process's)."""
    env = {**(os.environ if env is None else env), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            backend_uri,
            "--artifacts-destination",
            artifacts or str(folder / "artifacts"),
            "--serve-artifacts",
            "--workers",
            str(workers),
        ],
        cwd=folder,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(folder / "server.log", "w"),  # noqa: SIM115 - the server owns it
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                log = (folder / "server.log").read_text()[-2000:]
                raise RuntimeError(f"mlflow server did not start: {log}") from None
            time.sleep(0.5)
    import urllib.request

    while True:  # the port opens before the app answers
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read()
            return server
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def stop(server: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(server.pid, signal.SIGKILL)


def one_trial(uri: str, exp_id: str, parent: str, index: int, epochs: int, folder: Path, stats: dict) -> None:
    """One simulated trial through the trial's write path; counts successes, retries and failures."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    from orchestrator.workbench.spool import Spool, call_when_up

    client = MlflowClient(uri)
    lock = threading.Lock()

    def timed(call, *args, **kwargs):
        start = time.perf_counter()
        try:
            result = call(*args, **kwargs)
        except Exception:
            with lock:
                stats["failed_attempts"] += 1
            raise
        with lock:
            stats["latencies"].append(time.perf_counter() - start)
        return result

    run = call_when_up(
        lambda: timed(
            client.create_run,
            exp_id,
            run_name=f"load{index}",
            tags={"mlflow.parentRunId": parent, "load.index": str(index)},
        ),
        uri,
        poll_s=1,
        wait_s=300,
    )
    run_id = run.info.run_id
    spool = Spool(uri, poll_s=1, wait_s=300)
    params = [Param(f"model.p{i}", str(i * index)) for i in range(8)]
    spool.submit("params", lambda: timed(client.log_batch, run_id, params=params))
    stamp = int(time.time() * 1000)
    for epoch in range(epochs):
        batch = [Metric(k, 1.0 / (epoch + 1) + index * 1e-3, stamp + epoch, epoch) for k in METRIC_KEYS]
        spool.submit(f"epoch {epoch}", lambda batch=batch: timed(client.log_batch, run_id, metrics=batch))
    artifact = folder / f"summary{index}.json"
    artifact.write_text(json.dumps({"index": index, "epochs": epochs}))
    spool.submit("artifact", lambda: timed(client.log_artifact, run_id, str(artifact)))
    spool.submit("finished", lambda: timed(client.set_terminated, run_id, "FINISHED"))
    spool.drain()
    with lock:
        stats["outages"] += spool.outages


def writer_process(uri, exp_id, parent, indices, epochs, folder, start_at, results) -> None:
    """A worker process: one thread per simulated trial, all starting at ``start_at``."""
    stats = {"latencies": [], "failed_attempts": 0, "outages": 0, "errors": []}
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - MLflow prints a line per ended run; stdout is the JSON's

    def run(i: int) -> None:
        try:
            one_trial(uri, exp_id, parent, i, epochs, Path(folder), stats)
        except Exception as exc:  # noqa: BLE001 - counted and reported
            stats["errors"].append(f"trial {i}: {type(exc).__name__}: {str(exc)[:200]}")

    from mlflow import MlflowClient  # noqa: F401 - imported before the start signal, not timed

    time.sleep(max(0.0, start_at - time.time()))
    threads = [threading.Thread(target=run, args=(i,)) for i in indices]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put(stats)


def count_points(uri: str, exp_id: str, parent: str, writers: int, epochs: int) -> dict:
    """Runs and metric points that arrived, against what was sent."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent}'", max_results=5000)
    indices = [int(r.data.tags["load.index"]) for r in runs]
    lost = duplicated = 0
    for run in runs:
        for key in METRIC_KEYS:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            lost += epochs - len(set(steps))
            duplicated += len(steps) - len(set(steps))
    return {
        "runs": len(runs),
        "runs_missing": writers - len(set(indices)),
        "runs_duplicated": len(indices) - len(set(indices)),
        "runs_unfinished": sum(r.info.status != "FINISHED" for r in runs),
        "points_sent": writers * epochs * len(METRIC_KEYS),
        "points_lost": lost + (writers - len(set(indices))) * epochs * len(METRIC_KEYS),
        "points_duplicated": duplicated,
    }


def load(uri: str, writers: int, epochs: int, processes: int, folder: Path, timeout_s: float) -> dict:
    """N simulated trials against the server at ``uri``; returns the figures of one configuration."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp_id = client.create_experiment(f"load_{writers}_{time.time_ns()}")
    parent = client.create_run(exp_id, run_name="parent").info.run_id
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    groups = [list(range(writers))[p::processes] for p in range(min(processes, writers))]
    start_at = time.time() + 8 + 0.5 * len(groups)  # after every process has imported MLflow
    procs = [
        ctx.Process(target=writer_process, args=(uri, exp_id, parent, g, epochs, str(folder), start_at, results))
        for g in groups
    ]
    for p in procs:
        p.start()
    gathered = []
    deadline = start_at + timeout_s
    while len(gathered) < len(procs) and time.time() < deadline:
        try:
            gathered.append(results.get(timeout=1))
        except Exception:  # noqa: BLE001 - queue.Empty: keep waiting
            pass
    wall = time.time() - start_at
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
    latencies = [x for s in gathered for x in s["latencies"]]
    errors = [e for s in gathered for e in s["errors"]]
    client.set_terminated(parent, "FINISHED")
    figures = {
        "writers": writers,
        "epochs": epochs,
        "processes": len(groups),
        "timed_out": len(gathered) < len(procs),
        "wall_s": round(wall, 2),
        "requests": len(latencies),
        "writes_per_s": round(len(latencies) / wall, 1) if wall > 0 else None,
        "p50_ms": round(1000 * statistics.median(latencies), 1) if latencies else None,
        "p99_ms": round(1000 * statistics.quantiles(latencies, n=100)[98], 1) if len(latencies) >= 100 else None,
        "failed_attempts_retried": sum(s["failed_attempts"] for s in gathered),
        "outages_seen_by_trials": sum(s["outages"] for s in gathered),
        "errors": len(errors),
        "error_examples": errors[:3],
    }
    figures.update(count_points(uri, exp_id, parent, writers, epochs))
    return figures


def run_backend(backend: str, writer_counts: list[int], epochs: int, processes: int, timeout_s: float) -> list[dict]:
    """Every writer count against one fresh server over ``backend``."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        pg = None
        if backend == "sqlite":
            backend_uri = f"sqlite:///{folder / 'mlflow.db'}"
        else:
            pg, backend_uri = start_postgres(folder)
        port = free_port()
        server = start_mlflow(backend_uri, folder, port)
        try:
            for n in writer_counts:
                figures = load(f"http://127.0.0.1:{port}", n, epochs, processes, folder, timeout_s)
                out.append({"backend": backend, **figures})
                print(json.dumps(out[-1]), file=sys.stderr, flush=True)
        finally:
            stop(server)
            if pg is not None:
                pg.cleanup()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", default="16,64,128", help="comma-separated numbers of simulated trials")
    parser.add_argument("--epochs", type=int, default=10, help="epochs per simulated trial (3 metrics each)")
    parser.add_argument("--backends", default="sqlite,postgresql", help="sqlite, postgresql or both")
    parser.add_argument("--processes", type=int, default=8, help="worker processes the trials are spread over")
    parser.add_argument("--timeout-s", type=float, default=600, help="give up on one configuration after this")
    args = parser.parse_args()
    counts = [int(n) for n in args.writers.split(",")]
    rows = []
    for backend in args.backends.split(","):
        rows += run_backend(backend.strip(), counts, args.epochs, args.processes, args.timeout_s)
    import platform

    print(
        json.dumps(
            {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "results": rows}, indent=1
        )
    )


if __name__ == "__main__":
    main()
