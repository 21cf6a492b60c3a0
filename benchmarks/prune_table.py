"""The table of a pruning comparison: ``python benchmarks/prune_table.py runs/baselines_cct [MORE ...]``.

Reads every ``<cell>/summary.json`` that ``python -m analysis.pruning --config ... --out DIR`` wrote
and prints, per cell, the dilution of the pruned layers, parameters kept, whole units emptied, the
accuracy right after pruning and after fine-tuning (val and test, in %), the validation curve of the
fine-tuning and its wall time, as a markdown table; ``--json`` prints the same rows as JSON.
Where a method ran with several seeds (``prune.seeds``, or several folders: one per parent), a second table gives each method's mean ±
sd over seeds and its validation difference from the guided method with a 95 % interval over the
validation images and the seeds (``analysis.stats.grouped_bootstrap`` on the cells' stored
probabilities; validation, because the analysis that chose the guided masks read the test images).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from analysis.stats import grouped_bootstrap, mean_spread
from trainables.probs import read_probs

GUIDED = ("afcc", "andc", "nodal")
ORDER = {m: i for i, m in enumerate(("none", "afcc", "andc", "nodal", "random", "magnitude"))}


def cell_rows(folder: Path) -> list[dict]:
    """One row per prune job folder under ``folder`` (the parent's folder is skipped)."""
    rows = []
    for path in sorted(folder.glob("*/summary.json")):
        if path.parent.name == "parent":
            continue
        s = json.loads(path.read_text())
        prune = s["prune"]
        rows.append(
            {
                "cell": path.parent.name,
                "dir": str(path.parent),
                "method": s["method"],
                "seed": prune["seed"],
                "finetune_epochs": prune["finetune_epochs"],
                "dilution": round(s["dilution_pruned_layers"], 3),
                "params_kept": s["params_kept"],
                "params_total": s["params_total"],
                "units_emptied": sum(s.get("units_emptied", {}).values()),
                "val_pruned": 100 * s["acc_pruned"]["val"],
                "test_pruned": 100 * s["acc_pruned"]["test"],
                "val_finetuned": 100 * s["acc_finetuned"]["val"],
                "test_finetuned": 100 * s["acc_finetuned"]["test"],
                "val_curve": [round(100 * h["val_acc"], 2) for h in s["history"]],
                "finetune_s": round(s["seconds"].get("finetune", 0.0)),
            }
        )
    return rows


def markdown(rows: list[dict]) -> str:
    head = (
        "| folder | cell | seed | FT epochs | dilution | params kept | units emptied | val / test right after | "
        "val / test fine-tuned | val curve | FT s |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [
        f"| {Path(r['dir']).parent.name} | {r['method']} | {r['seed']} | {r['finetune_epochs']} | {r['dilution']:.3f} | {r['params_kept']:,} | "
        f"{r['units_emptied']} | {r['val_pruned']:.2f} / {r['test_pruned']:.2f} | "
        f"{r['val_finetuned']:.2f} / {r['test_finetuned']:.2f} | {' '.join(map(str, r['val_curve']))} | "
        f"{r['finetune_s']} |"
        for r in rows
    ]
    return "\n".join([head, *lines])


def _correct(row: dict) -> np.ndarray:
    _, labels, probs, _ = read_probs(Path(row["dir"]) / "probs_val.parquet")
    return probs.argmax(axis=1) == labels


def seed_table(rows: list[dict]) -> str | None:
    """Per method and budget with several seeds: mean ± sd over seeds, and the validation difference
    from the guided method of the same budget with its interval over images and seeds; None without seeds."""
    groups: dict[tuple[int, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["finetune_epochs"], r["method"]), []).append(r)
    if all(len(g) < 2 for g in groups.values()):
        return None
    lines = [
        "| cell | FT epochs | seeds | test right after | val fine-tuned | test fine-tuned | val minus guided [95 % CI] |",
        "|---|---|---|---|---|---|---|",
    ]
    for (epochs, method), group in groups.items():
        guided = next((groups[(epochs, m)] for m in GUIDED if (epochs, m) in groups), None)
        versus = ""
        if guided is not None and method not in GUIDED:
            d = grouped_bootstrap(
                np.stack([_correct(r) for r in group]),
                np.stack([_correct(r) for r in guided]),
            )
            versus = f"{100 * d.estimate:+.2f} [{100 * d.low:+.2f}, {100 * d.high:+.2f}]"
        spread = {
            k: mean_spread([r[k] / 100 for r in group]).text()
            for k in ("test_pruned", "val_finetuned", "test_finetuned")
        }
        lines.append(
            f"| {method} | {epochs} | {len(group)} | {spread['test_pruned']} | {spread['val_finetuned']} | "
            f"{spread['test_finetuned']} | {versus} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", type=Path, nargs="+", help="--out folders of analysis.pruning --config")
    parser.add_argument("--json", action="store_true", help="rows as JSON instead of markdown")
    args = parser.parse_args()
    rows = [r for folder in args.folders for r in cell_rows(folder)]
    rows.sort(key=lambda r: (r["finetune_epochs"], ORDER.get(r["method"], 9), r["method"], r["seed"]))
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(markdown(rows))
    seeds = seed_table(rows)
    if seeds:
        print("\n" + seeds)


if __name__ == "__main__":
    main()
