"""Training throughput: device-resident loader vs a plain torchvision DataLoader pipeline.

Prints one JSON object. For each preset it times the same training step (AdamW, label smoothing,
bf16 autocast and channels_last on GPU) fed by (a) trainables.loader.DeviceLoader and (b) a
torchvision DataLoader with per-image PIL transforms (RandomCrop(32, padding=4), flip, ToTensor,
Normalize) in worker processes; plus each loader alone, without the model.

    python benchmarks/train_throughput.py --presets cct_7_3x1,cct_narrow --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from torch.utils.data import DataLoader, Dataset

from trainables.data import AugmentConfig
from trainables.loader import DeviceLoader
from trainables.models import build_model, count_params


class ArrayImages(Dataset):
    """uint8 NHWC images with per-image PIL transforms: the usual torchvision pipeline."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean, std) -> None:
        self.images, self.labels = images, labels
        self.transform = T.Compose(
            [
                T.ToPILImage(),
                T.RandomCrop(32, padding=4),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(mean, std),
            ]
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), int(self.labels[i])


def load_images(n: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Real CIFAR-100 training images when DATA_DIR is set, else random uint8 images of the same shape."""
    if os.environ.get("DATA_DIR"):
        from trainables.data import DataConfig, load_splits

        splits = load_splits(DataConfig(name="cifar100", train_size=n))
        return splits.train.images, splits.train.labels, "cifar100"
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 100, n), "random-uint8"


def time_steps(model, batches, device, steps: int, warmup: int, autocast: bool, channels_last: bool) -> float:
    """Images per second over ``steps`` training steps after ``warmup`` steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    seen, start = 0, None
    for i, (x, y) in enumerate(batches):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, seen = time.perf_counter(), 0
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(x).float(), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(y)
        if i + 1 == warmup + steps:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def time_loader_only(batches, device, steps: int) -> float:
    seen, start = 0, time.perf_counter()
    for i, (x, _) in enumerate(batches):
        x = x.to(device, non_blocking=True)
        seen += len(x)
        if i + 1 == steps:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def endless(make):
    while True:
        yield from make()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="cct_7_3x1,cct_narrow")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--images", type=int, default=10000)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    if gpu:
        torch.backends.cudnn.benchmark = True
    images, labels, source = load_images(args.images)
    mean, std = (0.507, 0.487, 0.441), (0.267, 0.256, 0.276)
    device_loader = DeviceLoader(
        images,
        labels,
        batch_size=args.batch,
        device=device,
        mean=mean,
        std=std,
        num_classes=100,
        augment=AugmentConfig(flip=True, translate=4),
        shuffle=True,
        drop_last=True,
    )
    plain_loader = DataLoader(
        ArrayImages(images, labels, mean, std),
        batch_size=args.batch,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        pin_memory=gpu,
        persistent_workers=args.workers > 0,
    )
    report = {
        "device": torch.cuda.get_device_name(0)
        if gpu
        else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "data": source,
        "batch": args.batch,
        "timed_steps": args.steps,
        "plain_loader_workers": args.workers,
        "loader_only_images_per_sec": {
            "device_loader": time_loader_only(endless(lambda: iter(device_loader)), device, args.steps * 3),
            "torchvision_dataloader": time_loader_only(endless(lambda: iter(plain_loader)), device, args.steps * 3),
        },
        "presets": {},
    }
    for preset in args.presets.split(","):
        result = {}
        for name, loader in (("device_loader", device_loader), ("torchvision_dataloader", plain_loader)):
            torch.manual_seed(0)
            model = build_model({"preset": preset, "num_classes": 100}).to(device)
            if gpu:
                model = model.to(memory_format=torch.channels_last)
            result[name] = time_steps(model, endless(lambda: iter(loader)), device, args.steps, args.warmup, gpu, gpu)  # noqa: B023 - called within this iteration
        result["params"] = count_params(model)
        result["speedup"] = result["device_loader"] / result["torchvision_dataloader"]
        report["presets"][preset] = result
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
