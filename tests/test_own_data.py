"""Your own images (trainables/own_data.py): a class-per-folder tree and Parquet files load as splits,
with the same one-line errors as the built-in sets."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from trainables.data import DataConfig, DataError, check_data_available, dataset_shape, load_splits

COLOURS = {"cat": (200, 40, 40), "dog": (40, 200, 40), "owl": (40, 40, 200)}


def png(colour, size: int = 12) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), colour, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def image_tree(root, per_class: dict[str, int] | None = None, size: int = 12):
    for split, count in (("train", 10), ("test", 3)):
        for name, colour in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range((per_class or {}).get(name, count)):
                (folder / f"{i}.png").write_bytes(png(colour, size))
    return root


def parquet_files(root, labels_as_names: bool = False):
    root.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", 10), ("test", 3)):
        rows = [
            (png(c), name if labels_as_names else i)
            for i, (name, c) in enumerate(COLOURS.items())
            for _ in range(count)
        ]
        table = pa.table({"picture": [{"bytes": b} for b, _ in rows], "y": [y for _, y in rows]})
        pq.write_table(table, root / f"{split}-00000.parquet")
    return root


def test_an_image_folder_loads_as_splits_with_its_class_names(tmp_path):
    cfg = DataConfig.parse({"name": "imagefolder", "path": str(image_tree(tmp_path / "pets"))})
    assert dataset_shape(cfg) == (3, 12)
    splits = load_splits(cfg)
    assert splits.class_names == ["cat", "dog", "owl"] and splits.num_classes == 3 and splits.image_size == 12
    assert len(splits.train) + len(splits.val) == 30 and len(splits.val) == 3 and len(splits.test) == 9
    for split in (splits.train, splits.val, splits.test):  # each image's colour is its class
        np.testing.assert_array_equal(split.images[:, 0, 0, :], np.array(list(COLOURS.values()))[split.labels])


@pytest.mark.parametrize("labels_as_names", [False, True])
def test_parquet_files_with_named_columns_load_as_splits(tmp_path, labels_as_names):
    root = parquet_files(tmp_path / "pq", labels_as_names)
    cfg = DataConfig.parse({"name": "parquet", "path": str(root), "image_column": "picture", "label_column": "y"})
    splits = load_splits(cfg)
    assert splits.num_classes == 3 and len(splits.test) == 9
    expected = sorted(COLOURS) if labels_as_names else ["0", "1", "2"]
    assert splits.class_names == expected
    colours = np.array([COLOURS[n] for n in sorted(COLOURS)] if labels_as_names else list(COLOURS.values()))
    np.testing.assert_array_equal(splits.test.images[:, 0, 0, :], colours[splits.test.labels])


def test_resize_makes_mixed_sizes_one(tmp_path):
    root = image_tree(tmp_path / "pets")
    (root / "train" / "cat" / "big.png").write_bytes(png(COLOURS["cat"], 20))
    with pytest.raises(DataError, match=r"big.png: 20x20 px, but .* is 12x12; set data.resize"):
        load_splits(DataConfig.parse({"name": "imagefolder", "path": str(root)}))
    splits = load_splits(DataConfig.parse({"name": "imagefolder", "path": str(root), "resize": 16}))
    assert splits.image_size == 16 and splits.train.images.shape[1:] == (16, 16, 3)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: root, "data.path: {root} is not a folder"),
        (lambda root: (root / "train").mkdir(parents=True) or root, "data.path: {root} has no test/ folder"),
        (lambda root: image_tree(root, {"dog": 0}), "data.path: class folder {root}/train/dog holds no images"),
        (
            lambda root: image_tree(root).joinpath("train/cat/0.png").write_bytes(b"nope") and root,
            "data file {root}/train/cat/0.png: cannot be decoded",
        ),
    ],
)
def test_a_bad_image_folder_is_one_line_naming_it(tmp_path, make, message):
    root = make(tmp_path / "pets")
    cfg = DataConfig.parse({"name": "imagefolder", "path": str(tmp_path / "pets")})
    with pytest.raises(DataError) as err:
        check_data_available(cfg)
        load_splits(cfg)
    assert str(err.value).startswith(message.format(root=tmp_path / "pets")), str(err.value)
    assert "\n" not in str(err.value) and root


def test_a_parquet_column_that_is_not_there_is_named(tmp_path):
    root = parquet_files(tmp_path / "pq")
    cfg = DataConfig.parse({"name": "parquet", "path": str(root), "image_column": "img"})
    with pytest.raises(DataError, match=r"train-00000.parquet: no column 'label' \(columns: picture, y\)"):
        dataset_shape(cfg)


def test_own_data_needs_its_path():
    with pytest.raises(Exception, match="path"):
        DataConfig.parse({"name": "imagefolder"})
