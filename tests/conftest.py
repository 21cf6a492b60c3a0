"""Shared fixtures: real-data location and small job configs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


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


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Decoded-array cache shared by the whole session, outside the user's home."""
    monkeypatch.setenv("UNITLAB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("UNITLAB_DOWNLOAD", "0")


def synthetic_job(**overrides) -> dict:
    """A job that trains a tiny CCT on synthetic data in a few seconds on CPU."""
    job = {
        "model": {"preset": "cct_tiny"},
        "data": {"name": "synthetic", "num_classes": 4, "image_size": 16, "train_size": 256, "val_size": 64, "test_size": 64},
        "recipe": {"name": "adamw_cosine", "lr": 0.003, "warmup_epochs": 0},
        "epochs": 2,
        "batch_size": 32,
        "latency": {"large_batch": 16, "repeats": 3},
    }
    for key, value in overrides.items():
        job[key] = value
    return job
