"""Train one model from a plain config: ``python -m trainables.train --config FILE.yaml``.

``run_job`` is the single entry point the orchestrator wraps; it needs only torch (no Ray, no
MLflow). Per epoch it writes a resumable checkpoint and calls ``on_epoch(metrics, ckpt_dir)``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trainables.config import JobConfig, load_yaml, prepare, set_dotted
from trainables.data import Splits, load_splits
from trainables.device import describe, pick_device, train_flags
from trainables.loader import DeviceLoader
from trainables.models import build_model, count_macs, count_params
from trainables.probs import write_probs
from trainables.run_folder import CHECKPOINT, CONFIG, SPEC, SUMMARY, RunFolder
from trainables.schema import (
    InputError,
    OneLineParser,
    output_folder,
    parse_yaml,
    refuse,
)

EpochCallback = Callable[[dict, Path], None]
CHECKPOINT_FILE = "state.pt"


def select_device(cfg: JobConfig) -> torch.device:
    """The job's device (``config.device``: auto, cpu or cuda)."""
    return pick_device(cfg.device, "config.device")


def device_flags(cfg: JobConfig, device: torch.device) -> tuple[bool, bool]:
    """(bf16 autocast, channels_last) for training ``cfg`` on ``device`` (``device.train_flags``)."""
    return train_flags(cfg.bf16, cfg.channels_last, device)


def norm_stats(splits: Splits, cfg: JobConfig) -> tuple[tuple, tuple]:
    if cfg.data.normalize == "unit":  # pixels scaled to [-1, 1], as in the Kanter-group CNN recipe
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    return splits.mean, splits.std


def norm_record(splits: Splits, cfg: JobConfig) -> dict[str, list[float]]:
    """The training normalisation as summary.json records it (``{"mean": [...], "std": [...]}``):
    what a served model applies."""
    mean, std = norm_stats(splits, cfg)
    return {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}


def make_loaders(splits: Splits, cfg: JobConfig, device: torch.device, channels_last: bool) -> dict[str, DeviceLoader]:
    """Device-resident loaders for train (augmented, shuffled, ``channels_last`` when asked), val and
    test (contiguous batches: the evaluation of record runs as a rebuilt model does)."""
    mean, std = norm_stats(splits, cfg)
    common = dict(device=device, mean=mean, std=std, num_classes=splits.num_classes)
    loaders = {
        "train": DeviceLoader(
            splits.train.images,
            splits.train.labels,
            batch_size=cfg.batch_size,
            augment=cfg.data.augment,
            shuffle=True,
            drop_last=len(splits.train) > cfg.batch_size,
            seed=cfg.seed,
            channels_last=channels_last,
            **common,
        )
    }
    for name in ("val", "test"):
        split = getattr(splits, name)
        loaders[name] = DeviceLoader(split.images, split.labels, batch_size=cfg.eval_batch_size, **common)
    return loaders


def lr_lambda(cfg: JobConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Learning-rate multiplier per optimiser step for the configured recipe."""
    recipe, epochs = cfg.recipe, cfg.epochs
    warmup = min(recipe.warmup_epochs, max(epochs - 1, 0)) * steps_per_epoch
    total = epochs * steps_per_epoch
    floor = recipe.min_lr / recipe.lr

    def cosine(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    def step_decay(step: int) -> float:
        return recipe.step_gamma ** ((step // steps_per_epoch) // recipe.step_epochs)

    return step_decay if recipe.name == "sgd_step" else cosine


def make_optimizer(model: torch.nn.Module, cfg: JobConfig, fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW (no decay on norms, biases and embeddings) or SGD with Nesterov momentum. ``fused`` (one
    kernel for all parameters): None means on CUDA only; the tests force it on the CPU's kernel."""
    recipe = cfg.recipe
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim <= 1 or "pos_emb" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if fused is None:
        fused = all(p.is_cuda for p in model.parameters())
    if recipe.name == "adamw_cosine":
        return torch.optim.AdamW(groups, lr=recipe.lr, fused=fused)
    return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=True, fused=fused)


def train_epoch(model, loader, optimizer, scheduler, cfg: JobConfig, autocast: bool) -> dict:
    """One pass over the training loader; returns loss, accuracy and throughput."""
    model.train()
    device_type = loader.device.type
    total_loss = torch.zeros((), device=loader.device)
    correct = torch.zeros((), device=loader.device)
    seen = 0
    start = time.perf_counter()
    for x, y in loader:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        hard = y.argmax(1) if y.ndim == 2 else y
        total_loss += loss.detach() * len(hard)
        correct += (logits.argmax(1) == hard).sum()
        seen += len(hard)
    if device_type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "train_loss": float(total_loss) / seen,
        "train_acc": float(correct) / seen,
        "epoch_seconds": seconds,
        "images_per_sec": seen / seconds,
    }


