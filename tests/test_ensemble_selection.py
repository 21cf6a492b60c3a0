"""Caruana's refinements (sorted initialisation, bagging, truncation) and member calibration, on
hand-made probabilities whose right answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.committees.calibration import ece, fit_temperature, nll, scale
from analysis.committees.selection import Split, bagged_select, committee_probs, evaluate, greedy_select, select

LABELS = np.arange(12) % 3


def onehot_ish(correct: list[bool], strength: float = 0.8) -> np.ndarray:
    """(12, 3) probabilities: the true label gets ``strength`` where ``correct``, else the next label does."""
    p = np.full((12, 3), (1 - strength) / 2, dtype=np.float32)
    for i, ok in enumerate(correct):
        p[i, LABELS[i] if ok else (LABELS[i] + 1) % 3] = strength
    return p


def models(*masks: str) -> Split:
    return Split([onehot_ish([c == "1" for c in m]) for m in masks], LABELS)


def test_sorted_initialisation_starts_from_the_best_single_models():
    val = models("111111000000", "000000011111", "111111110000", "101010100000")
    chosen = greedy_select(val, size=3, init_size=2)
    assert chosen.order[:2] == [2, 0]  # 8/12, then 6/12 (5/12 and 4/12 left out)
    assert greedy_select(val, size=3).order[0] == 2
    assert len(chosen.order) == 3


def test_truncation_keeps_the_earliest_best_point():
    # model 0 alone is best; adding anything only lowers or keeps the validation accuracy
    val = models("111111111100", "000000000011", "000000000011")
    full = greedy_select(val, size=4)
    cut = greedy_select(val, size=4, truncate=True)
    best = max(full.val_curve)
    assert cut.val_curve[-1] == best and len(cut.order) == full.val_curve.index(best) + 1
    assert cut.order == full.order[: len(cut.order)]


def test_bagging_averages_weights_over_subsets_and_is_seeded():
    val = models("111111110000", "111100001111", "000011111111", "101010101010", "010101010101")
    a = bagged_select(val, size=3, bags=20, fraction=0.6, seed=1)
    b = bagged_select(val, size=3, bags=20, fraction=0.6, seed=1)
    assert a.weights == b.weights
    assert sum(a.weights.values()) == pytest.approx(1.0)
    assert a.order == sorted(a.weights, key=lambda j: (-a.weights[j], j))
    # one bag with every candidate is plain greedy selection
    whole = bagged_select(val, size=3, bags=1, fraction=1.0)
    plain = greedy_select(val, size=3)
    assert whole.weights == pytest.approx(plain.member_weights())
    # the committee's probabilities are the weighted mean
    mean = sum(w * val.probs[j] for j, w in a.weights.items())
    np.testing.assert_allclose(committee_probs(val, a), mean, rtol=1e-6)
    result = evaluate(a, val, val)
    assert result.committee_test_acc == result.test_curve[-1] == pytest.approx(float((mean.argmax(1) == LABELS).mean()))


def test_select_dispatches_bags_only_for_greedy():
    val = models("111111110000", "111100001111", "000011111111")
    assert select(val, 2, "greedy", bags=5).weights is not None
    assert select(val, 2, "topk", bags=5).weights is None


def test_temperature_scaling_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    n, c, true_t = 20000, 10, 2.5
    logits = rng.normal(0, 3, size=(n, c))
    calibrated = np.exp(logits - logits.max(1, keepdims=True))
    calibrated /= calibrated.sum(1, keepdims=True)
    labels = np.array([rng.choice(c, p=row) for row in calibrated])
    overconfident = scale(calibrated, 1 / true_t)  # the same logits times 2.5
    fitted = fit_temperature(overconfident, labels)
    assert fitted == pytest.approx(true_t, rel=0.05)
    assert nll(scale(overconfident, fitted), labels) < nll(overconfident, labels)
    assert ece(scale(overconfident, fitted), labels) < ece(overconfident, labels)


def test_temperature_scaling_never_raises_validation_nll():
    rng = np.random.default_rng(1)
    for _ in range(20):
        probs = rng.dirichlet(np.full(5, rng.uniform(0.1, 3)), size=200).astype(np.float32)
        labels = rng.integers(0, 5, size=200)
        t = fit_temperature(probs, labels)
        assert nll(scale(probs, t), labels) <= nll(probs, labels) + 1e-12
        assert (scale(probs, t).argmax(1) == probs.argmax(1)).all()  # one member's ranking never changes


def test_ece_of_a_perfectly_calibrated_and_a_wrong_model():
    labels = np.array([0, 1, 0, 1])
    right = np.eye(2)[labels]
    assert ece(right, labels) == 0.0
    assert ece(1 - right, labels) == pytest.approx(1.0)
