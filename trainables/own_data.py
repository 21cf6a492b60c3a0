"""Your own images: a class-per-folder tree (``imagefolder``) or Parquet files (``parquet``).

    data: {name: imagefolder, path: DIR}     # DIR/train/<class>/*.png|jpg, DIR/test/<class>/..., DIR/val/... optional
    data: {name: parquet, path: DIR, image_column: image, label_column: label}
                                             # DIR/train-*.parquet, DIR/test-*.parquet, DIR/validation-*.parquet optional

Classes are the sorted folder names of ``train/`` (imagefolder) or the sorted distinct labels of the
training files (parquet: integers or strings). Images keep their size, which must be one square size
throughout unless ``resize: N`` scales every image to N x N. Without a validation split, validation
images are held out of train as for CIFAR-100 (``val_size``, default a tenth). Decoded arrays are
cached like the built-in sets'. Every problem is one line naming the folder or file.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Protocol

import numpy as np

from trainables.decoded_cache import DataError, atomic_save, cache_dir


class DataConfig(Protocol):
    """The settings of ``trainables.data.DataConfig`` this module reads."""

    name: str
    path: str | None
    image_column: str
    label_column: str
    resize: int | None


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
SPLIT_FOLDERS = {"train": "train", "validation": "val", "test": "test"}


def own_root(cfg: DataConfig) -> Path:
    """``data.path`` as an existing folder."""
    if not cfg.path:
        raise DataError(f"data.path: {cfg.name} data needs the folder that holds it")
    root = Path(cfg.path).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"data.path: {root} is not a folder")
    return root


# ---------------------------------------------------------------- what the files hold, cheaply


def _class_folders(root: Path, split: str) -> dict[str, list[Path]]:
    folder = root / SPLIT_FOLDERS[split]
    classes = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(f for f in sub.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"data.path: class folder {sub} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        classes[sub.name] = files
    if not classes:
        raise DataError(f"data.path: {folder} has no class folders")
    return classes


def _shards(root: Path, split: str) -> list[Path]:
    return sorted(root.glob(f"{split}-*.parquet"))


def own_splits(cfg: DataConfig) -> tuple[str, ...]:
    """The splits present: train and test always, validation where the files have one."""
    root = own_root(cfg)
    if cfg.name == "imagefolder":
        for split in ("train", "test"):
            if not (root / SPLIT_FOLDERS[split]).is_dir():
                raise DataError(f"data.path: {root} has no {SPLIT_FOLDERS[split]}/ folder of class folders")
        return ("train", "validation", "test") if (root / "val").is_dir() else ("train", "test")
    for split in ("train", "test"):
        if not _shards(root, split):
            raise DataError(f"data.path: no {root / split}-*.parquet file")
    return ("train", "validation", "test") if _shards(root, "validation") else ("train", "test")


def class_names(cfg: DataConfig) -> list[str]:
    """The classes, from the training split's folders or labels."""
    root = own_root(cfg)
    if cfg.name == "imagefolder":
        return list(_class_folders(root, "train"))
    labels = sorted({v for shard in _shards(root, "train") for v in _read_column(shard, cfg.label_column)})
    return [str(v) for v in labels]


def own_shape(cfg: DataConfig) -> tuple[int, int]:
    """(classes, image size) without decoding the whole set: ``resize``, else the first image's size."""
    own_splits(cfg)
    names = class_names(cfg)
    if len(names) < 2:
        raise DataError(f"data.path: {own_root(cfg)} holds {len(names)} class; a classifier needs 2 or more")
    if cfg.resize:
        return len(names), cfg.resize
    first = _first_image(cfg)
    return len(names), first.shape[0]


def _first_image(cfg: DataConfig) -> np.ndarray:
    root = own_root(cfg)
    if cfg.name == "imagefolder":
        path = next(iter(_class_folders(root, "train").values()))[0]
        return _decode(path.read_bytes(), str(path), None)
    shard = _shards(root, "train")[0]
    return _decode(_cell_bytes(_read_column(shard, cfg.image_column, 1)[0], shard), f"{shard} row 0", None)


