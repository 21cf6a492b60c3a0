"""CPU twins of the GPU code paths: what a GPU run executes, run here on the CPU so CI sees it first.

docs/gpu_paths.md lists the lines only a GPU can run and why.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_args, sweep_spec, synthetic_job, write
from torch.utils._python_dispatch import TorchDispatchMode

from trainables.config import prepare
from trainables.data import load_splits
from trainables.infer import image_probs
from trainables.models import build_model
from trainables.probs import read_probs
from trainables.train import make_loaders, make_optimizer, run_job, train_epoch

# The CCT GPU recipe's augmentation (configs/lsmha_cifar100.yaml), at toy scale.
GPU_AUGMENT = {
    "flip": True,
    "translate": 2,
    "rand_augment": {"num_ops": 2, "magnitude": 9, "magnitude_std": 0.5},
    "erasing": 0.25,
    "mixup": 0.8,
    "cutmix": 1.0,
}


@pytest.mark.slow
def test_the_gpu_recipe_compiled_in_bf16_and_channels_last_trains_and_reproduces(tmp_path):
    """torch.compile (inductor), bf16 autocast, channels_last and every device augmentation in one job;
    the model rebuilt in fp32 reproduces its logged accuracy exactly."""
    job = synthetic_job(epochs=2, compile=True, bf16=True, channels_last=True, label_smoothing=0.1)
    job["data"]["augment"] = GPU_AUGMENT
    cfg = prepare(job)
    summary = run_job(cfg, tmp_path)
    assert summary["train_precision"] == "bf16" and len(summary["history"]) == 2
    assert all(np.isfinite(h["train_loss"]) for h in summary["history"])
    model = build_model(json.loads((tmp_path / "spec.json").read_text()))
    model.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    probs = image_probs(model.eval(), load_splits(cfg.data, cfg.seed).test.images, **summary["norm"]).numpy()
    _, labels, stored, _ = read_probs(tmp_path / "probs_test.parquet")
    assert float((probs.argmax(1) == labels).mean()) == summary["test_acc"]
    np.testing.assert_allclose(probs, stored, atol=1e-5, rtol=0)


@pytest.mark.parametrize("recipe", ["adamw_cosine", "sgd_cosine"])
def test_the_fused_optimiser_steps_like_the_unfused_one(recipe):
    """The fused kernels CUDA uses, run here with the CPU's fused implementation, on the same parameter
    groups (weight decay on weights only) and the same gradients."""
    cfg = prepare(synthetic_job(recipe={"name": recipe, "lr": 0.01, "warmup_epochs": 0}))
    torch.manual_seed(0)
    models = [build_model(cfg.model), build_model(cfg.model)]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [make_optimizer(m, cfg, fused=f) for m, f in zip(models, (True, False))]
    assert optimizers[0].defaults["fused"] and not optimizers[1].defaults["fused"]
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen) for p in models[0].parameters()]
        for model, opt in zip(models, optimizers):
            for param, grad in zip(model.parameters(), grads):
                param.grad = grad.clone()
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


class ScalarReads(TorchDispatchMode):
    """Counts reads of a tensor's value into Python (``.item()``, ``float(t)``, ``bool(t)``): on a GPU
    each one is a host-device synchronisation."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_the_training_step_reads_nothing_back_until_the_epoch_ends():
    """Per-sample RandAugment, erasing, the step and the running sums stay on the device: an epoch of 4
    steps reads as many values back to the host as an epoch of 2 (only its closing metrics)."""
    reads = []
    for train_size in (64, 128):  # 2 and 4 steps of 32
        job = synthetic_job(bf16=False)
        job["data"].update(
            train_size=train_size, augment={k: v for k, v in GPU_AUGMENT.items() if k not in ("mixup", "cutmix")}
        )
        cfg = prepare(job)
        torch.manual_seed(0)
        model = build_model(cfg.model)
        loader = make_loaders(load_splits(cfg.data, cfg.seed), cfg, torch.device("cpu"), False)["train"]
        optimizer = make_optimizer(model, cfg, fused=True)  # as on CUDA (the unfused CPU loop reads its step counts)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        with ScalarReads() as mode:
            train_epoch(model, loader, optimizer, scheduler, cfg, autocast=False)
        reads.append(mode.count)
    assert reads == [2, 2], reads  # the epoch's loss and accuracy sums


@pytest.mark.slow
def test_fractional_gpu_trials_share_one_gpu(tmp_path: Path, capsys):
    """Packing: trials asking for half a GPU run two at a time on a one-GPU node (Ray's GPU resource,
    declared here without CUDA: each trial then trains on the CPU, and its CUDA memory cap is skipped)."""
    import ray
    from mlflow import MlflowClient

    from orchestrator.cli import main

    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False)
    try:
        spec = sweep_spec(  # trials long enough (about 10 s) that a loaded machine still starts both together
            "packed",
            epochs=3,
            train_size=2048,
            axes={"seed": [0, 1]},
            resources={"cpus": 1, "gpus": 0.5},
            max_concurrent=2,
        )
        assert main(["sweep", str(write(tmp_path, spec)), *cli_args(tmp_path)]) == 0
    finally:
        ray.shutdown()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("packed")
    trials = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("unitlab.role") == "trial"]
    assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in trials)
    (a, b) = sorted((r.info.start_time, r.info.end_time) for r in trials)
    assert b[0] < a[1], "the two half-GPU trials did not run at the same time"
