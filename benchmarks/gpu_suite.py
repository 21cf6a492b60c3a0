"""The GPU suite: one prepared command for a bare GPU box (torch, torchvision, numpy, pyarrow, pyyaml).

    python benchmarks/make_gpu_subset.py          # here, once: the CIFAR-100 subset that travels
    python benchmarks/gpu_suite.py --out gpu_suite.json [--budget-s 420]
    python benchmarks/gpu_suite.py --tiny --out /tmp/tiny.json     # every part on the CPU in seconds

Parts (each writes its numbers into the JSON as soon as it ends, so a run stopped by a time limit
still returns what it measured):
1. ``throughput``: cct_7_3x1 training images/s (batch 128, the full CCT augmentation: shifts, flips,
   per-sample RandAugment 2 ops at magnitude 9, random erasing 0.25; AdamW, bf16 autocast,
   channels_last) fed by the device-resident loader vs a torchvision DataLoader pipeline (PIL
   ops in worker processes, pinned memory), each eager and with ``torch.compile``; achieved
   TFLOP/s (6 x MACs per image, attention matmuls included) against a measured bf16 matmul peak;
   host-device synchronisations inside the step loop (CUDA sync debug mode); recompilations
   after the first epoch.
2. ``packing``: aggregate cct_narrow training images/s of 1 vs 4 processes sharing the GPU, each
   capped at its share of GPU memory as a packed sweep trial is.
3. ``analysis``: the unit analysis of cct_7_3x1 (every tap, default readout recipe) with readouts
   on 10,000 training images and matrices on 10,000 test images: seconds per stage.
4. ``accuracy``: cct_7_3x1 trained with the full recipe on the travelling subset for as many
   epochs as the remaining budget allows: validation accuracy per epoch, final test accuracy.

Synthetic uint8 images serve the speed parts; the accuracy part needs ``benchmarks/data``
(``make_gpu_subset.py``) and falls back to class-patterned synthetic images without it. ``--tiny``
shrinks every part (cct_tiny, a few batches, compile with the "eager" backend, 2 processes) so
``make test`` runs the whole suite on the CPU and it cannot rot.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.units.pipeline import AnalysisConfig  # noqa: E402
from analysis.units.run import analyze  # noqa: E402
from trainables.config import prepare  # noqa: E402
from trainables.data import ArraySplit, Splits  # noqa: E402
from trainables.loader import DeviceLoader  # noqa: E402
from trainables.models import build_model, count_macs  # noqa: E402
from trainables.train import make_optimizer, run_job, train_epoch  # noqa: E402

# The CCT recipe's augmentation (Compact-Transformers' CIFAR-100 settings) and optimiser.
CCT_AUGMENT = {
    "flip": True,
    "translate": 4,
    "rand_augment": {"num_ops": 2, "magnitude": 9, "magnitude_std": 0.5},
    "erasing": 0.25,
}
CCT_MIXING = {"mixup": 0.8, "cutmix": 1.0}
CCT_RECIPE = {"name": "adamw_cosine", "lr": 6e-4, "weight_decay": 0.06, "min_lr": 1e-5}
MEAN, STD = (0.507, 0.487, 0.441), (0.267, 0.256, 0.276)
SUBSET_DIR = ROOT / "benchmarks" / "data"


@dataclass(frozen=True)
class Scale:
    """How big each part runs: the GPU sizes, or ``--tiny`` sizes for a CPU check."""

    preset: str
    packed_preset: str
    batch: int
    warmup_steps: int
    timed_steps: int
    images: int
    workers: int
    packed_procs: int
    packed_seconds: float
    analysis_train: int
    analysis_test: int
    readout_epochs: int | None
    compile_backend: str
    accuracy_max_epochs: int

    @classmethod
    def for_run(cls, tiny: bool) -> Scale:
        if tiny:
            return cls("cct_tiny", "cct_tiny", 32, 2, 3, 256, 0, 2, 1.0, 200, 200, 2, "eager", 2)
        return cls("cct_7_3x1", "cct_narrow", 128, 15, 60, 50000, 8, 4, 20.0, 10000, 10000, None, "inductor", 300)


def synthetic_split(n: int, seed: int, num_classes: int = 100) -> ArraySplit:
    rng = np.random.default_rng(seed)
    return ArraySplit(
        rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
        rng.integers(0, num_classes, n).astype(np.int64),
        np.arange(n),
    )


def job(scale: Scale, device: torch.device, **overrides) -> JobConfig:  # noqa: F821
    """A resolved job config of the CCT recipe on 100-class 32 px images."""
    user = {
        "model": {"preset": scale.preset},
        "data": {"name": "synthetic", "num_classes": 100, "image_size": 32, "augment": CCT_AUGMENT},
        "recipe": CCT_RECIPE,
        "batch_size": scale.batch,
        "bf16": "auto",
        "channels_last": True,
        "device": device.type,
        "epochs": 1,
        **overrides,
    }
    return prepare(user)


# ---------------------------------------------------------------- part 1: throughput


class HostPipeline:
    """A torchvision DataLoader (per-image PIL ops in worker processes) moved to the device per
    batch: what ``train_epoch`` sees as a loader."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, scale: Scale, device: torch.device) -> None:
        import torchvision.transforms as T
        from torch.utils.data import DataLoader, Dataset

        transform = T.Compose(
            [
                T.ToPILImage(),
                T.RandomCrop(32, padding=4),
                T.RandomHorizontalFlip(),
                T.RandAugment(num_ops=2, magnitude=9),
                T.ToTensor(),
                T.Normalize(MEAN, STD),
                T.RandomErasing(p=0.25, value="random"),
            ]
        )

        class Images(Dataset):
            def __len__(self) -> int:
                return len(labels)

            def __getitem__(self, i: int):
                return transform(images[i]), int(labels[i])

        self.device = device
        self.loader = DataLoader(
            Images(),
            batch_size=scale.batch,
            shuffle=True,
            drop_last=True,
            num_workers=scale.workers,
            pin_memory=device.type == "cuda",
            persistent_workers=scale.workers > 0,
        )
        self.channels_last = True

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.loader:
            x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            yield x, y.to(self.device, non_blocking=True)