# ---------------------------------------------------------------- decoding


def _decode(data: bytes, where: str, resize: int | None) -> np.ndarray:
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        if resize:
            image = image.resize((resize, resize), Image.BILINEAR)
        array = np.asarray(image)
    except Exception as exc:  # noqa: BLE001 - PIL raises several types for bad files
        raise DataError(f"data file {where}: cannot be decoded as an image ({type(exc).__name__})") from None
    if array.shape[0] != array.shape[1]:
        raise DataError(f"data file {where}: {array.shape[1]}x{array.shape[0]} px is not square; set data.resize")
    return array


def _read_column(shard: Path, column: str, rows: int | None = None) -> list:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(shard).names
        if column not in names:
            raise DataError(f"data file {shard}: no column {column!r} (columns: {', '.join(names)})")
        table = pq.read_table(shard, columns=[column])
    except OSError as exc:
        raise DataError(f"data file {shard}: cannot be read as Parquet ({exc})") from None
    values = table.column(column).to_pylist()
    return values if rows is None else values[:rows]


def _cell_bytes(cell, shard: Path) -> bytes:
    """An image cell: raw bytes or Hugging Face's ``{"bytes": ...}``."""
    if isinstance(cell, dict):
        cell = cell.get("bytes")
    if not isinstance(cell, bytes):
        raise DataError(f"data file {shard}: image cells must hold encoded image bytes, got {type(cell).__name__}")
    return cell


def _stack(images: list[np.ndarray], wheres: list[str]) -> np.ndarray:
    size = images[0].shape
    for image, where in zip(images, wheres):
        if image.shape != size:
            raise DataError(
                f"data file {where}: {image.shape[1]}x{image.shape[0]} px, but {wheres[0]} is "
                f"{size[1]}x{size[0]}; set data.resize to one size"
            )
    return np.stack(images)


def _load_split(cfg: DataConfig, split: str, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    root = own_root(cfg)
    index = {name: i for i, name in enumerate(names)}
    images, labels, wheres = [], [], []
    if cfg.name == "imagefolder":
        for name, files in _class_folders(root, split).items():
            if name not in index:
                raise DataError(f"data.path: class folder {root / SPLIT_FOLDERS[split] / name} is not a training class")
            for path in files:
                images.append(_decode(path.read_bytes(), str(path), cfg.resize))
                labels.append(index[name])
                wheres.append(str(path))
    else:
        for shard in _shards(root, split):
            cells, values = _read_column(shard, cfg.image_column), _read_column(shard, cfg.label_column)
            for row, (cell, value) in enumerate(zip(cells, values)):
                if str(value) not in index:
                    raise DataError(f"data file {shard}: label {value!r} of row {row} is not a training label")
                images.append(_decode(_cell_bytes(cell, shard), f"{shard} row {row}", cfg.resize))
                labels.append(index[str(value)])
                wheres.append(f"{shard} row {row}")
    if not images:
        raise DataError(f"data.path: the {split} split of {root} holds no images")
    return _stack(images, wheres), np.asarray(labels, dtype=np.int64)


def load_own_raw(cfg: DataConfig) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """Every split as (uint8 images, labels), decoded once and cached; and the class names."""
    names = class_names(cfg)
    raw = {}
    for split in own_splits(cfg):
        root = own_root(cfg)
        files = (
            [f for files in _class_folders(root, split).values() for f in files]
            if cfg.name == "imagefolder"
            else _shards(root, split)
        )
        stamp = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
        options = [cfg.name, cfg.resize, cfg.image_column, cfg.label_column, names]
        key = hashlib.sha1(json.dumps([stamp, options]).encode()).hexdigest()[:16]
        cached_x, cached_y = (cache_dir() / f"own-{split}-{key}-{part}.npy" for part in ("images", "labels"))
        if not (cached_x.exists() and cached_y.exists()):
            images, labels = _load_split(cfg, split, names)
            atomic_save(cached_y, labels)
            atomic_save(cached_x, images)
        raw[split] = (np.load(cached_x, mmap_mode="r"), np.load(cached_y))
    return raw, names
