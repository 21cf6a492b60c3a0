"""A Ray that a sweep starts on this machine serves its dashboard and job API on loopback only and
refuses clients without its token on every other port."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
from conftest import REPO
from test_orchestrator import descendants

pytestmark = pytest.mark.slow

DRIVER = """
import json, time
import ray
from orchestrator.sweeps.cluster import connect_ray
connect_ray(None)
node = ray._private.worker.global_worker.node
print(json.dumps({"gcs": node.gcs_address, "dashboard": node.address_info["webui_url"]}), flush=True)
time.sleep(180)
"""

CLIENT = "import ray; ray.init(address={gcs!r}); print('joined', flush=True)"


def listening(pids: set[int]) -> list[tuple[str, str]]:
    """(process, local address) of every TCP socket in LISTEN state owned by one of ``pids``."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        for name, pid in re.findall(r'\("([^"]+)",pid=(\d+)', line):
            if int(pid) in pids:
                found.append((name, line.split()[3]))
    return found


def test_local_ray_keeps_its_dashboard_on_loopback_and_refuses_strangers():
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    env.update(PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0")
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        info = json.loads(driver.stdout.readline())
        time.sleep(3)
        sockets = listening({driver.pid, *descendants(driver.pid)})
        port = info["dashboard"].rsplit(":", 1)[1]
        dashboard = [addr for _, addr in sockets if addr.endswith(f":{port}")]
        assert dashboard == [f"127.0.0.1:{port}"], sockets
        for mode, token in (("disabled", None), ("token", "not-the-token")):
            stranger = {**env, "RAY_AUTH_MODE": mode, **({"RAY_AUTH_TOKEN": token} if token else {})}
            joined = subprocess.run(
                [sys.executable, "-c", CLIENT.format(gcs=info["gcs"])],
                cwd=REPO,
                env=stranger,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert joined.returncode != 0 and "joined" not in joined.stdout, (mode, joined.stdout[-2000:])
    finally:
        tree = descendants(driver.pid)
        os.killpg(driver.pid, 9)
        driver.wait()
        for pid in tree:  # the Ray processes it started
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