class Limited:
    """The first ``steps`` batches of a loader, endlessly restarted; keeps ``device``."""

    def __init__(self, loader, steps: int) -> None:
        self.loader, self.steps, self.device = loader, steps, loader.device

    def __iter__(self):
        def endless():
            while True:
                yield from self.loader

        return islice(endless(), self.steps)


def matmul_peak_tflops(device: torch.device) -> float:
    """Achieved bf16 TFLOP/s of a large square matmul: the ceiling a training step is compared to."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 20 if device.type == "cuda" else 3
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def count_step_syncs(model, loader, optimizer, cfg, device: torch.device) -> int | None:
    """Host-device synchronisations in a few training steps (CUDA's sync debug mode), None on CPU."""
    if device.type != "cuda":
        return None
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            # train_epoch reads its metrics once at the end: that one sync is expected and excluded
            # by counting only what happens before the epoch's closing synchronize.
            for x, y in Limited(loader, 3):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = torch.nn.functional.cross_entropy(model(x).float(), y, label_smoothing=0.1)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def part_throughput(scale: Scale, device: torch.device) -> dict:
    cfg = job(scale, device)
    split = synthetic_split(scale.images, 0)
    device_loader = DeviceLoader(
        split.images,
        split.labels,
        batch_size=scale.batch,
        device=device,
        mean=MEAN,
        std=STD,
        num_classes=100,
        augment=cfg.data.augment,
        shuffle=True,
        drop_last=True,
        channels_last=True,
    )
    pipelines = {
        "device_loader": device_loader,
        "torchvision_dataloader": HostPipeline(split.images, split.labels, scale, device),
    }
    probe = build_model(cfg.model)
    macs = count_macs(probe)
    peak = matmul_peak_tflops(device)
    out = {
        "model": scale.preset,
        "batch": scale.batch,
        "macs_per_image": macs,
        "train_flops_per_image": 6 * macs,
        "bf16_matmul_peak_tflops": round(peak, 1),
        "dataloader_workers": scale.workers,
        "runs": {},
    }
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg.model).to(device).to(memory_format=torch.channels_last)
        step_model = torch.compile(model, backend=scale.compile_backend) if compiled else model
        optimizer = make_optimizer(model, cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        for name, loader in pipelines.items():
            start = time.perf_counter()
            train_epoch(step_model, Limited(loader, scale.warmup_steps), optimizer, scheduler, cfg, True)
            warm_s = time.perf_counter() - start
            graphs = compiled_graphs()
            metrics = train_epoch(step_model, Limited(loader, scale.timed_steps), optimizer, scheduler, cfg, True)
            rate = metrics["images_per_sec"]
            key = f"{name}{'_compiled' if compiled else ''}"
            out["runs"][key] = {
                "images_per_sec": round(rate, 1),
                "warmup_s": round(warm_s, 1),
                "tflops": round(rate * 6 * macs / 1e12, 2),
                "fraction_of_matmul_peak": round(rate * 6 * macs / 1e12 / peak, 4),
                "recompiles_after_warmup": compiled_graphs() - graphs if compiled else None,
            }
        if not compiled:
            out["syncs_in_3_steps"] = count_step_syncs(model, device_loader, optimizer, cfg, device)
    runs = out["runs"]
    best_device = max(runs["device_loader"]["images_per_sec"], runs["device_loader_compiled"]["images_per_sec"])
    best_host = max(
        runs["torchvision_dataloader"]["images_per_sec"], runs["torchvision_dataloader_compiled"]["images_per_sec"]
    )
    out["device_vs_dataloader"] = round(best_device / best_host, 2)
    out["best_images_per_sec"] = best_device
    return out


# ---------------------------------------------------------------- part 2: packing


def packed_worker(rank: int, procs: int, scale: Scale, device_type: str, barrier, results) -> None:
    """One packed 'trial': its share of GPU memory, its own process and stream; images/s over a window."""
    device = torch.device(device_type)
    torch.set_num_threads(1)
    if device.type == "cuda" and procs > 1:
        torch.cuda.set_per_process_memory_fraction(1 / procs)
    cfg = job(scale, device, model={"preset": scale.packed_preset})
    split = synthetic_split(scale.images // 2, rank)
    loader = DeviceLoader(
        split.images,
        split.labels,
        batch_size=scale.batch,
        device=device,
        mean=MEAN,
        std=STD,
        num_classes=100,
        augment=cfg.data.augment,
        shuffle=True,
        drop_last=True,
        channels_last=True,
    )
    torch.manual_seed(rank)
    model = build_model(cfg.model).to(device).to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    train_epoch(model, Limited(loader, scale.warmup_steps), optimizer, scheduler, cfg, True)
    barrier.wait()
    seen, start = 0, time.perf_counter()
    while time.perf_counter() - start < scale.packed_seconds:
        metrics = train_epoch(model, Limited(loader, 10), optimizer, scheduler, cfg, True)
        seen += 10 * scale.batch
        del metrics
    results.put(seen / (time.perf_counter() - start))


def packed_rate(procs: int, scale: Scale, device: torch.device) -> float:
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(procs), ctx.Queue()
    workers = [
        ctx.Process(target=packed_worker, args=(r, procs, scale, device.type, barrier, results)) for r in range(procs)
    ]
    for w in workers:
        w.start()
    rates = [results.get(timeout=600) for _ in workers]
    for w in workers:
        w.join(timeout=60)
    return sum(rates)


def part_packing(scale: Scale, device: torch.device) -> dict:
    one = packed_rate(1, scale, device)
    many = packed_rate(scale.packed_procs, scale, device)
    return {
        "model": scale.packed_preset,
        "batch": scale.batch,
        "seconds_per_window": scale.packed_seconds,
        "images_per_sec_1_process": round(one, 1),
        f"images_per_sec_{scale.packed_procs}_processes": round(many, 1),
        "packing_gain": round(many / one, 2),
    }


# ---------------------------------------------------------------- part 3: analysis


def part_analysis(scale: Scale, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = build_model({"preset": scale.preset}).to(device).eval()
    splits = Splits(
        "synthetic",
        synthetic_split(scale.analysis_train, 1),
        synthetic_split(10, 2),
        synthetic_split(scale.analysis_test, 3),
        100,
        32,
        MEAN,
        STD,
    )
    config = AnalysisConfig(device=device.type, readout_epochs=scale.readout_epochs, save_matrices=False)
    start = time.perf_counter()
    result = analyze(model, splits, config, figures=False)
    sync(device)
    seconds = time.perf_counter() - start
    units = sum(info["kinds"][kind]["summary"]["n_units"] for info in result.taps.values() for kind in info["kinds"])
    return {
        "model": scale.preset + " (random-init weights: timing only)",
        "taps": len(result.taps),
        "units": units,
        "readout_recipe": config.recipe,
        "train_images": scale.analysis_train,
        "test_images": scale.analysis_test,
        "seconds": round(seconds, 1),
        "stages_s": {k: round(v, 1) for k, v in result.meta["timings"].items()},
    }


# ---------------------------------------------------------------- part 4: accuracy


def part_accuracy(scale: Scale, device: torch.device, seconds_left: float, images_per_sec: float) -> dict:
    real = (SUBSET_DIR / "cifar100").is_dir() and scale.compile_backend == "inductor"
    data = (
        {"name": "cifar100", "data_dir": str(SUBSET_DIR), "val_size": 2000}
        if real
        else {
            "name": "synthetic",
            "num_classes": 100,
            "image_size": 32,
            "train_size": 512,
            "val_size": 128,
            "test_size": 128,
        }
    )
    train_images = (20000 - 2000) if real else 512
    # epochs that fit: training at the measured rate plus about 25 % for evaluation and compile
    epochs = int(max(1, min(scale.accuracy_max_epochs, seconds_left * images_per_sec / (1.25 * train_images))))
    cfg = prepare(
        {
            "model": {"preset": scale.preset},
            "data": {**data, "augment": {**CCT_AUGMENT, **CCT_MIXING}},
            "recipe": {**CCT_RECIPE, "warmup_epochs": max(1, round(epochs * 10 / 300))},
            "epochs": epochs,
            "batch_size": scale.batch,
            "label_smoothing": 0.1,
            "bf16": "auto",
            "channels_last": True,
            "compile": device.type == "cuda",
            "device": device.type,
            "latency": {"large_batch": 256, "repeats": 4},
        }
    )
    curve: list[float] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        summary = run_job(cfg, out, on_epoch=lambda metrics, _: curve.append(round(metrics["val_acc"], 4)))
    return {
        "model": scale.preset,
        "data": "cifar100 subset (18,000 train, 2,000 val, 2,000 test)" if real else "synthetic (no benchmarks/data)",
        "epochs": epochs,
        "recipe": "AdamW 6e-4, wd 0.06, warm-up scaled 10/300, cosine, mixup 0.8, cutmix 1.0, RandAugment "
        "2 ops m9 mstd0.5, erasing 0.25, label smoothing 0.1, bf16, compile on GPU",
        "val_acc_per_epoch": curve,
        "test_acc": round(summary["test_acc"], 4),
        "seconds": round(time.perf_counter() - start, 1),
        "train_images_per_sec": round(summary["train_images_per_sec"], 1),
    }


# ---------------------------------------------------------------- driver

GOALS = {
    "cct_7_3x1_bf16_images_per_sec": 20000,
    "device_vs_dataloader": 3.0,
    "packing_gain": 1.5,
    "analysis_seconds": 30,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="every part on a toy scale (CPU, seconds)")
    parser.add_argument("--out", default="gpu_suite.json", help="the JSON report")
    parser.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget for all parts")
    parser.add_argument("--parts", default="throughput,packing,analysis,accuracy")
    args = parser.parse_args(argv)
    wanted = args.parts.split(",")
    unknown = set(wanted) - {"throughput", "packing", "analysis", "accuracy"}
    if unknown:
        print(f"error: --parts: unknown part {sorted(unknown)[0]!r}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    scale = Scale.for_run(args.tiny)
    report = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "tiny": args.tiny,
        "goals": GOALS,
        "parts": {},
    }
    out = Path(args.out)

    def save() -> None:
        report["wall_s"] = round(time.perf_counter() - start, 1)
        out.write_text(json.dumps(report, indent=1))

    rate = 1000.0
    for part in wanted:
        t0 = time.perf_counter()
        print(f"[gpu_suite] {part} ...", file=sys.stderr, flush=True)
        try:
            if part == "throughput":
                result = part_throughput(scale, device)
                rate = result["best_images_per_sec"]
            elif part == "packing":
                result = part_packing(scale, device)
            elif part == "analysis":
                result = part_analysis(scale, device)
            else:
                left = args.budget_s - (time.perf_counter() - start) - 30
                result = part_accuracy(scale, device, max(left, 0.0), rate)
        except Exception as exc:  # one part failing must not lose the others' numbers
            result = {"error": f"{type(exc).__name__}: {exc}"}
        result["part_s"] = round(time.perf_counter() - t0, 1)
        report["parts"][part] = result
        save()
        print(f"[gpu_suite] {part}: {json.dumps(result)[:400]}", file=sys.stderr, flush=True)
    failed = [p for p, r in report["parts"].items() if "error" in r]
    print(json.dumps(report, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
