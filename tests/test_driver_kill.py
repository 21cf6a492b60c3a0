"""A sweep driver killed with SIGKILL (no chance to clean up) is resumed: the finished trials are
not rerun, the others finish in their own runs, nothing is logged twice. (Its own file so that
xdist runs it beside the other long fault tests.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, cli_args, sweep_spec, write
from test_orchestrator import descendants, steps, trial_runs


@pytest.mark.slow
def test_killed_driver_is_resumed_without_rerunning_or_duplicating(tmp_path):
    spec = sweep_spec("driverkill", epochs=4, train_size=2048)
    store = tmp_path / "store" / "driverkill"
    driver = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "sweep", str(write(tmp_path, spec)), *cli_args(tmp_path)],
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 180
        while time.time() < deadline and driver.poll() is None and not list(store.glob("*/checkpoint_000003")):
            time.sleep(0.1)  # a trial reports its last checkpoint after its MLflow run is FINISHED
        assert driver.poll() is None, "the sweep ended before it could be interrupted"
    finally:
        tree = descendants(driver.pid)
        driver.kill()
        driver.wait()
        for pid in tree:  # Ray's processes of the killed driver
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    before = {
        r.info.run_id: (r.info.end_time, r.data.tags["unitlab.attempts"])
        for r in trial_runs(tmp_path, "driverkill")[1]
        if r.info.status == "FINISHED"
    }
    assert 1 <= len(before) < 4
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", "resume", "driverkill", *cli_args(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    parents, children = trial_runs(tmp_path, "driverkill")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 4 and len({r.data.tags["unitlab.trial_id"] for r in children}) == 4
    for run in children:
        assert run.info.status == "FINISHED" and steps(tmp_path, run.info.run_id) == [0, 1, 2, 3]
        if run.info.run_id in before:
            assert (run.info.end_time, run.data.tags["unitlab.attempts"]) == before[run.info.run_id]
