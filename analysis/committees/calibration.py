"""Calibration of committee members: temperature scaling fitted on validation, NLL and ECE.

Members are stored as softmax probabilities, so their log-probabilities are logits up to a constant
per sample, and ``softmax(log p / T)`` is temperature scaling (Guo et al., 2017). One temperature
per member minimises the validation negative log-likelihood; with ``beta = 1 / T`` that NLL is
convex in ``beta`` and its derivative, ``E_softmax(beta z)[z] - z_true``, increases with ``beta``,
so Newton steps on ``beta`` kept inside a shrinking bracket find the optimum. ``T = 1`` (no change) is kept whenever the fit
would not lower the validation NLL, so calibration never raises it.
"""

from __future__ import annotations

import numpy as np

_EPS = 1e-12
BETA_RANGE = (1e-2, 1e2)  # temperatures between 0.01 and 100
ECE_BINS = 15


def _logits(probs: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(np.asarray(probs, dtype=np.float64), _EPS))


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-probability of the true label."""
    p = np.asarray(probs, dtype=np.float64)[np.arange(len(labels)), labels]
    return float(-np.log(np.maximum(p, _EPS)).mean())


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: ``sum_b n_b / N * |accuracy_b - confidence_b|`` over ``bins``
    equal-width confidence bins (the top probability; bin b holds (b/B, (b+1)/B], bin 0 includes 0)."""
    p = np.asarray(probs, dtype=np.float64)
    confidence = p.max(axis=1)
    correct = p.argmax(axis=1) == labels
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(total)


def scale(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities at temperature ``T``: ``softmax(log p / T)`` as float32."""
    if temperature == 1.0:
        return np.asarray(probs, dtype=np.float32)
    return _softmax(_logits(probs) / temperature).astype(np.float32)


def fit_temperature(probs: np.ndarray, labels: np.ndarray, iterations: int = 30) -> float:
    """The temperature minimising the NLL of ``probs`` on ``labels`` (1.0 if that does not lower it).

    Newton's method on ``beta = 1 / T`` (the NLL's second derivative is the mean variance of the
    logits under ``softmax(beta z)``), each step kept inside a bracket that bisection shrinks, so it
    converges like Newton and never leaves ``BETA_RANGE``."""
    z = _logits(probs).astype(np.float32)
    true_mean = float(z[np.arange(len(labels)), labels].mean())

    def slope_and_curvature(beta: float) -> tuple[float, float]:
        p = _softmax(beta * z)
        mean = (p * z).sum(axis=1)
        variance = (p * z * z).sum(axis=1) - mean * mean
        return float(mean.mean() - true_mean), float(max(variance.mean(), 1e-12))

    lo, hi = BETA_RANGE
    beta = 1.0
    for _ in range(iterations):
        g, h = slope_and_curvature(beta)
        if abs(g) < 1e-7:
            break
        if g < 0:
            lo = beta
        else:
            hi = beta
        step = beta - g / h
        beta = step if lo < step < hi else (lo * hi) ** 0.5  # Newton inside the bracket, else bisect
    temperature = float(1.0 / beta)
    return temperature if nll(scale(probs, temperature), labels) < nll(probs, labels) else 1.0
