"""The results folder of an analysis: tables, JSON, matrices and the label sets for pruning.

Files (``write_results``):

- ``units.parquet``: one row per unit: ``tap``, ``depth`` (tap index), ``unit_kind`` (filter, node,
  head), ``unit``, ``n_labels``, ``labels`` (list), ``clusters`` (list of lists), ``n_clusters``,
  ``signal``, ``noise``, ``has_cluster``.
- ``coverage.parquet``: ``tap``, ``unit_kind``, ``label``, ``units`` (how many units recognise it).
- ``taps.parquet``: one row per tap and unit kind: the means, SNR and readout accuracies, and for
  head rows the head-structure measures next to the shuffled-node control.
- ``taps.json``: ``{"meta": ..., "taps": {tap: summary without per-unit lists}}``.
- ``label_sets.json``: ``{"threshold", "num_classes", "taps": {tap: {unit_kind: [labels of unit 0, ...]}}}``.
- ``matrices.npz`` (optional): key ``"TAP/KIND"`` -> (U, L, C) float32 unit matrices.
- ``figures/``: see ``figures.py``.

Non-finite floats (an infinite SNR when no unit has noise, NaN when no unit has a cluster) stay
native in Parquet and are written as ``Infinity`` / ``NaN`` in the JSON files (Python's ``json``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .pipeline import AnalysisResult

SUMMARY_COLUMNS = ("n_units", "n_units_with_cluster", "mean_labels_per_unit", "mean_noise_per_unit",
                   "mean_signal_per_unit", "mean_clusters_per_unit", "mean_cluster_size",
                   "unit_cluster_fraction", "snr", "labels_uncovered")
HEAD_COLUMNS = ("mean_max_share", "mean_entropy", "jaccard")


def primary_kind(tap: dict) -> str:
    """The unit kind the per-tap headline numbers use: filter (conv taps) or node (token taps)."""
    return "filter" if tap["kind"] == "conv" else "node"


def unit_rows(result: AnalysisResult) -> list[dict]:
    rows = []
    for depth, (tap, info) in enumerate(result.taps.items()):
        for kind, block in info["kinds"].items():
            for i, u in enumerate(block["units"]):
                rows.append({"tap": tap, "depth": depth, "unit_kind": kind, "unit": i, "n_labels": u["n_labels"],
                             "labels": u["labels"], "clusters": u["clusters"], "n_clusters": u["n_clusters"],
                             "signal": u["signal"], "noise": u["noise"], "has_cluster": u["has_cluster"]})
    return rows


def tap_rows(result: AnalysisResult) -> list[dict]:
    rows = []
    for depth, (tap, info) in enumerate(result.taps.items()):
        for kind, block in info["kinds"].items():
            s = block["summary"]
            row = {"tap": tap, "depth": depth, "tap_kind": info["kind"], "unit_kind": kind,
                   "primary": kind == primary_kind(info), "heads": info["heads"], "head_dim": info["head_dim"],
                   "readout_acc": info["accuracy"], "readout_train_acc": info["train_accuracy"],
                   **{c: s[c] for c in SUMMARY_COLUMNS}}
            heads = info.get("heads_structure") if kind == "head" else None
            row["mean_heads_per_label"] = heads["shp"]["mean_heads_per_label"] if heads else None
            for c in HEAD_COLUMNS:
                row[f"nodes_{c}"] = heads["observed"][c] if heads else None
                row[f"nodes_{c}_control"] = heads["control"][c] if heads else None
            rows.append(row)
    return rows


def coverage_rows(result: AnalysisResult) -> list[dict]:
    return [{"tap": tap, "unit_kind": kind, "label": label, "units": count}
            for tap, info in result.taps.items() for kind, block in info["kinds"].items()
            for label, count in enumerate(block["summary"]["coverage"])]


def label_sets(result: AnalysisResult) -> dict:
    return {"threshold": result.meta["threshold"], "num_classes": result.meta["num_classes"],
            "taps": {tap: {kind: [u["labels"] for u in block["units"]] for kind, block in info["kinds"].items()}
                     for tap, info in result.taps.items()}}


def tap_json(result: AnalysisResult) -> dict:
    taps = {}
    for tap, info in result.taps.items():
        taps[tap] = {**{k: v for k, v in info.items() if k != "kinds"},
                     "kinds": {kind: block["summary"] for kind, block in info["kinds"].items()}}
    return {"meta": result.meta, "taps": taps}


def _parquet(rows: list[dict], path: Path) -> None:
    pq.write_table(pa.Table.from_pylist(rows), path)


def write_results(result: AnalysisResult, out_dir: str | Path, save_matrices: bool = True,
                  figures: bool = True) -> Path:
    """Write the results folder (created if needed); returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _parquet(unit_rows(result), out / "units.parquet")
    _parquet(tap_rows(result), out / "taps.parquet")
    _parquet(coverage_rows(result), out / "coverage.parquet")
    (out / "taps.json").write_text(json.dumps(tap_json(result), indent=1))
    (out / "label_sets.json").write_text(json.dumps(label_sets(result)))
    if save_matrices:
        np.savez_compressed(out / "matrices.npz", **{f"{tap}/{kind}": m.astype(np.float32)
                                                     for tap, kinds in result.matrices.items()
                                                     for kind, m in kinds.items()})
    if figures:
        from .figures import write_figures  # matplotlib only when figures are wanted
        write_figures(result, out / "figures")
    return out


def load_matrices(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """``matrices.npz`` as ``{tap: {unit_kind: (U, L, C) float32}}``."""
    out: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path) as data:
        for key in data.files:
            tap, kind = key.rsplit("/", 1)
            out.setdefault(tap, {})[kind] = data[key]
    return out


def load_label_sets(path: str | Path) -> dict[str, dict[str, list[set[int]]]]:
    """``label_sets.json`` as ``{tap: {unit_kind: [set of labels per unit]}}``."""
    data = json.loads(Path(path).read_text())
    return {tap: {kind: [set(labels) for labels in units] for kind, units in kinds.items()}
            for tap, kinds in data["taps"].items()}
