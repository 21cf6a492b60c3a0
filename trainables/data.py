"""Datasets as uint8 arrays: CIFAR-100 and Flowers-102 from Parquet shards (or torchvision), your own
images (``imagefolder`` / ``parquet``: trainables/own_data.py), and a class-conditional synthetic set
for tests.

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

from trainables.augment import RandAugmentConfig
from trainables.decoded_cache import DataError, atomic_save, cache_dir
from trainables.own_data import load_own_raw, own_shape, own_splits
from trainables.schema import InputError, Settings, seed_setting, setting

OWN_DATASETS = ("imagefolder", "parquet")  # a user's own images under data.path
KNOWN_DATASETS = ("cifar100", "flowers102", "synthetic", *OWN_DATASETS)
# Fixed shape of each real dataset: (classes, image size).
DATASET_SHAPES = {"cifar100": (100, 32), "flowers102": (102, 64)}
# Images in each official split: sizes are checked against them when a config is read.
DATASET_SPLITS = {
    "cifar100": {"train": 50000, "test": 10000},
    "flowers102": {"train": 1020, "validation": 1020, "test": 6149},
}
DEFAULT_HELD_OUT = 5000  # validation images held out of train where a dataset has no official split
PARQUET_COLUMNS = {"cifar100": ("img", "fine_label"), "flowers102": ("image", "label")}


@dataclass(frozen=True)
class AugmentConfig(Settings):
    """Training augmentation, applied on the training device to whole batches."""

    flip: bool = setting(True, "random horizontal flips")
    translate: int = setting(4, "random shifts of up to this many pixels", low=0)
    crop_scale: tuple[float, float] | None = setting(None, "random-resized-crop area range [low, high]")
    rand_augment: RandAugmentConfig | None = setting(
        None, "per-sample RandAugment (CCT recipe: {num_ops: 2, magnitude: 9, magnitude_std: 0.5}; null: off)"
    )
    erasing: float = setting(
        0.0, "random-erasing probability per image, after normalisation (CCT recipe: 0.25)", low=0, high=1
    )
    mixup: float = setting(0.0, "mixup alpha (0: off)", low=0)
    cutmix: float = setting(0.0, "cutmix alpha (0: off)", low=0)

    @property
    def mixes(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def check(self) -> None:
        scale = self.crop_scale
        if scale is not None and not (len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
            raise InputError("crop_scale", f"must be [low, high] within (0, 1], got {list(scale)}")


@dataclass(frozen=True)
class DataConfig(Settings):
    """Which dataset, where it lives, and how it is split and subset."""

    SECTION = "data"

    name: str = setting("cifar100", choices=KNOWN_DATASETS)
    data_dir: str | None = setting(None, "Parquet root (default: the DATA_DIR environment variable)")
    torchvision_root: str | None = None
    path: str | None = setting(None, "imagefolder / parquet: the folder holding your images")
    image_column: str = setting("image", "parquet: the column of encoded images")
    label_column: str = setting("label", "parquet: the column of labels (integers or names)")
    resize: int | None = setting(None, "imagefolder / parquet: scale every image to N x N px", low=4)
    train_size: int | None = setting(None, "first N training images (default: all)", low=1)
    val_size: int | None = setting(
        None,
        "images held out of train for validation (default 5000); with an "
        "official validation split (Flowers-102): its first N (default: all)",
        low=1,
    )
    test_size: int | None = setting(None, "first N test images (default: all)", low=1)
    val_seed: int = seed_setting(0, "seed of the held-out validation draw (fixed across trials)")
    num_classes: int = setting(10, "synthetic data only", low=2)
    image_size: int = setting(32, "synthetic data only", low=4)
    synthetic_seed: int = seed_setting(0, "synthetic data only")
    synthetic_noise: float = setting(40.0, low=0)
    normalize: str = setting("dataset", "dataset: per-channel statistics; unit: [-1, 1]", choices=("dataset", "unit"))
    augment: AugmentConfig = setting(factory=AugmentConfig)

    def check(self) -> None:
        """Sizes within what the dataset holds (real data), or within this machine's memory (synthetic)."""
        if self.name == "synthetic":
            self._check_synthetic_memory()
            return
        if self.name in OWN_DATASETS:  # sizes are checked against the files when they are read
            if not self.path:
                raise InputError("path", f"{self.name} data needs the folder that holds it")
            return
        splits = DATASET_SPLITS[self.name]
        train = splits["train"]
        if "validation" in splits:
            _at_most("val_size", self.val_size, splits["validation"], f"{self.name}'s validation images")
            held_out = ""
        else:
            if self.val_size is None:
                object.__setattr__(self, "val_size", DEFAULT_HELD_OUT)
            if self.val_size >= train:
                raise InputError("val_size", f"{self.val_size:,} leaves no training image ({self.name} has {train:,})")
            train -= self.val_size
            held_out = f" after {self.val_size:,} held out for validation"
        _at_most("train_size", self.train_size, train, f"{self.name}'s training images{held_out}")
        _at_most("test_size", self.test_size, splits["test"], f"{self.name}'s test images")

    def _check_synthetic_memory(self) -> None:
        counts = (
            self.train_size or 20 * self.num_classes,
            self.val_size or 5 * self.num_classes,
            self.test_size or 5 * self.num_classes,
        )
        needed = sum(counts) * self.image_size**2 * 3
        available = _memory_bytes()
        if available and needed > available / 2:
            raise InputError(
                "train_size" if counts[0] == max(counts) else "image_size",
                f"{sum(counts):,} synthetic images of {self.image_size}x{self.image_size} px need "
                f"{needed / 2**30:,.1f} GiB; this machine has {available / 2**30:,.1f} GiB of memory",
            )


