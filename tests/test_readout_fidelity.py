"""The default readout gives the authors' answer (docs/methods.md 2.2): per tap of a small CCT trained on
real CIFAR-100 (one tap of each kind: the conv tokenizer's filters, a block's heads, the final
norm's nodes), the default recipe's readout accuracy is within 1 point of the ``paper`` recipe's,
and its labels per unit and SNR within 10 %. Also: training taps together (stacked) is exact."""

from __future__ import annotations

import pytest
import torch
from conftest import synthetic_job

from analysis.units.pipeline import AnalysisConfig
from analysis.units.readout import DEFAULT_RECIPE, train_readouts
from analysis.units.run import analyze, load_model
from analysis.units.summary import primary_kind
from trainables.config import prepare
from trainables.data import load_splits
from trainables.train import run_job

MODEL = {
    "preset": "cct_narrow",
    "tokenizer_layers": 2,
    "tokenizer_channels": 32,
    "width": 64,
    "blocks": 1,
    "heads": 4,
    "head_dim": 16,
}


def test_stacked_training_equals_training_each_tap_alone():
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (300,), generator=gen)
    feats = {f"t{i}": (torch.randn(300, 6, 8, generator=gen) + y[:, None, None] * 0.3 * i).half() for i in range(3)}
    kinds = dict.fromkeys(feats, "token")
    together = train_readouts(feats, kinds, y, 5, "paper", epochs=4)
    for tap in feats:
        alone = train_readouts({tap: feats[tap]}, {tap: "token"}, y, 5, "paper", epochs=4)[tap]
        assert together[tap].recipe["stacked_with"] == 3 and alone.recipe["stacked_with"] == 1
        for a, b in (
            (together[tap].readout.fc.weight, alone.readout.fc.weight),
            (together[tap].readout.pool, alone.readout.pool),
        ):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), tap


@pytest.fixture(scope="module")
def trained_cct(tmp_path_factory):
    from conftest import real_data_dir

    root = real_data_dir()
    if root is None:
        pytest.skip("real data not found: set DATA_DIR or provide ../shared/data")
    out = tmp_path_factory.mktemp("fidelity")
    data = {"name": "cifar100", "data_dir": str(root), "train_size": 6000, "val_size": 1000}
    job = synthetic_job(
        model=MODEL,
        data=data,
        epochs=3,
        checkpoint=False,
        batch_size=128,
        recipe={"name": "adamw_cosine", "lr": 0.003, "warmup_epochs": 0},
    )
    cfg = prepare(job)
    run_job(cfg, out)
    return load_model(out / "spec.json", out / "model.pt"), load_splits(cfg.data, 0)


TAPS = ("tokenizer", "block.0.heads", "final_norm")  # filters, heads and nodes, residual-stream nodes


@pytest.mark.slow
def test_default_readout_matches_paper_per_tap(trained_cct):
    model, splits = trained_cct
    results = {
        recipe: analyze(
            model,
            splits,
            AnalysisConfig(recipe=recipe, train_size=1000, test_size=1000, taps=TAPS),
            figures=False,
            n_control=1,
        )
        for recipe in (DEFAULT_RECIPE, "paper")
    }
    fast, paper = results[DEFAULT_RECIPE], results["paper"]
    assert set(paper.taps) == set(TAPS)
    assert fast.meta["test_size"] == 1000 and fast.meta["test_subset"] == "class-balanced"
    for tap, info in paper.taps.items():
        a = fast.taps[tap]["kinds"][primary_kind(info)]["summary"]
        b = info["kinds"][primary_kind(info)]["summary"]
        assert abs(fast.taps[tap]["accuracy"] - info["accuracy"]) <= 0.01, tap
        assert a["mean_labels_per_unit"] == pytest.approx(b["mean_labels_per_unit"], rel=0.10), tap
        assert a["snr"] == pytest.approx(b["snr"], rel=0.10), tap
