"""Figures of an analysis (matplotlib, Agg backend), written as PNG files.

- ``depth.png``: SNR, labels per unit, noise per unit and readout accuracy along the taps.
- ``shp_TAP.png``: each head's SHP matrix (scaled, with a colour bar) of the first and last head tap, labels
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

from .pipeline import AnalysisResult  # noqa: E402
from .summary import primary_kind  # noqa: E402


def cluster_order(clusters: list[list[int]], num_labels: int) -> list[int]:
    """Labels in cluster order, then every label outside the clusters in increasing order."""
    inside = [l for c in clusters for l in c]
    return inside + sorted(set(range(num_labels)) - set(inside))


def plot_depth(result: AnalysisResult, path: Path) -> None:
    taps = list(result.taps)
    rows = [result.taps[t]["kinds"][primary_kind(result.taps[t])]["summary"] for t in taps]
    panels = [
        ("SNR", [r["snr"] for r in rows]),
        ("labels per unit", [r["mean_labels_per_unit"] for r in rows]),
        ("noise per unit", [r["mean_noise_per_unit"] for r in rows]),
        ("readout accuracy", [result.taps[t]["accuracy"] for t in taps]),
    ]
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
    """Each head's SHP matrix (scaled by its largest entry), labels in the head's cluster order so
    clusters sit on the diagonal; axes name the labels, a colour bar gives the scale."""
    heads = result.matrices[tap]["head"]
    units = result.taps[tap]["kinds"]["head"]["units"]
    threshold = result.meta["threshold"]
    cols = min(4, math.ceil(math.sqrt(len(heads))))
    rows = math.ceil(len(heads) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols + 0.8, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    image = None
    for h, (M, unit) in enumerate(zip(heads, units)):
        ax = axes.flat[h]
        ax.axis("on")
        n = min(M.shape)
        order = cluster_order(unit["clusters"], n)
        scale = float(np.abs(M).max()) or 1.0
        image = ax.imshow(M[np.ix_(order, order)] / scale, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        step = max(1, n // 5)
        ax.set_xticks(range(0, n, step), [str(order[i]) for i in range(0, n, step)], fontsize=6)
        ax.set_yticks(range(0, n, step), [str(order[i]) for i in range(0, n, step)], fontsize=6)
        ax.set_xlabel("label (cluster order)", fontsize=7)
        ax.set_ylabel("label", fontsize=7)
        ax.set_title(f"head {h}: {unit['n_labels']} labels, noise {unit['noise']}", fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), fraction=0.03, label="entry / largest entry")
    fig.suptitle(f"SHP of {tap}: entries >= {threshold} of the largest form clusters (on the diagonal)", fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_heads_labels(result: AnalysisResult, head_taps: list[str], path: Path) -> None:
    fig, axes = plt.subplots(
        len(head_taps),
        1,
        figsize=(
            10,
            1.2 + 0.35 * max(len(result.taps[t]["heads_structure"]["node_counts"]) for t in head_taps) * len(head_taps),
        ),
        squeeze=False,
    )
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
