"""Shared fixtures and helpers: real-data location, small job configs and sweep specs, local Ray."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# The suite's `mlflow server`s need no job runner: MLflow 3 otherwise starts seven huey consumer
# processes per server (for GenAI jobs this project does not use), CPU the 2-core suite cannot spare.
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")


def real_data_dir() -> Path | None:
    """DATA_DIR if it holds CIFAR-100 shards, else ../shared/data, else None."""
    for candidate in (os.environ.get("DATA_DIR"), SHARED_DATA):
        if candidate and (Path(candidate) / "cifar100").is_dir():
            return Path(candidate).resolve()
    return None


@pytest.fixture
def data_dir() -> Path:
    root = real_data_dir()
    if root is None:
        pytest.skip("real data not found: set DATA_DIR or provide ../shared/data")
    return root


BF16_MODES = {"auto": "auto", "on": True, "off": False}


def pytest_addoption(parser):
    parser.addoption(
        "--bf16",
        choices=sorted(BF16_MODES),
        default=os.environ.get("UNITLAB_TEST_BF16", "auto"),
        help="bf16 autocast of every job the suite trains (default auto: where the CPU has native "
        "bf16; also UNITLAB_TEST_BF16). The reproduction tests run both precisions anyway.",
    )


SUITE_BF16: bool | str = "auto"  # set from --bf16 before collection; synthetic_job and sweep_spec use it


def pytest_configure(config):
    global SUITE_BF16
    SUITE_BF16 = BF16_MODES[config.getoption("--bf16")]


def pytest_report_header(config):
    return f"unitlab: jobs train with bf16={SUITE_BF16} (--bf16 / UNITLAB_TEST_BF16)"


# The files that take longest (worker-seconds from `pytest -n 3 --dist loadfile --durations=0`,
# 2026-12-07), longest first. xdist hands out whole files in collection order when run with
# `--no-loadscope-reorder` (as `make test` does; by default it starts the files with the most tests
# first, which left a one-test file of a minute and more to run alone at the end).
LONGEST_FIRST = (
    "test_prune_stage.py",
    "test_cluster_flow.py",
    "test_orchestrator.py",
    "test_workbench.py",
    "test_postgres_tracking.py",
    "test_faults.py",
    "test_multinode.py",
    "test_sigterm.py",
    "test_driver_kill.py",
    "test_bad_inputs.py",
    "test_external_models.py",
    "test_exposure.py",
    "test_gpu_paths.py",
    "test_readout_fidelity.py",
    "test_gpu_suite.py",
    "test_train.py",
)


def pytest_collection_modifyitems(items):
    """Tests that read the real datasets carry the ``realdata`` marker (``-m "not realdata"`` skips them);
    the longest files run first (``LONGEST_FIRST``), the rest in their usual order."""
    for item in items:
        if "data_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.realdata)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Decoded-array cache shared by the whole session (all xdist workers), outside the user's home."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # gwN folders share a parent
    monkeypatch.setenv("UNITLAB_CACHE", str(shared / "cache"))
    monkeypatch.setenv("UNITLAB_DOWNLOAD", "0")


@pytest.fixture(autouse=True)
def _tracking_uri_restored():
    """MLflow's global tracking URI (and the MLFLOW_TRACKING_URI it exports) as it was before each test:
    a test that points the fluent API at its own server must not send a later test there."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if os.environ.get("MLFLOW_TRACKING_URI") != before:
        import mlflow

        mlflow.set_tracking_uri(before)


def stop_process(proc: subprocess.Popen, group: bool = False, grace_s: float = 30) -> None:
    """SIGTERM ``proc`` (its whole process group with ``group``: a server's workers too), then SIGKILL if
    it has not exited within ``grace_s``; a loaded machine can take longer than that to shut down."""
    send = (lambda sig: os.killpg(proc.pid, sig)) if group else proc.send_signal
    with contextlib.suppress(ProcessLookupError):
        send(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            send(signal.SIGKILL)
        proc.wait(timeout=30)


def synthetic_job(**overrides) -> dict:
    """A job that trains a tiny CCT on synthetic data in a few seconds on CPU."""
    job = {
        "model": {"preset": "cct_tiny"},
        "data": {
            "name": "synthetic",
            "num_classes": 4,
            "image_size": 16,
            "train_size": 256,
            "val_size": 64,
            "test_size": 64,
        },
        "recipe": {"name": "adamw_cosine", "lr": 0.003, "warmup_epochs": 0},
        "epochs": 2,
        "batch_size": 32,
        "latency": {"large_batch": 16, "repeats": 3},
        "bf16": SUITE_BF16,
    }
    for key, value in overrides.items():
        job[key] = value
    return job


def sweep_spec(name: str, epochs: int = 2, train_size: int = 256, **overrides) -> dict:
    """Four cells (2 attention shapes x 2 conv-replaced block counts) of a tiny CCT on synthetic data."""
    spec = {
        "name": name,
        "data": {
            "name": "synthetic",
            "num_classes": 4,
            "image_size": 16,
            "train_size": train_size,
            "val_size": 64,
            "test_size": 64,
        },
        "base": {
            "model": {"preset": "cct_tiny"},
            "recipe": {"name": "adamw_cosine", "lr": 0.003, "warmup_epochs": 0},
            "epochs": epochs,
            "batch_size": 32,
            "latency": {"large_batch": 16, "repeats": 3},
            "bf16": SUITE_BF16,
        },
        "axes": {
            "attention": [{"heads": 2, "head_dim": 16}, {"heads": 4, "head_dim": 8}],
            "n_conv_blocks": [0, 1],
            "seed": [0],
        },
        "resources": {"cpus": 1},
        "max_concurrent": 2,
    }
    spec.update(overrides)
    return spec


def write(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def cli_args(tmp_path: Path) -> list[str]:
    return ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--storage-path", str(tmp_path / "store")]


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance with 2 CPUs for one test module."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()