@torch.no_grad()
def evaluate(model, loader) -> tuple[float, float, np.ndarray]:
    """(mean cross-entropy, accuracy, softmax probabilities) over a split, in order, in fp32 whatever
    the training precision (``trainables.device``); sums stay on the device until the end (one
    transfer, no per-batch synchronisation)."""
    model.eval()
    probs = []
    loss_sum = torch.zeros((), dtype=torch.float64, device=loader.device)
    correct = torch.zeros((), dtype=torch.int64, device=loader.device)
    for x, y in loader:
        logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        probs.append(torch.softmax(logits, 1))
    n = len(loader.labels)
    return float(loss_sum) / n, int(correct) / n, torch.cat(probs).cpu().numpy()


@torch.no_grad()
def measure_latency(model, image_size: int, device: torch.device, large_batch: int, repeats: int) -> dict:
    """Inference latency after warm-up: ms per image at batch 1 and at a large batch (medians)."""
    model.eval()

    def timed(batch: int, n: int) -> float:
        x = torch.randn(batch, 3, image_size, image_size, device=device)
        for _ in range(2):
            model(x)
        times = []
        for _ in range(n):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return float(np.median(times)) * 1000 / batch

    return {
        "latency_ms_b1": timed(1, repeats),
        "latency_ms_per_image_large_batch": timed(large_batch, max(2, repeats // 4)),
        "latency_large_batch": large_batch,
    }


def save_checkpoint(folder: Path, state: dict) -> Path:
    """Write ``state`` atomically as ``folder/state.pt`` (the folder is replaced as a whole)."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(state, tmp / CHECKPOINT_FILE)
    (tmp / "meta.json").write_text(json.dumps({"epoch": state["epoch"], "history": state["history"]}))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def load_checkpoint(folder: Path) -> dict:
    """Read a checkpoint folder written by ``save_checkpoint`` (tensors only, weights_only=True)."""
    path = Path(folder) / CHECKPOINT_FILE
    if not path.is_file():
        raise InputError(f"checkpoint {path}", "not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for damaged or foreign files
        raise InputError(f"checkpoint {path}", f"cannot be read ({type(exc).__name__})") from None
    if not isinstance(state, dict) or not {"epoch", "model", "optimizer", "scheduler"} <= set(state):
        raise InputError(f"checkpoint {path}", "is not a training checkpoint of trainables.train")
    return state


def check_resumable(model: torch.nn.Module, state: dict, where: str) -> None:
    """The checkpoint must hold this model's parameters, name for name and shape for shape."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state["model"].items()}
    if expected != found:
        diff = sorted(set(expected) ^ set(found)) or [k for k in expected if expected[k] != found[k]]
        raise InputError(where, f"holds another model than the config describes (e.g. {diff[0]})")


def fit(
    model: torch.nn.Module,
    loaders: dict[str, DeviceLoader],
    cfg: JobConfig,
    autocast: bool,
    on_epoch: Callable[[dict, dict], None] | None = None,
    resume_state: dict | None = None,
) -> list[dict]:
    """The training loop: ``cfg.epochs`` epochs of the configured optimiser and schedule.

    After each epoch the validation split is evaluated and ``on_epoch(metrics, state)`` is called
    with the resumable training state (what ``save_checkpoint`` writes); ``resume_state`` continues
    from such a state. Used by ``run_job`` and by pruning's fine-tuning, so both train alike.
    """
    device = loaders["train"].device
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, len(loaders["train"])))
    history: list[dict] = []
    start_epoch = 0
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        loaders["train"].set_rng_state(resume_state["loader_rng"])
        torch.set_rng_state(resume_state["torch_rng"])
        if device.type == "cuda" and "cuda_rng" in resume_state:
            torch.cuda.set_rng_state(resume_state["cuda_rng"])
        history = list(resume_state["history"])
        start_epoch = resume_state["epoch"] + 1
    step_model = torch.compile(model) if cfg.compile else model
    for epoch in range(start_epoch, cfg.epochs):
        metrics = train_epoch(step_model, loaders["train"], optimizer, scheduler, cfg, autocast)
        metrics["val_loss"], metrics["val_acc"], _ = evaluate(step_model, loaders["val"])
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        metrics["epoch"] = epoch
        history.append(metrics)
        if on_epoch is not None:
            state = {
                "epoch": epoch,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "loader_rng": loaders["train"].rng_state(),
                "torch_rng": torch.get_rng_state(),
                "history": history,
            }
            if device.type == "cuda":
                state["cuda_rng"] = torch.cuda.get_rng_state()
            on_epoch(dict(metrics), state)
    return history


