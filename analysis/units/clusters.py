"""Binarised unit matrices and the authors' greedy cluster rule (docs/methods.md 2.5-2.7).

A unit matrix ``M[l, j]`` has rows = true labels and columns = output units. Clusters are sets of
labels forming an all-ones square block of the binarised matrix ``B`` on rows and columns at once,
so a label ``l`` can only be in a cluster if it indexes both a row and a column: when ``B`` is not
square, only indices ``l < min(rows, cols)`` can be diagonal (candidate) labels. Ones anywhere else
in ``B`` count as noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_THRESHOLD = 0.3


def binarize(M: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray | None:
    """Return ``M / max(M) > threshold`` as a bool array, or None if ``max(M) <= 0``.

    None means the unit has no cluster (its matrix cannot be normalised by a positive maximum).
    """
    M = np.asarray(M, dtype=np.float64)
    peak = float(np.max(M)) if M.size else 0.0
    if not peak > 0.0:  # also catches NaN
        return None
    return (M / peak) > threshold


def greedy_clusters(B: np.ndarray) -> list[list[int]]:
    """Greedy clusters of a binary matrix, exactly the rule of docs/methods.md 2.6.

    Candidates are the labels ``l < min(B.shape)`` with ``B[l, l]`` true. In increasing label order,
    a cluster starts with the first unused candidate and takes every later unused candidate ``c``
    such that ``B[a, c]`` and ``B[c, a]`` hold for every label ``a`` already in the cluster (so the
    cluster stays an all-ones square block). Its labels are then used, and the scan repeats.
    Single-label ("unit") clusters are allowed. Returns clusters as sorted label lists, ordered by
    their first label.
    """
    B = np.asarray(B, dtype=bool)
    if B.ndim != 2:
        raise ValueError(f"B must be 2-D, got shape {B.shape}")
    n = min(B.shape)
    candidates = [l for l in range(n) if B[l, l]]
    used: set[int] = set()
    clusters: list[list[int]] = []
    for start in candidates:
        if start in used:
            continue
        cluster = [start]
        used.add(start)
        for c in candidates:
            if c <= start or c in used:
                continue
            if all(B[a, c] and B[c, a] for a in cluster):
                cluster.append(c)
                used.add(c)
        clusters.append(cluster)
    return clusters


@dataclass(frozen=True)
class UnitStats:
    """Cluster statistics of one unit (docs/methods.md 2.7)."""

    labels: int  # labels recognised = sum of cluster sizes
    n_clusters: int
    signal: int  # sum over clusters of |C|^2 (ones inside the blocks)
    noise: int  # ones of B outside the blocks


def unit_stats(B: np.ndarray | None, clusters: list[list[int]]) -> UnitStats:
    """Labels recognised, number of clusters, signal and noise of a unit.

    ``B=None`` (a unit whose matrix has no positive maximum) gives all zeros. The blocks are all-ones
    by construction, so noise = total ones of ``B`` minus the signal.
    """
    if B is None:
        return UnitStats(labels=0, n_clusters=0, signal=0, noise=0)
    B = np.asarray(B, dtype=bool)
    labels = sum(len(c) for c in clusters)
    signal = sum(len(c) ** 2 for c in clusters)
    inside = sum(int(B[np.ix_(c, c)].sum()) for c in clusters)
    if inside != signal:
        raise ValueError("clusters are not all-ones square blocks of B")
    return UnitStats(labels=labels, n_clusters=len(clusters), signal=signal, noise=int(B.sum()) - signal)
