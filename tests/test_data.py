"""Data loading, splits, caching and the device-resident loader."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from trainables.data import AugmentConfig, DataConfig, DataError, load_splits
from trainables.loader import DeviceLoader


def cifar_cfg(data_dir, **extra) -> DataConfig:
    return DataConfig.parse({"name": "cifar100", "data_dir": str(data_dir), "val_size": 5000, "val_seed": 0, **extra})


def test_synthetic_is_deterministic_and_balanced():
    cfg = DataConfig(name="synthetic", num_classes=5, image_size=12, train_size=100, val_size=25, test_size=25)
    a, b = load_splits(cfg), load_splits(cfg)
    assert a.train.images.shape == (100, 12, 12, 3) and a.train.images.dtype == np.uint8
    assert np.array_equal(a.train.images, b.train.images)
    assert np.bincount(a.train.labels).tolist() == [20] * 5
    assert not np.array_equal(a.train.images[:25], a.test.images)


def test_cifar100_official_split_and_heldout_validation(data_dir):
    splits = load_splits(cifar_cfg(data_dir, train_size=2000))
    assert splits.num_classes == 100 and splits.image_size == 32
    assert len(splits.val) == 5000 and len(splits.test) == 10000 and len(splits.train) == 2000
    assert splits.train.images.shape[1:] == (32, 32, 3)
    # validation rows are held out of train, chosen by val_seed only
    assert not set(splits.val.indices) & set(splits.train.indices)
    again = load_splits(cifar_cfg(data_dir, train_size=500))
    assert np.array_equal(again.val.indices, splits.val.indices)
    assert set(np.unique(splits.test.labels)) == set(range(100))
    assert len(splits.class_names) == 100


def test_flowers102_uses_official_validation(data_dir):
    splits = load_splits(DataConfig(name="flowers102", data_dir=str(data_dir), val_size=None))
    assert splits.image_size == 64 and splits.num_classes == 102
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1020, 1020, 6149)


def test_corrupt_parquet_names_the_file(data_dir, tmp_path):
    fake = tmp_path / "cifar100"
    fake.mkdir()
    shutil.copy(data_dir / "cifar100" / "test-00000-of-00001.parquet", fake)
    (fake / "train-00000-of-00001.parquet").write_bytes(b"not a parquet file")
    with pytest.raises(DataError, match="train-00000-of-00001.parquet"):
        load_splits(cifar_cfg(tmp_path))


def test_missing_data_names_data_dir_and_torchvision(tmp_path, monkeypatch):
    monkeypatch.delenv("DATA_DIR", raising=False)
    with pytest.raises(DataError, match="DATA_DIR.*torchvision"):
        load_splits(DataConfig(torchvision_root=str(tmp_path / "tv"), val_size=10))
    with pytest.raises(DataError, match="no .*train-\\*.parquet"):
        load_splits(DataConfig(data_dir=str(tmp_path), val_size=10))


def make_loader(augment: AugmentConfig | None, seed: int = 0, **kw) -> DeviceLoader:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(64, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(64) % 4
    return DeviceLoader(
        images,
        labels,
        batch_size=16,
        device=torch.device("cpu"),
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        num_classes=4,
        augment=augment,
        shuffle=augment is not None,
        seed=seed,
        **kw,
    )


def test_loader_without_augmentation_normalises_exactly():
    loader = make_loader(None)
    x, y = next(iter(loader))
    expected = (torch.from_numpy(loader.images[:16].numpy()).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    assert torch.allclose(x, expected) and y.tolist() == [i % 4 for i in range(16)]
    assert len(loader) == 4


def test_translation_is_a_bounded_shift_and_seeded():
    loader = make_loader(AugmentConfig(flip=False, translate=2))
    loader.shuffle = False
    x, _ = next(iter(loader))
    original = loader.images[:16].permute(0, 3, 1, 2).float()
    shifted = x * 0.25 + 0.5  # undo normalisation -> pixels in 0..1
    for i in range(16):
        padded = torch.nn.functional.pad(original[i] / 255, (2, 2, 2, 2))
        matches = [
            torch.allclose(shifted[i], padded[:, dy : dy + 8, dx : dx + 8], atol=1e-6)
            for dy in range(5)
            for dx in range(5)
        ]
        assert any(matches), f"sample {i} is not a shift of at most 2 px"
    again, _ = next(iter(make_loader(AugmentConfig(flip=True, translate=2))))
    same, _ = next(iter(make_loader(AugmentConfig(flip=True, translate=2))))
    other, _ = next(iter(make_loader(AugmentConfig(flip=True, translate=2), seed=1)))
    assert torch.equal(again, same) and not torch.equal(again, other)


CCT_AUGMENT = dict(
    flip=True, translate=4, rand_augment={"num_ops": 2, "magnitude": 9}, erasing=0.25, mixup=0.8, cutmix=1.0
)


def test_full_cct_augmentation_is_per_sample_and_resumes_exactly():
    """RandAugment and erasing through the loader: every sample its own draw, the same batches
    after restoring both generators' states (what a resumed checkpoint does)."""
    augment = AugmentConfig.parse(CCT_AUGMENT)
    rng = np.random.default_rng(0)
    one = rng.integers(0, 256, size=(1, 16, 16, 3), dtype=np.uint8)
    loader = DeviceLoader(
        np.repeat(one, 32, axis=0),
        np.zeros(32, dtype=np.int64),
        batch_size=32,
        device=torch.device("cpu"),
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        num_classes=4,
        augment=augment.replace(mixup=0.0, cutmix=0.0),
        shuffle=True,
    )
    x, _ = next(iter(loader))
    assert len({tuple(sample.flatten().tolist()) for sample in x}) > 24  # one image, (almost) all different
    mixing = make_loader(augment)
    next(iter(mixing))
    state = {k: v.clone() for k, v in mixing.rng_state().items()}
    first = list(mixing)
    mixing.set_rng_state(state)
    again = list(mixing)
    for (xa, ya), (xb, yb) in zip(first, again):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_mixup_and_cutmix_give_soft_targets_that_sum_to_one():
    for aug in (
        AugmentConfig(mixup=0.8),
        AugmentConfig(cutmix=1.0),
        AugmentConfig(mixup=0.8, cutmix=1.0, crop_scale=(0.8, 1.0)),
    ):
        x, y = next(iter(make_loader(aug)))
        assert y.shape == (16, 4) and torch.allclose(y.sum(1), torch.ones(16))
        assert x.shape == (16, 3, 8, 8) and torch.isfinite(x).all()
