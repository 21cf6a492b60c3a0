"""Per-unit and per-tap statistics of unit matrices (docs/methods.md 2.5-2.9).

All results are plain dicts / lists of Python numbers (JSON-serialisable, except that ``inf`` and
``nan`` may appear: Python's ``json`` writes them as ``Infinity`` / ``NaN``).

Conventions (ours, the papers leave them open):
- A unit "has a cluster" if its greedy rule yields at least one cluster. Units whose matrix has no
  positive maximum, or no diagonal one after binarisation, have none; they are counted apart and
  left out of the per-tap means and the SNR.
- ``mean_labels_per_unit``, ``mean_noise_per_unit``, ``mean_signal_per_unit`` and
  ``snr = mean_signal / mean_noise`` are over the units with a cluster. If their mean noise is 0
  the SNR is ``inf``; with no such unit every mean and the SNR are ``nan``.
- Coverage of label ``l``: the number of units (all units) whose clusters contain ``l``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from itertools import combinations

import numpy as np

from .clusters import DEFAULT_THRESHOLD, binarize, greedy_clusters, unit_stats


@dataclass(frozen=True)
class UnitResult:
    """Clusters and statistics of one unit."""

    clusters: list[list[int]]
    labels: list[int]  # sorted labels of all clusters
    n_labels: int
    n_clusters: int
    signal: int
    noise: int
    has_cluster: bool


def analyse_unit(M: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> UnitResult:
    """Binarise one unit matrix (L, C), find its clusters and count signal and noise."""
    B = binarize(M, threshold)
    clusters = greedy_clusters(B) if B is not None else []
    stats = unit_stats(B, clusters)
    return UnitResult(
        clusters=clusters,
        labels=sorted(l for c in clusters for l in c),
        n_labels=stats.labels,
        n_clusters=stats.n_clusters,
        signal=stats.signal,
        noise=stats.noise,
        has_cluster=stats.n_clusters > 0,
    )


def analyse_units(matrices: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> list[UnitResult]:
    """``analyse_unit`` for every matrix of a (U, L, C) stack."""
    return [analyse_unit(M, threshold) for M in matrices]


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def primary_kind(tap: dict) -> str:
    """The unit kind a tap's headline numbers use: filter (conv taps) or node (token taps)."""
    return "filter" if tap["kind"] == "conv" else "node"


def tap_summary(units: list[UnitResult], num_labels: int, accuracy: float | None = None) -> dict:
    """Per-tap statistics of one unit kind: means over units with a cluster, SNR, coverage."""
    with_cluster = [u for u in units if u.has_cluster]
    signal = _mean([u.signal for u in with_cluster])
    noise = _mean([u.noise for u in with_cluster])
    if math.isnan(signal):
        snr = math.nan
    elif noise == 0:
        snr = math.inf
    else:
        snr = signal / noise
    coverage = [0] * num_labels
    for u in units:
        for l in u.labels:
            coverage[l] += 1
    sizes = [len(c) for u in with_cluster for c in u.clusters]
    return {
        "n_units": len(units),
        "n_units_with_cluster": len(with_cluster),
        "n_units_without_cluster": len(units) - len(with_cluster),
        "mean_labels_per_unit": _mean([u.n_labels for u in with_cluster]),
        "mean_clusters_per_unit": _mean([u.n_clusters for u in with_cluster]),
        "mean_cluster_size": _mean(sizes),
        "unit_cluster_fraction": _mean([float(s == 1) for s in sizes]),
        "mean_signal_per_unit": signal,
        "mean_noise_per_unit": noise,
        "snr": snr,
        "accuracy": accuracy,
        "coverage": coverage,
        "labels_uncovered": sum(c == 0 for c in coverage),
    }


def mean_jaccard(sets: list[set[int]]) -> float:
    """Mean Jaccard index over pairs of sets; pairs of two empty sets are skipped (nan if none left)."""
    values = [len(a & b) / len(a | b) for a, b in combinations(sets, 2) if a | b]
    return _mean(values)