def _at_most(name: str, size: int | None, available: int, what: str) -> None:
    if size is not None and size > available:
        raise InputError(name, f"{size:,} is more than {what} ({available:,})")


def _memory_bytes() -> int | None:
    """Physical memory of this machine, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


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


def dataset_shape(data_cfg: DataConfig) -> tuple[int, int]:
    """(num_classes, image_size) of the configured dataset without loading it."""
    if data_cfg.name == "synthetic":
        return data_cfg.num_classes, data_cfg.image_size
    if data_cfg.name in OWN_DATASETS:
        return own_shape(data_cfg)
    return DATASET_SHAPES[data_cfg.name]


def resolve_data_dir(data_cfg: DataConfig) -> Path | None:
    """The Parquet root: ``data.data_dir``, else the DATA_DIR environment variable, else None."""
    root = data_cfg.data_dir or os.environ.get("DATA_DIR")
    return Path(root).expanduser().resolve() if root else None


def dataset_folder(data_cfg: DataConfig) -> Path | None:
    """The folder a dataset's files are in (None for synthetic data or a torchvision download)."""
    if data_cfg.name in OWN_DATASETS:
        return Path(data_cfg.path).expanduser().resolve() if data_cfg.path else None
    root = resolve_data_dir(data_cfg)
    return root / data_cfg.name if root is not None and data_cfg.name != "synthetic" else None


def check_data_available(data_cfg: DataConfig) -> None:
    """Raise DataError naming DATA_DIR and the torchvision root when a real dataset cannot be found.

    Cheap: looks at file names only; corrupt files are caught when they are read.
    """
    name = data_cfg.name
    if name == "synthetic":
        return
    if name in OWN_DATASETS:
        own_splits(data_cfg)
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


