"""Where the device loader's augmentation spends its time on the CPU, op by op.

    PYTHONPATH=. .venv/bin/python benchmarks/augment_ops.py [--batch 256] [--size 32] [--repeats 10]
                                                            [--batches 2] [--threads N]

Times, on one batch of random uint8 images: every RandAugment op of ``trainables.augment`` applied to
all samples (magnitude 9, random signs); ``rand_augment`` with 2 ops per sample along both of its
dispatch paths (per-op sample subsets, the CPU default, and whole-batch masks, the CUDA default); each
stage of a ``DeviceLoader`` pass with the CCT augmentation of ``benchmarks/gpu_suite.py`` (gather,
shift, flip, RandAugment, normalisation, erasing and its noise draw alone, and mixup/cutmix, which
that recipe adds in training); the whole loader pass; and torchvision's v2 transforms of the same augmentation applied
image by image to the same images, plus (at 32 px) gpu_suite's own PIL DataLoader baseline.
Prints one JSON object: best-of-``--repeats`` milliseconds per batch, images/s per pipeline, the
torch version, the CPU model and torch's thread count.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import replace

import numpy as np
import torch

from benchmarks.gpu_suite import CCT_MIXING, MEAN, STD, HostPipeline, Scale, job
from trainables.augment import OPS, RandAugmentConfig, apply_op, apply_rand_augment, draw_rand_augment
from trainables.loader import DeviceLoader

NUM_CLASSES = 100


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    """Best wall time of ``fn`` over ``repeats`` calls after one warm-up call, in milliseconds."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return round(best * 1e3, 3)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def op_timings(x: torch.Tensor, repeats: int) -> dict[str, float]:
    """ms per batch of each op applied to every sample of x (float, values 0..255)."""
    gen = torch.Generator().manual_seed(0)
    magnitude = torch.full((len(x),), 9.0)
    sign = torch.where(torch.rand(len(x), generator=gen) < 0.5, -1.0, 1.0)
    return {op: best_ms(lambda op=op: apply_op(x, op, magnitude, sign), repeats) for op in OPS}


def loader_stage_timings(loader: DeviceLoader, mixing: DeviceLoader, repeats: int) -> dict[str, float]:
    """ms per batch of each stage of one ``DeviceLoader`` batch, each timed on the previous stage's
    output (so on the memory layout it meets in the loader)."""
    aug = loader.augment
    idx = torch.arange(loader.batch_size)
    raw = loader.images[idx].permute(0, 3, 1, 2).float()
    shifted = loader._translate(raw, aug.translate)
    flipped = loader._flip(shifted)
    draw = draw_rand_augment(len(raw), aug.rand_augment, torch.Generator().manual_seed(0))
    augmented = apply_rand_augment(flipped, draw)
    normalised = loader._normalise(augmented)
    erased = loader._erase(normalised)
    return {
        "gather_to_float": best_ms(lambda: loader.images[idx].permute(0, 3, 1, 2).float(), repeats),
        "translate": best_ms(lambda: loader._translate(raw, aug.translate), repeats),
        "flip": best_ms(lambda: loader._flip(shifted), repeats),
        "rand_augment": best_ms(lambda: apply_rand_augment(flipped, draw), repeats),
        "rand_augment_masked_path": best_ms(lambda: apply_rand_augment(flipped, draw, by_index=False), repeats),
        "normalise": best_ms(lambda: loader._normalise(augmented), repeats),
        "erasing": best_ms(lambda: loader._erase(normalised), repeats),
        "erasing_noise_draw_alone": best_ms(lambda: torch.randn(normalised.shape, generator=loader.generator), repeats),
        "mixup_or_cutmix": best_ms(lambda: mixing._mix(erased, loader.labels[idx]), repeats),
    }


def images_per_sec(batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]], repeats: int) -> float:
    """Best images/s of a full pass over ``batches()`` (a fresh iterable each pass)."""
    seen = sum(len(y) for _, y in batches())
    return round(seen / best_ms(lambda: list(batches()), repeats) * 1e3, 1)


def torchvision_v2(size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The CCT augmentation as torchvision v2 transforms of one uint8 (3, size, size) tensor."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.RandomCrop(size, padding=4),
            v2.RandomHorizontalFlip(),
            v2.RandAugment(num_ops=2, magnitude=9),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
            v2.RandomErasing(p=0.25, value="random"),
        ]
    )


def per_image_batches(
    images: torch.Tensor, labels: torch.Tensor, batch: int, transform: Callable[[torch.Tensor], torch.Tensor]
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of ``transform`` applied image by image (NCHW uint8 in, float batches out)."""
    for start in range(0, len(images) - batch + 1, batch):
        stop = start + batch
        yield torch.stack([transform(image) for image in images[start:stop]]), labels[start:stop]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per measurement (best is kept)")
    parser.add_argument("--batches", type=int, default=2, help="batches per pipeline pass")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n = args.batch * args.batches
    images = rng.integers(0, 256, (n, args.size, args.size, 3), dtype=np.uint8)
    labels = rng.integers(0, NUM_CLASSES, n).astype(np.int64)

    scale = replace(Scale.for_run(True), batch=args.batch, images=n, workers=0)
    augment = job(scale, torch.device("cpu")).data.augment  # gpu_suite's CCT augmentation, resolved
    assert augment.rand_augment == RandAugmentConfig(num_ops=2, magnitude=9, magnitude_std=0.5)
    common = dict(
        batch_size=args.batch,
        device=torch.device("cpu"),
        mean=MEAN,
        std=STD,
        num_classes=NUM_CLASSES,
        shuffle=True,
        drop_last=True,
    )
    loader = DeviceLoader(images, labels, augment=augment, **common)
    mixing = DeviceLoader(images, labels, augment=replace(augment, **CCT_MIXING), **common)

    x = torch.from_numpy(images[: args.batch]).permute(0, 3, 1, 2).float().contiguous()  # as after the shift
    nchw, targets = torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(labels)
    v2 = torchvision_v2(args.size)
    rates = {
        "device_loader": images_per_sec(lambda: loader, args.repeats),
        "device_loader_with_mixing": images_per_sec(lambda: mixing, args.repeats),
        "torchvision_v2_per_image": images_per_sec(
            lambda: per_image_batches(nchw, targets, args.batch, v2), args.repeats
        ),
    }
    if args.size == 32:  # gpu_suite's baseline crops to 32 px
        rates["gpu_suite_pil_dataloader"] = images_per_sec(
            lambda: HostPipeline(images, labels, scale, loader.device), args.repeats
        )
    report = {
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "size": args.size,
        "repeats": args.repeats,
        "op_ms_per_batch": op_timings(x, args.repeats),
        "loader_stage_ms_per_batch": loader_stage_timings(loader, mixing, args.repeats),
        "images_per_sec": rates,
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
