"""The training job: artifacts, exact resume, model rebuild, CLI errors, layering."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, synthetic_job

from trainables.config import prepare
from trainables.data import load_splits
from trainables.device import native_bf16
from trainables.infer import image_probs
from trainables.models import build_model
from trainables.probs import read_probs
from trainables.schema import InputError
from trainables.train import device_flags, evaluate, main, make_loaders, run_job, train_epoch


class StopAfterFirstEpoch(Exception):
    pass


def test_job_writes_artifacts_and_learns(tmp_path):
    summary = run_job(prepare(synthetic_job(epochs=3)), tmp_path)
    for name in (
        "spec.json",
        "model.pt",
        "probs_val.parquet",
        "probs_test.parquet",
        "summary.json",
        "checkpoint/state.pt",
    ):
        assert (tmp_path / name).exists(), name
    assert summary["test_acc"] > 0.5  # 4 classes: chance is 0.25
    assert summary["params"] > 0 and summary["macs"] > 0 and summary["latency_ms_b1"] > 0
    assert [h["epoch"] for h in summary["history"]] == [0, 1, 2]
    index, labels, probs, meta = read_probs(tmp_path / "probs_test.parquet")
    assert probs.shape == (64, 4) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert meta == {"dataset": "synthetic", "split": "test", "num_classes": "4"}
    assert np.isclose((probs.argmax(1) == labels).mean(), summary["test_acc"])


def test_resume_after_epoch_one_matches_uninterrupted_run(tmp_path):
    job = synthetic_job(epochs=3, model={"preset": "cct_tiny", "dropout": 0.1, "stochastic_depth": 0.1})
    job["data"]["augment"] = {"mixup": 0.8, "cutmix": 1.0}
    full = run_job(prepare(job), tmp_path / "full")

    def stop(metrics, _ckpt):
        if metrics["epoch"] == 0:
            raise StopAfterFirstEpoch

    with pytest.raises(StopAfterFirstEpoch):
        run_job(prepare(job), tmp_path / "part", on_epoch=stop)
    resumed = run_job(prepare(job), tmp_path / "part", resume_from=tmp_path / "part" / "checkpoint")
    for key in ("train_loss", "val_loss", "val_acc"):
        assert [h[key] for h in resumed["history"]] == [h[key] for h in full["history"]], key
    assert resumed["test_acc"] == full["test_acc"] and resumed["test_loss"] == full["test_loss"]
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_model_rebuilt_from_artifacts_reproduces_test_accuracy(tmp_path, bf16):
    """Whatever the training precision and memory format, README's rebuild (spec.json + model.pt, fp32)
    reproduces the logged accuracy exactly and the stored probabilities to 1e-5."""
    cfg = prepare(synthetic_job(bf16=bf16, channels_last=True))
    summary = run_job(cfg, tmp_path)
    assert (summary["train_precision"], summary["eval_precision"]) == ("bf16" if bf16 else "fp32", "fp32")
    assert summary["torch"] == torch.__version__ and summary["device"] == "cpu" and summary["cpu"]
    model = build_model(json.loads((tmp_path / "spec.json").read_text()))
    model.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    test = load_splits(cfg.data, cfg.seed).test
    probs = image_probs(model.eval(), test.images, **summary["norm"]).numpy()
    _, labels, stored, _ = read_probs(tmp_path / "probs_test.parquet")
    assert float((probs.argmax(1) == labels).mean()) == summary["test_acc"]
    np.testing.assert_allclose(probs, stored, atol=1e-5, rtol=0)
    _, acc, loader_probs = evaluate(model, make_loaders(load_splits(cfg.data), cfg, torch.device("cpu"), True)["test"])
    assert acc == summary["test_acc"] and np.array_equal(loader_probs, stored)


def test_bf16_auto_follows_the_hardware_and_forced_emulation_warns(capsys):
    """auto is on only where bf16 is native (a CPU without AVX-512 BF16/AMX emulates it ~100x slower);
    an explicit true is honoured, with one warning where it is emulated."""
    cpu = torch.device("cpu")
    native = native_bf16(cpu)
    a = torch.randn(64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16  # autocast itself works either way; only its speed differs
    assert device_flags(prepare({"bf16": "auto"}), cpu) == (native, False)
    assert device_flags(prepare({"bf16": False, "channels_last": True}), cpu) == (False, True)
    assert device_flags(prepare({"bf16": True}), cpu) == (True, False)
    warned = [line for line in capsys.readouterr().err.splitlines() if "config.bf16" in line]
    assert len(warned) == (0 if native else 1), warned


BAD_JOBS = {
    "unknown preset": ({"model": {"preset": "cct_huge"}}, "model.preset"),
    "unknown family": ({"model": {"family": "mlp"}}, "model.family"),
    "heads < 1": ({"model": {"preset": "cct_tiny", "heads": 0}}, "model.heads"),
    "head_dim < 1": ({"model": {"preset": "cct_tiny", "head_dim": 0}}, "model.head_dim"),
    "n_conv_blocks > blocks": ({"model": {"preset": "cct_tiny", "n_conv_blocks": 3}}, "model.n_conv_blocks"),
    "image size": ({"model": {"preset": "cct_tiny", "image_size": 2}}, "model.image_size"),
    "unknown config key": ({"epochz": 3}, "config.epochz"),
    "unknown nested key": ({"recipe": {"lrate": 1.0}}, "config.recipe.lrate"),
    "wrong type": ({"epochs": "many"}, "config.epochs"),
}


@pytest.mark.parametrize("case", sorted(BAD_JOBS))
def test_bad_input_is_one_line_nonzero_and_writes_nothing(case, tmp_path, capsys):
    override, field = BAD_JOBS[case]
    job = synthetic_job()
    job.update(override)
    if "model" in override:
        job["model"] = override["model"]
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(job))
    out = tmp_path / "out"
    assert main(["--config", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and field in err, err
    assert not out.exists()


def test_missing_and_corrupt_data_files_exit_nonzero(tmp_path, capsys):
    job = synthetic_job(data={"name": "cifar100", "data_dir": str(tmp_path / "nowhere")})
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(job))
    assert main(["--config", str(config), "--out", str(tmp_path / "out")]) == 2
    assert "nowhere" in capsys.readouterr().err
    (tmp_path / "d" / "cifar100").mkdir(parents=True)
    for split in ("train", "test"):
        (tmp_path / "d" / "cifar100" / f"{split}-00000-of-00001.parquet").write_bytes(b"garbage")
    job["data"]["data_dir"] = str(tmp_path / "d")
    job["data"]["val_size"] = 10
    config.write_text(yaml.safe_dump(job))
    assert main(["--config", str(config), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "parquet" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert main(["--config", str(tmp_path / "absent.yaml")]) == 2


def test_cli_runs_a_job_in_a_fresh_process(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(synthetic_job(epochs=1)))
    bad = subprocess.run(
        [sys.executable, "-m", "trainables.train", "--config", str(config), "--set", "model.heads=0"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: model.heads")
    good = subprocess.run(
        [sys.executable, "-m", "trainables.train", "--config", str(config), "--out", str(tmp_path / "out")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert good.returncode == 0, good.stderr
    assert "test_acc=" in good.stdout and (tmp_path / "out" / "model.pt").exists()


def test_trainables_and_analysis_import_neither_ray_nor_mlflow():
    code = (
        "import sys, pkgutil, importlib, trainables, analysis\n"
        "for pkg in (trainables, analysis):\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        if not m.name.endswith('__main__'):\n"
        "            importlib.import_module(m.name)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow', 'optuna')]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_narrow_cct_learns_real_cifar100(data_dir, tmp_path):
    job = {
        "model": {"preset": "cct_tiny"},
        "data": {
            "name": "cifar100",
            "data_dir": str(data_dir),
            "train_size": 4000,
            "val_size": 1000,
            "test_size": 1000,
        },
        "recipe": {"name": "adamw_cosine", "lr": 0.003, "warmup_epochs": 0},
        "epochs": 2,
        "batch_size": 64,
        "latency": {"large_batch": 16, "repeats": 3},
    }
    summary = run_job(prepare(job), tmp_path)
    assert summary["test_acc"] > 0.03  # chance is 0.01


def test_sgd_cosine_recipe_warms_up_then_decays_with_nesterov_sgd():
    from trainables.train import lr_lambda, make_optimizer

    cfg = prepare({"recipe": {"name": "sgd_cosine"}, "epochs": 4})
    assert (cfg.recipe.lr, cfg.recipe.weight_decay, cfg.recipe.warmup_epochs) == (0.05, 5e-4, 1)
    factor = lr_lambda(cfg, steps_per_epoch=10)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0) and factor(39) < 0.01
    optimizer = make_optimizer(build_model({"preset": "cct_tiny", "num_classes": 4, "image_size": 16}), cfg)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["nesterov"]


def test_gradient_clipping_bounds_the_update_norm():
    """grad_clip: one field on JobConfig and one line in train_epoch (the numeric rule and the flag walk
    cover it without a test of their own)."""
    cfg = prepare(synthetic_job(grad_clip=1e-3, recipe={"name": "sgd_cosine", "lr": 1.0, "warmup_epochs": 0}))
    torch.manual_seed(0)
    model = build_model(cfg.model)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    loader = make_loaders(load_splits(cfg.data), cfg, torch.device("cpu"), False)["train"]
    loader.labels = loader.labels[:32]  # one step
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    train_epoch(model, loader, optimizer, scheduler, cfg, autocast=False)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert 0 < float((after - before).norm()) <= 1e-3 * (1 + 1e-5)
    with pytest.raises(InputError, match="config.grad_clip: must be > 0"):
        prepare(synthetic_job(grad_clip=0))
