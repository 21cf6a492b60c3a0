"""Screenshots of the MLflow UI and of optuna-dashboard for a sweep, taken with headless Chromium
(Debian's `chromium`).

    python docs/screenshots.py quick [--tracking-uri sqlite:///mlflow.db] [--out docs/screenshots]

Starts `mlflow server` on a free loopback port over the store, then shoots the sweep's parent run
page and its best trial's artifacts page into OUT; then `python -m orchestrator dashboard` on
another port and the study's page (``dashboard.png``) when the sweep has a study. Without Chromium
it says so and exits with 0 (nothing to do here), so it can run anywhere.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.workbench.tracking import BEST_RUN, find_parent, open_client, resolve_tracking_uri  # noqa: E402

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)


def shoot_dashboard(browser: str, sweep: str, uri: str, out: Path) -> None:
    """optuna-dashboard on the sweep's study, one screenshot of the study page (none without a study)."""
    port = free_port()
    dashboard = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "dashboard", sweep, "--port", str(port), "--tracking-uri", uri],
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        first = dashboard.stdout.readline().strip()
        if not first.startswith("study "):
            print(f"no dashboard screenshot: {first}")
            return
        wait_port(port)
        shoot(browser, first.rsplit(" ", 1)[-1], out / "dashboard.png")
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=30)


def shoot(browser: str, url: str, path: Path) -> None:
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1600,1100",
            "--virtual-time-budget=15000",
            f"--screenshot={path}",
            url,
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--out", default="docs/screenshots")
    args = parser.parse_args()
    browser = next((b for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        print(f"skipped: no Chromium on PATH ({', '.join(BROWSERS)}); install Debian's chromium to take screenshots")
        return 0
    uri = resolve_tracking_uri(args.tracking_uri)
    client, uri = open_client(uri, create=False)
    parent = find_parent(client, args.sweep)
    if parent is None:
        print(f"error: no sweep {args.sweep!r} in {uri}", file=sys.stderr)
        return 2
    port = free_port()
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            uri,
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_port(port)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        exp = parent.info.experiment_id
        mode = "?workflowType=machine_learning"  # MLflow 3 opens experiments in its GenAI view otherwise
        shoot(browser, f"{base}/#/experiments/{exp}/runs/{parent.info.run_id}{mode}", out / "sweep_run.png")
        best = parent.data.tags.get(BEST_RUN)
        if best:
            figure = "analysis/figures/depth.png"  # the best trial's SNR / labels / readout along depth
            shoot(
                browser,
                f"{base}/#/experiments/{exp}/runs/{best}/artifacts/{figure}{mode}",
                out / "best_trial_artifacts.png",
            )
    finally:
        server.terminate()
        server.wait(timeout=30)
    shoot_dashboard(browser, args.sweep, uri, out)
    print(f"screenshots in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
