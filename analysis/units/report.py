"""Markdown tables of a results folder: ``python -m analysis.units.report RESULTS_DIR [RESULTS_DIR ...]``.

Per tap (depth order): units, readout accuracy, mean labels per unit, mean noise per unit and SNR
of the tap's primary unit kind (filters for conv taps, nodes for token taps). Per head tap: labels
per head, heads per label (SHP), and the nodes' largest share of a label in one head, observed vs
the shuffled-node control (mean +- std over the control draws; docs/methods.md 2.9).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from trainables.schema import OneLineParser, refuse


def _load(folder: Path) -> dict:
    path = folder / "taps.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (expected an analysis.units.run results folder)")
    return json.loads(path.read_text())


def depth_table(taps_json: dict) -> str:
    """One row per tap: units, readout accuracy, labels / unit, noise / unit, SNR."""
    rows = ["| tap | units | readout acc | labels / unit | noise / unit | SNR |", "|---|---|---|---|---|---|"]
    for tap, info in taps_json["taps"].items():
        s = info["kinds"]["filter" if info["kind"] == "conv" else "node"]
        snr = "-" if s["snr"] is None else f"{s['snr']:.3f}"
        rows.append(
            f"| {tap} | {s['n_units']} | {info['accuracy']:.3f} | {s['mean_labels_per_unit']:.2f} | "
            f"{s['mean_noise_per_unit']:.1f} | {snr} |"
        )
    return "\n".join(rows)


def heads_table(taps_json: dict) -> str:
    """One row per head tap: heads, labels / head, heads / label, max share observed vs control."""
    rows = [
        "| tap | heads | labels / head | heads / label | max share of a label in one head (observed) "
        "| same, shuffled nodes (control) |",
        "|---|---|---|---|---|---|",
    ]
    for tap, info in taps_json["taps"].items():
        hs = info.get("heads_structure")
        if not hs:
            continue
        head = info["kinds"]["head"]
        obs, ctl, std = hs["observed"], hs["control"], hs["control_std"]
        rows.append(
            f"| {tap} | {head['n_units']} | {head['mean_labels_per_unit']:.2f} | "
            f"{hs['shp']['mean_heads_per_label']:.2f} | {obs['mean_max_share']:.3f} | "
            f"{ctl['mean_max_share']:.3f} +- {std['mean_max_share']:.3f} |"
        )
    return "\n".join(rows) if len(rows) > 2 else ""


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m analysis.units.report", description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="analysis.units.run results folders")
    args = parser.parse_args(argv)
    for folder in map(Path, args.results):
        try:
            taps_json = _load(folder)
        except (FileNotFoundError, json.JSONDecodeError) as exc:
            return refuse(exc)
        meta = taps_json["meta"]
        print(
            f"### {folder}\n\n{meta.get('dataset', '?')}, threshold {meta['threshold']}, recipe {meta['recipe']}, "
            f"readouts on {meta['train_size']} training images, matrices on {meta['test_size']} test images\n"
        )
        print(depth_table(taps_json) + "\n")
        heads = heads_table(taps_json)
        if heads:
            print(heads + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
