"""Datasets as uint8 arrays: CIFAR-100 and Flowers-102 from Parquet shards (or torchvision), and a
class-conditional synthetic set for tests.

Images are decoded once and cached as ``.npy`` next to the user's cache folder, so every trial on a
node memory-maps the same decoded array instead of decoding PNGs again.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

KNOWN_DATASETS = ("cifar100", "flowers102", "synthetic")
# Fixed shape of each real dataset: (classes, image size).
DATASET_SHAPES = {"cifar100": (100, 32), "flowers102": (102, 64)}
PARQUET_COLUMNS = {"cifar100": ("img", "fine_label"), "flowers102": ("image", "label")}


class DataError(ValueError):
    """Bad data configuration or an unreadable data file; the message names the field or file."""


@dataclass
class ArraySplit:
    """One split: ``images`` uint8 (N, H, W, 3), ``labels`` int64 (N,), ``indices`` rows in the source split."""

    images: np.ndarray
    labels: np.ndarray
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Splits:
    """Train / validation / test splits of one dataset plus what a model needs to know about it."""

    name: str
    train: ArraySplit
    val: ArraySplit
    test: ArraySplit
    num_classes: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_names: list[str] = field(default_factory=list)


def dataset_shape(data_cfg: dict) -> tuple[int, int]:
    """(num_classes, image_size) of the configured dataset without loading it."""
    name = data_cfg["name"]
    if name == "synthetic":
        return int(data_cfg["num_classes"]), int(data_cfg["image_size"])
    if name not in DATASET_SHAPES:
        raise DataError(f"data.name: unknown dataset {name!r} (known: {', '.join(KNOWN_DATASETS)})")
    return DATASET_SHAPES[name]


def resolve_data_dir(data_cfg: dict) -> Path | None:
    """The Parquet root: ``data.data_dir``, else the DATA_DIR environment variable, else None."""
    root = data_cfg.get("data_dir") or os.environ.get("DATA_DIR")
    return Path(root).expanduser().resolve() if root else None


def cache_dir() -> Path:
    """Folder for decoded arrays (UNITLAB_CACHE, else ~/.cache/unitlab)."""
    path = Path(os.environ.get("UNITLAB_CACHE", Path.home() / ".cache" / "unitlab"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_data_available(data_cfg: dict) -> None:
    """Raise DataError naming DATA_DIR and the torchvision root when a real dataset cannot be found.

    Cheap: looks at file names only; corrupt files are caught when they are read.
    """
    name = data_cfg["name"]
    dataset_shape(data_cfg)
    if name == "synthetic":
        return
    root = resolve_data_dir(data_cfg)
    if root is not None:
        if not root.is_dir():
            raise DataError(f"data.data_dir: {root} is not a folder")
        for split in _parquet_splits(name):
            if not _shards(root, name, split):
                raise DataError(f"data file missing: no {root / name / split}-*.parquet shard")
        return
    if not _torchvision_root(data_cfg).joinpath(_TV_MARKERS[name]).exists() and not _download_allowed():
        raise DataError(
            f"no {name} data: set DATA_DIR (or data.data_dir) to a folder with {name}/*.parquet shards, "
            f"or allow a torchvision download into {_torchvision_root(data_cfg)} (UNITLAB_DOWNLOAD=1)"
        )


def load_splits(data_cfg: dict, seed: int = 0) -> Splits:
    """Load, split and subset a dataset as configured.

    The validation split is held out from train with ``data.val_seed`` (fixed, independent of the
    training seed) unless the dataset has an official one (Flowers-102). ``train_size``,
    ``val_size`` and ``test_size`` take deterministic subsets.
    """
    check_data_available(data_cfg)
    name = data_cfg["name"]
    if name == "synthetic":
        return _synthetic_splits(data_cfg)
    raw = _load_raw(name, data_cfg)
    train_x, train_y = raw["train"]
    rng = np.random.default_rng(int(data_cfg.get("val_seed", 0)))
    order = rng.permutation(len(train_y))
    if "validation" in raw:
        val_x, val_y = raw["validation"]
        val_idx = np.arange(len(val_y))
        train_idx = order
    else:
        n_val = int(data_cfg.get("val_size") or 0)
        if not 0 < n_val < len(train_y):
            raise DataError(f"data.val_size: must be in 1..{len(train_y) - 1} for {name}, got {n_val}")
        val_idx, train_idx = np.sort(order[:n_val]), order[n_val:]
        val_x, val_y = train_x, train_y
    train_idx = _take(train_idx, data_cfg.get("train_size"), "data.train_size")
    val_idx = _take(val_idx, data_cfg.get("val_size") if "validation" in raw else None, "data.val_size")
    test_x, test_y = raw["test"]
    test_idx = _take(np.arange(len(test_y)), data_cfg.get("test_size"), "data.test_size")
    train = ArraySplit(np.ascontiguousarray(train_x[train_idx]), train_y[train_idx].astype(np.int64), train_idx)
    num_classes, image_size = DATASET_SHAPES[name]
    mean, std = _channel_stats(train.images)
    return Splits(
        name=name,
        train=train,
        val=ArraySplit(np.ascontiguousarray(val_x[val_idx]), val_y[val_idx].astype(np.int64), val_idx),
        test=ArraySplit(np.ascontiguousarray(test_x[test_idx]), test_y[test_idx].astype(np.int64), test_idx),
        num_classes=num_classes,
        image_size=image_size,
        mean=mean,
        std=std,
        class_names=_class_names(name, data_cfg),
    )


def _take(indices: np.ndarray, size, field_name: str) -> np.ndarray:
    if size is None:
        return indices
    size = int(size)
    if size < 1:
        raise DataError(f"{field_name}: must be >= 1, got {size}")
    return indices[: min(size, len(indices))]


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    sample = images[:: max(1, len(images) // 10000)].reshape(-1, 3).astype(np.float64) / 255.0
    return tuple(float(v) for v in sample.mean(0)), tuple(float(v) for v in sample.std(0) + 1e-6)


# ---------------------------------------------------------------- Parquet shards

def _parquet_splits(name: str) -> tuple[str, ...]:
    return ("train", "validation", "test") if name == "flowers102" else ("train", "test")


def _shards(root: Path, name: str, split: str) -> list[Path]:
    return sorted((root / name).glob(f"{split}-*.parquet"))


def _load_raw(name: str, data_cfg: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    root = resolve_data_dir(data_cfg)
    if root is None:
        return _load_torchvision(name, data_cfg)
    return {split: _load_parquet_split(root, name, split) for split in _parquet_splits(name)}


def _load_parquet_split(root: Path, name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    shards = _shards(root, name, split)
    key = hashlib.sha1(
        json.dumps([[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in shards]).encode()
    ).hexdigest()[:16]
    cached_x = cache_dir() / f"{name}-{split}-{key}-images.npy"
    cached_y = cache_dir() / f"{name}-{split}-{key}-labels.npy"
    if cached_x.exists() and cached_y.exists():
        return np.load(cached_x, mmap_mode="r"), np.load(cached_y)
    images, labels = _decode_shards(shards, name)
    _atomic_save(cached_y, labels)
    _atomic_save(cached_x, images)
    return np.load(cached_x, mmap_mode="r"), labels


def _decode_shards(shards: list[Path], name: str) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow.parquet as pq
    from PIL import Image

    image_col, label_col = PARQUET_COLUMNS[name]
    images, labels = [], []
    for shard in shards:
        try:
            table = pq.read_table(shard, columns=[image_col, label_col])
        except Exception as exc:  # pyarrow raises several types for damaged files
            raise DataError(f"data file {shard}: cannot be read as Parquet ({type(exc).__name__}: {exc})") from None
        for cell, label in zip(table.column(image_col).to_pylist(), table.column(label_col).to_pylist()):
            try:
                images.append(np.asarray(Image.open(io.BytesIO(cell["bytes"])).convert("RGB")))
            except Exception as exc:
                raise DataError(f"data file {shard}: an image cannot be decoded ({exc})") from None
            labels.append(label)
    if not images:
        raise DataError(f"data file {shards[0] if shards else name}: holds no images")
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        np.save(handle, array)
    os.replace(tmp, path)


def _class_names(name: str, data_cfg: dict) -> list[str]:
    root = resolve_data_dir(data_cfg)
    path = root / name / "labels.json" if root else None
    if path is None or not path.exists():
        return []
    names = json.loads(path.read_text())
    return names.get("fine_label_names") or names.get("label_names") or []


# ---------------------------------------------------------------- torchvision fallback

_TV_MARKERS = {"cifar100": "cifar-100-python", "flowers102": "flowers-102"}


def _download_allowed() -> bool:
    return os.environ.get("UNITLAB_DOWNLOAD", "1") != "0"


def _torchvision_root(data_cfg: dict) -> Path:
    return Path(data_cfg.get("torchvision_root") or cache_dir() / "torchvision")


def _load_torchvision(name: str, data_cfg: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    import torchvision

    root = _torchvision_root(data_cfg)
    try:
        if name == "cifar100":
            out = {}
            for split, train in (("train", True), ("test", False)):
                ds = torchvision.datasets.CIFAR100(root, train=train, download=True)
                out[split] = (np.asarray(ds.data), np.asarray(ds.targets, dtype=np.int64))
            return out
        out = {}
        for split in ("train", "val", "test"):
            ds = torchvision.datasets.Flowers102(root, split=split, download=True)
            resized = [np.asarray(ds[i][0].convert("RGB").resize((64, 64))) for i in range(len(ds))]
            out["validation" if split == "val" else split] = (np.stack(resized), np.asarray(ds._labels, dtype=np.int64))
        return out
    except Exception as exc:
        raise DataError(
            f"no {name} data: DATA_DIR is not set and the torchvision download into {root} failed "
            f"({type(exc).__name__}); set DATA_DIR to a folder with {name}/*.parquet shards"
        ) from None


# ---------------------------------------------------------------- synthetic

def _synthetic_splits(data_cfg: dict) -> Splits:
    """Class-conditional images: each class is a smooth random colour pattern; samples add a random
    shift, a brightness change and pixel noise. Learnable in seconds, yet not trivially separable."""
    num_classes, size = dataset_shape(data_cfg)
    if num_classes < 2:
        raise DataError(f"data.num_classes: must be >= 2, got {num_classes}")
    if size < 4:
        raise DataError(f"data.image_size: must be >= 4, got {size}")
    rng = np.random.default_rng(int(data_cfg.get("synthetic_seed", 0)))
    coarse = rng.uniform(0, 255, size=(num_classes, 4, 4, 3))
    reps = -(-size // 4)
    prototypes = np.kron(coarse, np.ones((reps, reps, 1)))[:, :size, :size]
    noise = float(data_cfg.get("synthetic_noise", 40.0))

    def draw(n: int, offset: int) -> ArraySplit:
        local = np.random.default_rng([int(data_cfg.get("synthetic_seed", 0)), offset])
        labels = np.arange(n) % num_classes
        local.shuffle(labels)
        shifts = local.integers(-2, 3, size=(n, 2))
        images = np.empty((n, size, size, 3), dtype=np.uint8)
        for i, (label, (dy, dx)) in enumerate(zip(labels, shifts)):
            img = np.roll(prototypes[label], (dy, dx), axis=(0, 1)) * local.uniform(0.7, 1.3)
            images[i] = np.clip(img + local.normal(0, noise, img.shape), 0, 255).astype(np.uint8)
        return ArraySplit(images, labels.astype(np.int64), np.arange(n))

    train = draw(int(data_cfg.get("train_size") or 20 * num_classes), 1)
    mean, std = _channel_stats(train.images)
    return Splits(
        name="synthetic",
        train=train,
        val=draw(int(data_cfg.get("val_size") or 5 * num_classes), 2),
        test=draw(int(data_cfg.get("test_size") or 5 * num_classes), 3),
        num_classes=num_classes,
        image_size=size,
        mean=mean,
        std=std,
        class_names=[f"class_{i}" for i in range(num_classes)],
    )
