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
- ``matrices.npz`` (optional): key ``"TAP/KIND"`` -> (U, L, C) **float32** unit matrices
  (compressed), exactly the values the analysis thresholded: ``clusters.binarize`` at the
  ``label_sets.json`` threshold plus ``clusters.greedy_clusters`` reproduce every unit's labels,
  clusters, signal and noise. At 100 labels x 100 outputs: 40 MB per 1,000 units uncompressed,
  about 37 MB compressed (float32 mantissas barely compress).
  ``load_matrices`` also reads the older layout (float16 matrices divided by their largest
  absolute entry, with those maxima under ``"TAP/KIND/scale"``).
- ``readouts.npz``: everything needed to recompute every matrix exactly from the model and the
  data: ``TAP/weight`` (C, F) float32 readout weight acting on the scaled readout input,
  ``TAP/scale`` (the scalar the tap features are divided by), ``TAP/pool`` (D,) float32 pooling
  vector for token taps, ``test_rows`` and ``train_rows`` (int64 rows of the dataset's source test
  and training splits the matrices and readouts used). Plain arrays: load with
  ``np.load(path, allow_pickle=False)`` (``load_readouts``).
- ``figures/``: see ``figures.py``.

Non-finite floats (an infinite SNR when no unit has noise, NaN when no unit has a cluster) stay
native in Parquet and are written as ``Infinity`` / ``NaN`` in the JSON files (Python's ``json``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from trainables.run_folder import LABEL_SETS
from trainables.schema import InputError

from .pipeline import AnalysisResult
from .summary import primary_kind

SUMMARY_COLUMNS = (
    "n_units",
    "n_units_with_cluster",
    "mean_labels_per_unit",
    "mean_noise_per_unit",
    "mean_signal_per_unit",
    "mean_clusters_per_unit",
    "mean_cluster_size",
    "unit_cluster_fraction",
    "snr",
    "labels_uncovered",
)
HEAD_COLUMNS = ("mean_max_share", "mean_entropy", "jaccard")


def unit_rows(result: AnalysisResult) -> list[dict]:
    rows = []
    for depth, (tap, info) in enumerate(result.taps.items()):
        for kind, block in info["kinds"].items():
            for i, u in enumerate(block["units"]):
                rows.append(
                    {
                        "tap": tap,
                        "depth": depth,
                        "unit_kind": kind,
                        "unit": i,
                        "n_labels": u["n_labels"],
                        "labels": u["labels"],
                        "clusters": u["clusters"],
                        "n_clusters": u["n_clusters"],
                        "signal": u["signal"],
                        "noise": u["noise"],
                        "has_cluster": u["has_cluster"],
                    }
                )
    return rows


def tap_rows(result: AnalysisResult) -> list[dict]:
    rows = []
    for depth, (tap, info) in enumerate(result.taps.items()):
        for kind, block in info["kinds"].items():
            s = block["summary"]
            row = {
                "tap": tap,
                "depth": depth,
                "tap_kind": info["kind"],
                "unit_kind": kind,
                "primary": kind == primary_kind(info),
                "heads": info["heads"],
                "head_dim": info["head_dim"],
                "readout_acc": info["accuracy"],
                "readout_train_acc": info["train_accuracy"],
                **{c: s[c] for c in SUMMARY_COLUMNS},
            }
            heads = info.get("heads_structure") if kind == "head" else None
            row["mean_heads_per_label"] = heads["shp"]["mean_heads_per_label"] if heads else None
            for c in HEAD_COLUMNS:
                row[f"nodes_{c}"] = heads["observed"][c] if heads else None
                row[f"nodes_{c}_control"] = heads["control"][c] if heads else None
            rows.append(row)
    return rows


def coverage_rows(result: AnalysisResult) -> list[dict]:
    return [
        {"tap": tap, "unit_kind": kind, "label": label, "units": count}
        for tap, info in result.taps.items()
        for kind, block in info["kinds"].items()
        for label, count in enumerate(block["summary"]["coverage"])
    ]


def label_set_layout(result: AnalysisResult) -> dict[str, dict[str, list[set[int]]]]:
    """``{tap: {unit_kind: [set of labels per unit]}}`` of an analysis."""
    return {
        tap: {kind: [set(u["labels"]) for u in block["units"]] for kind, block in info["kinds"].items()}
        for tap, info in result.taps.items()
    }


def save_label_sets(
    path: str | Path, layout: dict[str, dict[str, list[set[int]]]], threshold: float, num_classes: int
) -> None:
    """Write ``label_sets.json`` (the one layout, read back by ``load_label_sets``)."""
    taps = {
        tap: {kind: [sorted(int(l) for l in unit) for unit in units] for kind, units in kinds.items()}
        for tap, kinds in layout.items()
    }
    Path(path).write_text(json.dumps({"threshold": threshold, "num_classes": num_classes, "taps": taps}))


def tap_json(result: AnalysisResult) -> dict:
    taps = {}
    for tap, info in result.taps.items():
        taps[tap] = {
            **{k: v for k, v in info.items() if k != "kinds"},
            "kinds": {kind: block["summary"] for kind, block in info["kinds"].items()},
        }
    return {"meta": result.meta, "taps": taps}


def _table(rows: list[dict], path: Path) -> None:
    """A table as Parquet (typed, for code) and as CSV beside it (for MLflow's artifact preview and
    spreadsheets; lists written as space-separated values)."""
    pq.write_table(pa.Table.from_pylist(rows), path)
    with path.with_suffix(".csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: " ".join(map(str, v)) if isinstance(v, (list, tuple)) else v for k, v in row.items()})


def write_results(
    result: AnalysisResult, out_dir: str | Path, save_matrices: bool = True, figures: bool = True
) -> Path:
    """Write the results folder (created if needed); returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _table(unit_rows(result), out / "units.parquet")
    _table(tap_rows(result), out / "taps.parquet")
    _table(coverage_rows(result), out / "coverage.parquet")
    (out / "taps.json").write_text(json.dumps(tap_json(result), indent=1))
    save_label_sets(out / LABEL_SETS, label_set_layout(result), result.meta["threshold"], result.meta["num_classes"])
    if save_matrices:
        np.savez_compressed(out / "matrices.npz", **matrix_arrays(result.matrices))
    np.savez_compressed(out / "readouts.npz", **readout_arrays(result))
    if figures:
        from .figures import write_figures  # matplotlib only when figures are wanted

        write_figures(result, out / "figures")
    return out


def matrix_arrays(matrices: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The arrays of ``matrices.npz``: ``"TAP/KIND"`` -> the analysis's own float32 unit matrices."""
    return {
        f"{tap}/{kind}": np.asarray(m, dtype=np.float32) for tap, kinds in matrices.items() for kind, m in kinds.items()
    }


def readout_arrays(result: AnalysisResult) -> dict[str, np.ndarray]:
    """The arrays of ``readouts.npz``: each tap's readout parameters plus the train and test rows."""
    arrays = {
        "test_rows": np.asarray(result.test_rows, dtype=np.int64),
        "train_rows": np.asarray(result.train_rows, dtype=np.int64),
    }
    for tap, res in result.readouts.items():
        arrays[f"{tap}/weight"] = res.readout.fc.weight.detach().float().cpu().numpy()
        arrays[f"{tap}/scale"] = np.float32(res.readout.scale)
        if res.readout.pool is not None:
            arrays[f"{tap}/pool"] = res.readout.pool.detach().float().cpu().numpy()
    return arrays


def load_readouts(path: str | Path) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """``readouts.npz`` as (``{tap: {"weight", "scale"[, "pool"]}}``, ``{"test_rows", "train_rows"}``)."""
    taps: dict[str, dict[str, np.ndarray]] = {}
    rows: dict[str, np.ndarray] = {}
    with np.load(path, allow_pickle=False) as data:
        for key in data.files:
            if "/" in key:
                tap, name = key.rsplit("/", 1)
                taps.setdefault(tap, {})[name] = data[key]
            else:
                rows[key] = data[key]
    return taps, rows


def load_matrices(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """``matrices.npz`` as ``{tap: {unit_kind: (U, L, C) float32}}``; the old scaled-float16 layout
    (``"TAP/KIND/scale"`` keys) is scaled back."""
    out: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path, allow_pickle=False) as data:
        for key in data.files:
            if key.endswith("/scale"):
                continue
            m = data[key].astype(np.float32)
            if f"{key}/scale" in data.files:
                m *= data[f"{key}/scale"][:, None, None]
            tap, kind = key.rsplit("/", 1)
            out.setdefault(tap, {})[kind] = m
    return out


def load_label_sets(path: str | Path) -> dict[str, dict[str, list[set[int]]]]:
    """``label_sets.json`` as ``{tap: {unit_kind: [set of labels per unit]}}``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        return {
            tap: {kind: [set(int(l) for l in labels) for labels in units] for kind, units in kinds.items()}
            for tap, kinds in data["taps"].items()
        }
    except FileNotFoundError:
        raise InputError(str(path), "not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError, ValueError) as exc:
        raise InputError(str(path), f"not a label_sets.json file ({type(exc).__name__}: {exc})") from None