def run_job(
    cfg: JobConfig,
    out_dir: str | Path,
    on_epoch: EpochCallback | None = None,
    resume_from: str | Path | None = None,
    splits: Splits | None = None,
) -> dict:
    """Train, evaluate and write artifacts for one resolved job; returns the summary dict.

    Data loading happens before anything is written to ``out_dir``.
    """
    if not isinstance(cfg, JobConfig):
        raise TypeError("run_job takes a resolved JobConfig (trainables.config.prepare)")
    splits = splits or load_splits(cfg.data, cfg.seed)
    resume_state = load_checkpoint(Path(resume_from)) if resume_from else None
    device = select_device(cfg)
    autocast, channels_last = device_flags(cfg, device)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model).to(device)
    if resume_state is not None:
        check_resumable(model, resume_state, f"checkpoint {resume_from}")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    loaders = make_loaders(splits, cfg, device, channels_last)

    folder = RunFolder(out_dir)
    folder.path.mkdir(parents=True, exist_ok=True)
    folder.write_json(SPEC, cfg.model)
    folder.write_json(CONFIG, cfg.to_dict())
    ckpt_dir = folder / CHECKPOINT

    def after_epoch(metrics: dict, state: dict) -> None:
        if cfg.checkpoint:
            save_checkpoint(ckpt_dir, state)
        if on_epoch is not None:
            on_epoch(metrics, ckpt_dir)

    history = fit(model, loaders, cfg, autocast, after_epoch, resume_state)
    return finish_job(model, cfg, splits, loaders, history, folder, describe(device, autocast))


def finish_job(model, cfg: JobConfig, splits, loaders, history, folder: RunFolder, environment: dict) -> dict:
    """Latency, size, then the evaluation of record (fp32, contiguous memory format, as a model rebuilt
    from spec.json + model.pt runs); writes model.pt, probs_*.parquet, summary.json. ``environment``
    (``device.describe``) goes into the summary."""
    summary = {"epochs": len(history), "dataset": splits.name, "num_classes": splits.num_classes}
    device = loaders["test"].device
    summary.update(measure_latency(model, cfg.model["image_size"], device, **cfg.latency.to_dict()))
    model = model.to(memory_format=torch.contiguous_format)
    for split in ("val", "test"):
        loss, acc, probs = evaluate(model, loaders[split])
        summary[f"{split}_loss"], summary[f"{split}_acc"] = loss, acc
        source = getattr(splits, split)
        write_probs(folder.probs(split), probs, source.labels, source.indices, splits.name, split)
    summary["params"] = count_params(model)
    summary["macs"] = count_macs(model)
    summary.update(environment)
    summary["train_images_per_sec"] = float(np.mean([h["images_per_sec"] for h in history])) if history else 0.0
    summary["norm"] = norm_record(splits, cfg)
    summary["history"] = history
    folder.write_weights(model)
    folder.write_json(SUMMARY, summary)
    return summary


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="python -m trainables.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="job config YAML")
    parser.add_argument("--out", default=None, help="output folder (default runs/<config name>)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    parser.add_argument("--resume", default=None, help="checkpoint folder to resume from")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        user = load_yaml(args.config)
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep:
                raise InputError(f"--set {item}", "expected KEY=VALUE")
            set_dotted(user, key, parse_yaml(value, f"--set {key}"))
        cfg = prepare(user)
        out = output_folder(args.out or Path("runs") / Path(args.config).stem)
        summary = run_job(cfg, out, on_epoch=_print_epoch, resume_from=args.resume)
    except InputError as exc:
        return refuse(exc)
    print(
        f"done: {summary['dataset']} val_acc={summary['val_acc']:.4f} test_acc={summary['test_acc']:.4f} "
        f"params={summary['params']:,} macs={summary['macs']:,} "
        f"latency_b1={summary['latency_ms_b1']:.2f}ms -> {out}"
    )
    return 0


def _print_epoch(metrics: dict, _ckpt: Path) -> None:
    print(
        f"epoch {metrics['epoch'] + 1}: train_loss={metrics['train_loss']:.3f} train_acc={metrics['train_acc']:.3f} "
        f"val_loss={metrics['val_loss']:.3f} val_acc={metrics['val_acc']:.3f} "
        f"{metrics['images_per_sec']:.0f} img/s {metrics['epoch_seconds']:.1f}s",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
