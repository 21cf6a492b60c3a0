"""benchmarks/gpu_suite.py --tiny: every part of the GPU suite runs on the CPU and reports its numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tiny_gpu_suite_runs_every_part(tmp_path: Path) -> None:
    out = tmp_path / "suite.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--tiny", "--out", str(out), "--budget-s", "60"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    parts = report["parts"]
    assert set(parts) == {"throughput", "packing", "analysis", "accuracy"}
    assert not [p for p in parts.values() if "error" in p]
    runs = parts["throughput"]["runs"]
    assert set(runs) == {
        "device_loader",
        "torchvision_dataloader",
        "device_loader_compiled",
        "torchvision_dataloader_compiled",
    }
    assert all(r["images_per_sec"] > 0 for r in runs.values())
    assert runs["device_loader_compiled"]["recompiles_after_warmup"] == 0
    assert parts["packing"]["images_per_sec_2_processes"] > 0
    assert parts["analysis"]["taps"] == 6 and parts["analysis"]["test_images"] == 200
    accuracy = parts["accuracy"]
    assert len(accuracy["val_acc_per_epoch"]) == accuracy["epochs"] >= 1 and 0 <= accuracy["test_acc"] <= 1


def test_unknown_part_is_refused(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "gpu_suite.py"),
            "--tiny",
            "--parts",
            "speed",
            "--out",
            str(tmp_path / "x.json"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "--parts: unknown part 'speed'" in done.stderr
    assert not (tmp_path / "x.json").exists()
