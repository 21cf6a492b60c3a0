"""Figures of an analysis (matplotlib, Agg backend), written as PNG files.

- ``depth.png``: SNR, labels per unit, noise per unit and readout accuracy along the taps.
- ``shp_TAP.png``: one binarised SHP matrix per head of the first and last head tap, labels
  permuted so each head's clusters sit on the diagonal (cluster labels first, the rest after).
- ``heads_labels.png``: per head tap, the heads x labels node counts (labels ordered by the head
  holding most of their nodes).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .clusters import binarize  # noqa: E402
from .pipeline import AnalysisResult  # noqa: E402
from .summary import primary_kind  # noqa: E402


def cluster_order(clusters: list[list[int]], num_labels: int) -> list[int]:
    """Labels in cluster order, then every label outside the clusters in increasing order."""
    inside = [l for c in clusters for l in c]
    return inside + sorted(set(range(num_labels)) - set(inside))


def plot_depth(result: AnalysisResult, path: Path) -> None:
    taps = list(result.taps)
    rows = [result.taps[t]["kinds"][primary_kind(result.taps[t])]["summary"] for t in taps]
    panels = [("SNR", [r["snr"] for r in rows]), ("labels per unit", [r["mean_labels_per_unit"] for r in rows]),
              ("noise per unit", [r["mean_noise_per_unit"] for r in rows]),
              ("readout accuracy", [result.taps[t]["accuracy"] for t in taps])]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, 0.5 * len(taps)), 2.2 * len(panels)), sharex=True)
    x = np.arange(len(taps))
    for ax, (name, values) in zip(axes, panels):
        finite = [v if v is not None and math.isfinite(v) else np.nan for v in values]
        ax.plot(x, finite, "o-")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[-1].set_xticks(x, taps, rotation=60, ha="right", fontsize=8)
    fig.suptitle(f"single-unit performance along depth (threshold {result.meta['threshold']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_shp_grid(result: AnalysisResult, tap: str, path: Path) -> None:
    heads = result.matrices[tap]["head"]
    units = result.taps[tap]["kinds"]["head"]["units"]
    threshold = result.meta["threshold"]
    cols = math.ceil(math.sqrt(len(heads)))
    rows = math.ceil(len(heads) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(4.0, 2.2 * cols), 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for h, (M, unit) in enumerate(zip(heads, units)):
        B = binarize(M, threshold)
        ax = axes.flat[h]
        if B is not None:
            order = cluster_order(unit["clusters"], min(B.shape))
            order += list(range(min(B.shape), max(B.shape)))
            ax.imshow(B[np.ix_(order[:B.shape[0]], order[:B.shape[1]])], cmap="Greys", interpolation="nearest")
        ax.set_title(f"head {h}: {unit['n_labels']} labels, noise {unit['noise']}", fontsize=7)
    fig.suptitle(f"SHP of {tap} (binarised at {threshold}, clusters on the diagonal)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_heads_labels(result: AnalysisResult, head_taps: list[str], path: Path) -> None:
    fig, axes = plt.subplots(len(head_taps), 1, figsize=(10, 1.2 + 0.35 * max(
        len(result.taps[t]["heads_structure"]["node_counts"]) for t in head_taps) * len(head_taps)), squeeze=False)
    for ax, tap in zip(axes[:, 0], head_taps):
        counts = np.asarray(result.taps[tap]["heads_structure"]["node_counts"])
        order = np.lexsort((-counts.max(axis=0), counts.argmax(axis=0)))
        image = ax.imshow(counts[:, order], aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_ylabel("head")
        ax.set_yticks(range(counts.shape[0]))
        ax.set_title(f"{tap}: nodes per head recognising each label (labels sorted by main head)", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.02)
    axes[-1, 0].set_xlabel("label (permuted)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_figures(result: AnalysisResult, folder: Path) -> list[Path]:
    """Write every figure that applies to this result; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "depth.png"]
    plot_depth(result, paths[0])
    head_taps = [t for t, info in result.taps.items() if info["heads_structure"] is not None]
    for tap in dict.fromkeys(head_taps[:1] + head_taps[-1:]):
        paths.append(folder / f"shp_{tap}.png")
        plot_shp_grid(result, tap, paths[-1])
    if head_taps:
        paths.append(folder / "heads_labels.png")
        plot_heads_labels(result, head_taps, paths[-1])
    return paths
