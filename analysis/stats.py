"""Uncertainty of the numbers the claims rest on: a mean over seeds with its 95 % interval, the
paired bootstrap interval of a difference in accuracy between two models on the same test images,
and its two-level form for two groups of models (images and models both resampled).

numpy only (no scipy), so it runs wherever ``analysis`` does. Both are textbook: the interval of a
mean is mean +- t(0.975, n - 1) * sd / sqrt(n) with the sample sd (ddof 1); the paired bootstrap
draws the test images with replacement ``n_boot`` times, keeping the two models' answers on an image
together, and takes the 2.5th and 97.5th percentiles of the difference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Student's t quantile at 0.975 for 1..30 degrees of freedom (4 decimals).
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip
_Z975 = 1.959963984540054


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (table to 30, then the
    Cornish-Fisher expansion, within 1e-4 of the exact value)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass(frozen=True)
class Spread:
    """A mean over ``n`` values (seeds) with its sample sd and 95 % interval (None with one value)."""

    n: int
    mean: float
    sd: float | None
    low: float | None
    high: float | None

    def text(self, scale: float = 100.0, unit: str = "%", digits: int = 2) -> str:
        """``35.57 ± 0.11 % (95 % CI 35.30 to 35.84, 3 seeds)``, or the value alone for one seed."""
        unit = f" {unit}" if unit else ""
        if self.sd is None:
            return f"{scale * self.mean:.{digits}f}{unit} (1 seed)"
        mean, sd, low, high = (f"{scale * v:.{digits}f}" for v in (self.mean, self.sd, self.low, self.high))
        return f"{mean} ± {sd}{unit} (95 % CI {low} to {high}, {self.n} seeds)"


def mean_spread(values: Sequence[float]) -> Spread:
    """Mean, sample sd and the t interval of the mean of ``values``."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("mean_spread needs at least one value")
    mean = float(x.mean())
    if x.size == 1:
        return Spread(1, mean, None, None, None)
    sd = float(x.std(ddof=1))
    half = t975(x.size - 1) * sd / math.sqrt(x.size)
    return Spread(int(x.size), mean, sd, mean - half, mean + half)


@dataclass(frozen=True)
class Difference:
    """``estimate`` = accuracy(a) - accuracy(b) on the same ``n`` images, with its 95 % interval."""

    estimate: float
    low: float
    high: float
    n: int
    groups: tuple[int, int] | None = None  # (models in a, models in b) for ``grouped_bootstrap``

    def text(self) -> str:
        """``+1.20 points (95 % CI +0.35 to +2.05, paired bootstrap over 10,000 test images)``."""
        over = f"{self.n:,} test images"
        if self.groups:
            over += f" and {self.groups[0]} vs {self.groups[1]} models"
        return (
            f"{100 * self.estimate:+.2f} points (95 % CI {100 * self.low:+.2f} to {100 * self.high:+.2f}, "
            f"paired bootstrap over {over})"
        )


def paired_bootstrap(
    correct_a: np.ndarray, correct_b: np.ndarray, n_boot: int = 2000, seed: int = 0, chunk: int = 250
) -> Difference:
    """The difference in accuracy of two models answering the same images (per-image correctness,
    bool or 0/1) with its percentile bootstrap interval; images are drawn with replacement, each
    draw keeping both models' answers on it."""
    a, b = np.asarray(correct_a, dtype=np.float64), np.asarray(correct_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired_bootstrap needs two equal 1-D correctness vectors, got {a.shape} and {b.shape}")
    d = a - b
    rng = np.random.default_rng(seed)
    draws = []
    for start in range(0, n_boot, chunk):  # bounded memory: chunk x n indices at a time
        idx = rng.integers(0, d.size, size=(min(chunk, n_boot - start), d.size))
        draws.append(d[idx].mean(axis=1))
    boot = np.concatenate(draws)
    low, high = np.percentile(boot, [2.5, 97.5])
    return Difference(float(d.mean()), float(low), float(high), int(d.size))


def grouped_bootstrap(
    correct_a: np.ndarray, correct_b: np.ndarray, n_boot: int = 2000, seed: int = 0, chunk: int = 100
) -> Difference:
    """The difference in mean accuracy between two groups of models (rows: models, e.g. committees
    of different seeds; columns: the same test images) with a two-level percentile bootstrap: each
    draw takes the images with replacement (paired across every model) and, independently, each
    group's models with replacement, so the interval holds both the image noise and the spread
    between the group's models. With one model per group it is ``paired_bootstrap``'s interval."""
    a, b = np.asarray(correct_a, dtype=np.float64), np.asarray(correct_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or 0 in a.shape or 0 in b.shape:
        raise ValueError(
            f"grouped_bootstrap needs (models, images) arrays on the same images, got {a.shape} and {b.shape}"
        )
    rng = np.random.default_rng(seed)
    n = a.shape[1]
    draws = []
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        images = rng.integers(0, n, size=(size, n))
        # each draw's per-image accuracy of a resampled group: the mean of the drawn rows
        mean_a = a[rng.integers(0, a.shape[0], size=(size, a.shape[0]))].mean(axis=1)
        mean_b = b[rng.integers(0, b.shape[0], size=(size, b.shape[0]))].mean(axis=1)
        d = mean_a - mean_b
        draws.append(np.take_along_axis(d, images, axis=1).mean(axis=1))
    boot = np.concatenate(draws)
    low, high = np.percentile(boot, [2.5, 97.5])
    return Difference(float(a.mean() - b.mean()), float(low), float(high), int(n), (a.shape[0], b.shape[0]))
