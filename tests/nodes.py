"""Loopback processes for the suite: free ports, waiting, MLflow servers, and stopping the Ray nodes a
test started (never ``ray stop``, which would stop every Ray on the machine)."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import tracking_load  # noqa: E402

BIN = Path(sys.executable).parent

_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free loopback port never handed out before in this process.

    The kernel may give a just-closed port again, so two calls in a row could otherwise name the same
    port for two of a node's agents.
    """
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(f"timed out waiting for {what}")


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def agent_ports() -> list[str]:
    """Free ports for a node's agents: the defaults (e.g. 52365) clash with any other Ray running here."""
    return [
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
    ]


def start_mlflow_server(folder: Path, port: int, env: dict | None = None, artifacts: str | None = None):
    """`mlflow server` on 127.0.0.1:port (one worker) over a SQLite file in ``folder``, proxying artifacts
    to ``artifacts`` (default ``folder/artifacts``): the load benchmark's server, in its own session."""
    return tracking_load.start_mlflow(f"sqlite:///{folder / 'server.db'}", folder, port, 1, artifacts, env)


def stop_processes_matching(needles: tuple[str, ...]) -> None:
    """Stop this test's Ray nodes only (``ray stop`` would also stop any other Ray on the machine):
    the processes whose command line names the test's temp folder or GCS port."""

    def ours() -> list[int]:
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if any(needle in cmdline for needle in needles):
                pids.append(int(proc.name))
        return pids

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in ours():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 10
        while ours() and time.time() < deadline:
            time.sleep(0.2)
