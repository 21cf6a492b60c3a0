"""Tests of the single-unit analysis core: cluster rule, unit matrices vs brute force, readout."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from analysis.units.clusters import binarize, greedy_clusters, unit_stats
from analysis.units.features import collect_features
from analysis.units.matrices import tap_unit_matrices, unit_matrices
from analysis.units.readout import Readout, train_readout
from analysis.units.reference import reference_unit_matrices
from analysis.units.results import load_matrices, matrix_arrays
from analysis.units.summary import UnitResult, analyse_unit, head_structure, summarise_tap, tap_summary


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


# ------------------------------------------------------------------ clusters


def stats_of(B):
    B = np.array(B, dtype=bool)
    clusters = greedy_clusters(B)
    s = unit_stats(B, clusters)
    return clusters, s.labels, s.n_clusters, s.signal, s.noise


@pytest.mark.parametrize(
    "B, clusters, signal, noise",
    [
        (np.eye(4), [[0], [1], [2], [3]], 4, 0),
        ([[1, 1, 0], [1, 1, 0], [0, 0, 1]], [[0, 1], [2]], 5, 0),
        # overlapping blocks {0,1} and {1,2}: greedy order takes {0,1}, then 2 alone
        ([[1, 1, 0], [1, 1, 1], [0, 1, 1]], [[0, 1], [2]], 5, 2),
        # 0-2 and 0-3 compatible, 2-3 not: 0 takes 2 first, 3 is left alone
        ([[1, 0, 1, 1], [0, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1]], [[0, 2], [1], [3]], 6, 2),
        # B[0,1] set but B[1,0] missing: no block; label 2 has no diagonal one
        ([[1, 1, 0], [0, 1, 0], [0, 0, 0]], [[0], [1]], 2, 1),
        # off-diagonal ones only: no candidate, everything is noise
        ([[0, 1], [1, 0]], [], 0, 2),
    ],
)
def test_greedy_clusters(B, clusters, signal, noise):
    got, labels, n, sig, noi = stats_of(B)
    assert got == clusters
    assert labels == sum(len(c) for c in clusters) and n == len(clusters)
    assert (sig, noi) == (signal, noise)


def test_non_square():
    B = np.zeros((3, 5), dtype=bool)  # rows = labels, cols = outputs
    B[:2, :2] = True
    B[2, 4] = True  # column 4 has no diagonal: noise
    assert stats_of(B) == ([[0, 1]], 2, 1, 4, 1)
    B = np.zeros((5, 3), dtype=bool)
    B[2, 2] = B[4, 0] = True  # rows 3, 4 cannot be diagonal
    assert stats_of(B) == ([[2]], 1, 1, 1, 1)


def test_binarize():
    assert binarize(np.zeros((3, 3))) is None
    assert binarize(-np.ones((3, 3))) is None
    M = np.array([[1.0, 0.3], [0.31, -1.0]])
    expected = np.array([[True, False], [True, False]])
    np.testing.assert_array_equal(binarize(M), expected)
    np.testing.assert_array_equal(binarize(10 * M), expected)
    assert binarize(M, threshold=0.5).sum() == 1
    assert unit_stats(None, []) == unit_stats(np.zeros((2, 2)), [])


def test_analyse_unit_no_cluster():
    u = analyse_unit(-np.eye(3))
    assert not u.has_cluster and u.n_labels == 0 and u.noise == 0
    u = analyse_unit(np.array([[0.0, 1.0], [0.0, 0.0]]))  # positive max, but no diagonal one
    assert not u.has_cluster and u.noise == 1


# ------------------------------------------------------------------ summary


def unit(clusters, noise):
    labels = sorted(l for c in clusters for l in c)
    return UnitResult(
        clusters, labels, len(labels), len(clusters), sum(len(c) ** 2 for c in clusters), noise, bool(clusters)
    )


def test_tap_summary():
    units = [unit([[0, 1]], 2), unit([[2]], 0), unit([], 3)]
    s = tap_summary(units, num_labels=4, accuracy=0.5)
    assert s["n_units_with_cluster"] == 2 and s["n_units_without_cluster"] == 1
    assert s["mean_labels_per_unit"] == 1.5 and s["mean_noise_per_unit"] == 1.0
    assert s["snr"] == pytest.approx(2.5 / 1.0)
    assert s["coverage"] == [1, 1, 1, 0] and s["labels_uncovered"] == 1
    assert tap_summary([unit([[0]], 0)], 2)["snr"] == math.inf
    assert math.isnan(tap_summary([unit([], 1)], 2)["snr"])


def test_head_structure_symmetry_breaking():
    heads, head_dim, labels = 4, 3, 4
    heads_units = [unit([[h]], 0) for h in range(heads)]
    nodes = [unit([[i // head_dim]], 0) for i in range(heads * head_dim)]  # head h's nodes see label h
    out = head_structure(heads_units, nodes, head_dim, labels, n_control=10, seed=1)
    assert out["shp"]["heads_per_label"] == [1, 1, 1, 1]
    assert out["observed"]["mean_max_share"] == 1.0
    assert out["observed"]["mean_entropy"] == 0.0 and out["observed"]["jaccard"] == 0.0
    assert out["control"]["mean_entropy"] > 0.2 and out["control"]["jaccard"] > 0.0
    assert np.array(out["node_counts"]).sum() == heads * head_dim


# ------------------------------------------------------------------ fast path vs brute force


def random_readout(kind, in_features, num_classes, gen, scale=1.0):
    r = Readout(kind, in_features, num_classes, scale=scale).double()
    with torch.no_grad():
        r.fc.weight.copy_(torch.randn(r.fc.weight.shape, generator=gen, dtype=torch.float64))
        if r.pool is not None:
            r.pool.copy_(torch.randn(r.pool.shape, generator=gen, dtype=torch.float64))
    return r


def check_against_reference(readout, x, y, num_labels, head_dim=None):
    tm = tap_unit_matrices(readout, x, y, num_labels, head_dim=head_dim, batch_size=17)
    for kind, fast in tm.units.items():
        ref = reference_unit_matrices(readout, x, y, num_labels, kind, head_dim=head_dim)
        assert fast.shape == ref.shape
        assert rel_diff(fast, ref) <= 1e-4, kind
        np.testing.assert_allclose(ref.sum(0), tm.full, rtol=1e-6, atol=1e-9 * np.abs(tm.full).max())
    return tm


def test_conv_filters_match_reference():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(60, 5, 3, 4, generator=gen, dtype=torch.float64).relu()
    y = torch.arange(60) % 4
    tm = check_against_reference(random_readout("conv", 5 * 3 * 4, 4, gen, scale=2.5), x, y, 4)
    assert set(tm.units) == {"filter"} and tm.units["filter"].shape == (5, 4, 4)


def test_token_nodes_and_heads_match_reference():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(50, 7, 12, generator=gen, dtype=torch.float64)
    y = torch.arange(50) % 5
    tm = check_against_reference(random_readout("token", 12, 5, gen, scale=0.7), x, y, 5, head_dim=4)
    assert tm.units["node"].shape == (12, 5, 5) and tm.units["head"].shape == (3, 5, 5)


def test_unit_matrices_group_sums():
    rng = np.random.default_rng(0)
    means, W = rng.normal(size=(3, 8)), rng.normal(size=(4, 8))
    nodes, heads = unit_matrices(means, W, 1), unit_matrices(means, W, 4)
    np.testing.assert_allclose(nodes.reshape(2, 4, 3, 4).sum(1), heads)
    np.testing.assert_allclose(nodes[5], np.outer(means[:, 5], W[:, 5]))


def test_tap_matrices_are_float32():
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(20, 3, 4, generator=gen), torch.arange(20) % 3
    tm = tap_unit_matrices(random_readout("token", 4, 3, gen).float(), x, y, 3, head_dim=2)
    assert {m.dtype for m in tm.units.values()} == {np.dtype(np.float32)}


def test_matrices_npz_is_exact_and_old_layout_still_loads(tmp_path):
    m = np.random.default_rng(0).normal(size=(3, 4, 5)).astype(np.float32)
    np.savez_compressed(tmp_path / "new.npz", **matrix_arrays({"t.0": {"node": m}}))
    assert np.array_equal(load_matrices(tmp_path / "new.npz")["t.0"]["node"], m)  # bit-exact
    scale = np.abs(m).reshape(3, -1).max(1)
    np.savez_compressed(
        tmp_path / "old.npz", **{"t.0/node": (m / scale[:, None, None]).astype(np.float16), "t.0/node/scale": scale}
    )
    old = load_matrices(tmp_path / "old.npz")["t.0"]["node"]
    assert old.dtype == np.float32 and np.abs(old - m).max() <= 1e-3 * scale.max()


# ------------------------------------------------------------------ readout training


def test_readout_learns_separable_conv():
    gen = torch.Generator().manual_seed(2)
    C, n = 6, 600
    centres = 3 * torch.randn(C, 4, 2, 2, generator=gen)
    y = torch.randint(0, C, (n,), generator=gen)
    x = (centres[y] + torch.randn(n, 4, 2, 2, generator=gen)).half()  # float16 cache
    res = train_readout(x[:500], y[:500], x[500:], y[500:], "conv", C, epochs=10)
    assert res.test_accuracy >= 0.95 and res.weight.shape == (C, 16)
    exact = train_readout(x[:500], y[:500], x[500:], y[500:], "conv", C, "lbfgs")
    assert exact.test_accuracy >= 0.95 and exact.recipe["solver_report"]["grad_norm"] < 1e-3


def test_readout_learns_separable_tokens_needing_pooling():
    gen = torch.Generator().manual_seed(3)
    C, n, T, D = 5, 600, 9, 8
    y = torch.randint(0, C, (n,), generator=gen)
    x = torch.randn(n, T, D, generator=gen)
    x[:, :, -1] = 0.0
    pos = torch.randint(0, T, (n,), generator=gen)  # one marked token per sample carries the class
    x[torch.arange(n), pos, :C] += 4 * nn.functional.one_hot(y, C).float()
    x[torch.arange(n), pos, -1] = 3.0
    res = train_readout(x[:500], y[:500], x[500:], y[500:], "token", C, "lbfgs")
    assert res.test_accuracy >= 0.95
    paper = train_readout(x[:500], y[:500], x[500:], y[500:], "token", C, recipe="paper", epochs=10)
    assert paper.recipe["optimizer"] == "sgd_nesterov" and paper.test_accuracy >= 0.8


# ------------------------------------------------------------------ features + models


class TinyTapped(nn.Module):
    """Follows the documented model interface: taps dict and forward(x, taps=None)."""

    def __init__(self, classes=4):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.proj = nn.Linear(6, 8)
        self.head = nn.Linear(8, classes)
        self.taps = {
            "conv1": SimpleNamespace(kind="conv", heads=None, head_dim=None),
            "mha1": SimpleNamespace(kind="token", heads=2, head_dim=4),
        }

    def forward(self, x, taps=None):
        c = self.conv(x).relu()
        t = self.proj(c.flatten(2).transpose(1, 2))
        logits = self.head(t.mean(1))
        if taps is None:
            return logits
        return logits, {name: {"conv1": c, "mha1": t}[name] for name in taps}


def analyse_model_taps(model, x, y, num_labels, taps, epochs=2):
    """Features -> readout -> fast unit matrices -> compare with reference -> summary, per tap."""
    feats = collect_features(model, x, taps, batch_size=16)
    out = {}
    for tap in taps:
        info = model.taps[tap]
        f = feats[tap]
        res = train_readout(f, y, f, y, info.kind, num_labels, epochs=epochs, batch_size=32)
        readout = res.readout.double()
        fd = f.double()
        tm = check_against_reference(readout, fd, y, num_labels, head_dim=info.head_dim)
        out[tap] = summarise_tap(tm.units, num_labels, res.test_accuracy, head_dim=info.head_dim, n_control=3)
    return feats, out


def test_collect_features_tiny_model():
    torch.manual_seed(0)
    model = TinyTapped().train()
    x = torch.randn(40, 3, 5, 5)
    y = torch.arange(40) % 4
    feats, out = analyse_model_taps(model, x, y, 4, ["conv1", "mha1"])
    assert model.training  # mode restored
    assert feats["conv1"].shape == (40, 6, 5, 5) and feats["mha1"].shape == (40, 25, 8)
    again = collect_features(
        model, ((x[i : i + 7], y[i : i + 7]) for i in range(0, 40, 7)), ["mha1"], dtype=torch.float16
    )
    torch.testing.assert_close(again["mha1"].float(), feats["mha1"], atol=1e-2, rtol=1e-2)
    assert "heads" in out["mha1"] and "filter" in out["conv1"]["kinds"]
    with pytest.raises(MemoryError):
        collect_features(model, x, ["conv1"], max_bytes=1000)


@pytest.mark.parametrize(
    "spec",
    [
        {"preset": "cct_tiny", "blocks": 2, "n_conv_blocks": 1, "num_classes": 5},
        {"preset": "vgg11_afcc", "width_mult": 0.0625, "num_classes": 5},
    ],
)
def test_real_models(spec):
    """Every tap of a real model family: fast unit matrices equal the brute-force reference
    (``check_against_reference`` inside), and each tap's summary covers each of its units."""
    from trainables.models import build_model

    torch.manual_seed(0)
    model = build_model(spec)
    x = torch.randn(32, 3, model.image_size, model.image_size)
    y = torch.arange(32) % 5
    taps = list(model.taps)
    feats, out = analyse_model_taps(model, x, y, 5, taps, epochs=1)
    assert list(out) == taps
    for tap in taps:
        units = feats[tap].shape[1] if model.taps[tap].kind == "conv" else feats[tap].shape[-1]
        kind = "filter" if model.taps[tap].kind == "conv" else "node"
        assert out[tap]["kinds"][kind]["summary"]["n_units"] == units, tap