def load_splits(data_cfg: DataConfig, seed: int = 0) -> Splits:
    """Load, split and subset a dataset as configured.

    The validation split is held out from train with ``data.val_seed`` (fixed, independent of the
    training seed) unless the dataset has an official one (Flowers-102). ``train_size``,
    ``val_size`` and ``test_size`` take deterministic subsets.
    """
    check_data_available(data_cfg)
    name = data_cfg.name
    if name == "synthetic":
        return _synthetic_splits(data_cfg)
    if name in OWN_DATASETS:
        raw, class_names = load_own_raw(data_cfg)
        num_classes, image_size = len(class_names), raw["train"][0].shape[1]
    else:
        raw, class_names = _load_raw(name, data_cfg), _class_names(name, data_cfg)
        num_classes, image_size = DATASET_SHAPES[name]
    train_x, train_y = raw["train"]
    rng = np.random.default_rng(data_cfg.val_seed)
    order = rng.permutation(len(train_y))
    if "validation" in raw:
        val_x, val_y = raw["validation"]
        val_idx = np.arange(len(val_y))
        train_idx = order
    else:
        n_val = data_cfg.val_size or (max(1, len(train_y) // 10) if name in OWN_DATASETS else 0)
        if not 0 < n_val < len(train_y):
            raise DataError(f"data.val_size: must be in 1..{len(train_y) - 1} for {name}, got {n_val}")
        val_idx, train_idx = np.sort(order[:n_val]), order[n_val:]
        val_x, val_y = train_x, train_y
    train_idx = _take(train_idx, data_cfg.train_size, "train_size", name)
    val_idx = _take(val_idx, data_cfg.val_size if "validation" in raw else None, "val_size", name)
    test_x, test_y = raw["test"]
    test_idx = _take(np.arange(len(test_y)), data_cfg.test_size, "test_size", name)
    train = ArraySplit(np.ascontiguousarray(train_x[train_idx]), train_y[train_idx].astype(np.int64), train_idx)
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
        class_names=class_names,
    )


def _take(indices: np.ndarray, size: int | None, field: str, name: str) -> np.ndarray:
    """The first ``size`` of ``indices``; a size beyond what the data folder holds is a DataError."""
    if size is not None and size > len(indices):
        raise DataError(f"data.{field}: {size:,} is more than the {len(indices):,} images the {name} files hold")
    return indices if size is None else indices[:size]


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    sample = images[:: max(1, len(images) // 10000)].reshape(-1, 3).astype(np.float64) / 255.0
    return tuple(float(v) for v in sample.mean(0)), tuple(float(v) for v in sample.std(0) + 1e-6)


# ---------------------------------------------------------------- Parquet shards


def _parquet_splits(name: str) -> tuple[str, ...]:
    return ("train", "validation", "test") if name == "flowers102" else ("train", "test")


def _shards(root: Path, name: str, split: str) -> list[Path]:
    return sorted((root / name).glob(f"{split}-*.parquet"))


def _load_raw(name: str, data_cfg: DataConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
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
    atomic_save(cached_y, labels)
    atomic_save(cached_x, images)
    return np.load(cached_x, mmap_mode="r"), labels


def _decode_shards(shards: list[Path], name: str) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow.parquet as pq
    from PIL import Image

    image_col, label_col = PARQUET_COLUMNS[name]
    num_classes, size = DATASET_SHAPES[name]
    images, labels = [], []
    for shard in shards:
        try:
            table = pq.read_table(shard, columns=[image_col, label_col])
        except Exception as exc:  # pyarrow raises several types for damaged files
            raise DataError(f"data file {shard}: cannot be read as Parquet ({type(exc).__name__}: {exc})") from None
        for cell, label in zip(table.column(image_col).to_pylist(), table.column(label_col).to_pylist()):
            try:
                image = np.asarray(Image.open(io.BytesIO(cell["bytes"])).convert("RGB"))
            except Exception as exc:
                raise DataError(f"data file {shard}: an image cannot be decoded ({exc})") from None
            if image.shape != (size, size, 3):
                raise DataError(
                    f"data file {shard}: image {len(images)} is {image.shape[1]}x{image.shape[0]} px, "
                    f"{name} images are {size}x{size}"
                )
            if not isinstance(label, int) or not 0 <= label < num_classes:
                raise DataError(
                    f"data file {shard}: label {label!r} of image {len(images)} is outside 0..{num_classes - 1}"
                )
            images.append(image)
            labels.append(label)
    if not images:
        raise DataError(f"data file {shards[0] if shards else name}: holds no images")
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def _class_names(name: str, data_cfg: DataConfig) -> list[str]:
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


def _torchvision_root(data_cfg: DataConfig) -> Path:
    return Path(data_cfg.torchvision_root or cache_dir() / "torchvision")


def _load_torchvision(name: str, data_cfg: DataConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
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


def _synthetic_splits(data_cfg: DataConfig) -> Splits:
    """Class-conditional images: each class is a smooth random colour pattern; samples add a random
    shift, a brightness change and pixel noise. Learnable in seconds, yet not trivially separable."""
    num_classes, size = dataset_shape(data_cfg)
    rng = np.random.default_rng(data_cfg.synthetic_seed)
    coarse = rng.uniform(0, 255, size=(num_classes, 4, 4, 3))
    reps = -(-size // 4)
    prototypes = np.kron(coarse, np.ones((reps, reps, 1)))[:, :size, :size]
    noise = data_cfg.synthetic_noise

    def draw(n: int, offset: int) -> ArraySplit:
        local = np.random.default_rng([data_cfg.synthetic_seed, offset])
        labels = np.arange(n) % num_classes
        local.shuffle(labels)
        shifts = local.integers(-2, 3, size=(n, 2))
        images = np.empty((n, size, size, 3), dtype=np.uint8)
        for i, (label, (dy, dx)) in enumerate(zip(labels, shifts)):
            img = np.roll(prototypes[label], (dy, dx), axis=(0, 1)) * local.uniform(0.7, 1.3)
            images[i] = np.clip(img + local.normal(0, noise, img.shape), 0, 255).astype(np.uint8)
        return ArraySplit(images, labels.astype(np.int64), np.arange(n))

    train = draw(data_cfg.train_size or 20 * num_classes, 1)
    mean, std = _channel_stats(train.images)
    return Splits(
        name="synthetic",
        train=train,
        val=draw(data_cfg.val_size or 5 * num_classes, 2),
        test=draw(data_cfg.test_size or 5 * num_classes, 3),
        num_classes=num_classes,
        image_size=size,
        mean=mean,
        std=std,
        class_names=[f"class_{i}" for i in range(num_classes)],
    )