def symmetry_measures(counts: np.ndarray, min_nodes: int = 1) -> dict:
    """Symmetry-breaking measures of a heads x labels count matrix.

    For each label with at least one node: ``max_share`` = largest fraction of its nodes in one
    head; ``entropy`` = entropy of its distribution over heads divided by ``log(heads)`` (1 =
    spread evenly, 0 = one head). ``jaccard`` = mean Jaccard overlap between the heads' label sets,
    a head's set being the labels recognised by at least ``min_nodes`` of its nodes.
    """
    counts = np.asarray(counts, dtype=np.float64)
    heads = counts.shape[0]
    totals = counts.sum(axis=0)
    present = totals > 0
    p = counts[:, present] / totals[present]
    max_share = p.max(axis=0) if present.any() else np.array([])
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=0)
    entropy = ent / math.log(heads) if heads > 1 else np.full(ent.shape, math.nan)
    sets = [set(np.flatnonzero(counts[h] >= min_nodes).tolist()) for h in range(heads)]
    return {
        "mean_max_share": _mean(max_share.tolist()),
        "mean_entropy": _mean(entropy.tolist()),
        "jaccard": mean_jaccard(sets),
        "labels_with_nodes": int(present.sum()),
    }


def node_counts(node_units: list[UnitResult], node_head: np.ndarray, heads: int, num_labels: int) -> np.ndarray:
    """Heads x labels matrix: how many nodes of each head recognise each label."""
    counts = np.zeros((heads, num_labels), dtype=np.int64)
    for u, h in zip(node_units, node_head):
        for l in u.labels:
            counts[h, l] += 1
    return counts


def head_structure(
    head_units: list[UnitResult],
    node_units: list[UnitResult],
    head_dim: int,
    num_labels: int,
    n_control: int = 20,
    seed: int = 0,
    min_nodes: int = 1,
) -> dict:
    """Head structure of an MHA tap (docs/methods.md 2.9).

    (a) SHP: labels recognised per head, heads recognising each label, Jaccard between heads'
    label sets. (b) heads x labels node counts (node = one channel; head ``h`` owns channels
    ``h*head_dim .. (h+1)*head_dim - 1``) and their symmetry measures, next to the same measures
    for a control that randomly reassigns nodes to heads of the same size (``n_control`` seeded
    shuffles; mean and standard deviation reported).
    """
    heads = len(head_units)
    if len(node_units) != heads * head_dim:
        raise ValueError(f"{len(node_units)} nodes do not make {heads} heads of {head_dim}")
    heads_per_label = [0] * num_labels
    for u in head_units:
        for l in u.labels:
            heads_per_label[l] += 1
    shp = {
        "labels_per_head": [u.labels for u in head_units],
        "n_labels_per_head": [u.n_labels for u in head_units],
        "heads_per_label": heads_per_label,
        "mean_heads_per_label": _mean(heads_per_label),
        "jaccard": mean_jaccard([set(u.labels) for u in head_units]),
    }

    owner = np.arange(heads * head_dim) // head_dim
    counts = node_counts(node_units, owner, heads, num_labels)
    rng = np.random.default_rng(seed)
    controls = [
        symmetry_measures(node_counts(node_units, rng.permutation(owner), heads, num_labels), min_nodes)
        for _ in range(n_control)
    ]
    keys = ("mean_max_share", "mean_entropy", "jaccard")
    return {
        "shp": shp,
        "node_counts": counts.tolist(),
        "observed": symmetry_measures(counts, min_nodes),
        "control": {k: _mean([c[k] for c in controls]) for k in keys},
        "control_std": {k: float(np.std([c[k] for c in controls])) if controls else math.nan for k in keys},
        "n_control": n_control,
        "seed": seed,
    }


def summarise_tap(
    units: dict[str, np.ndarray],
    num_labels: int,
    accuracy: float | None = None,
    head_dim: int | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    n_control: int = 20,
    seed: int = 0,
) -> dict:
    """Everything for one tap from its unit matrices (``TapMatrices.units``).

    Returns ``{"threshold", "accuracy", "kinds": {kind: {"summary": tap_summary,
    "units": [unit dicts]}}}`` plus ``"heads": head_structure`` when both "node" and "head"
    matrices are present.
    """
    results = {kind: analyse_units(M, threshold) for kind, M in units.items()}
    out = {
        "threshold": threshold,
        "accuracy": accuracy,
        "kinds": {
            kind: {"summary": tap_summary(res, num_labels, accuracy), "units": [asdict(u) for u in res]}
            for kind, res in results.items()
        },
    }
    if "head" in results and "node" in results:
        head_dim = head_dim or len(results["node"]) // len(results["head"])
        out["heads"] = head_structure(
            results["head"], results["node"], head_dim, num_labels, n_control=n_control, seed=seed
        )
    return out
