"""The table of a pruning comparison: ``python benchmarks/prune_table.py runs/baselines_cct``.

Reads every ``<cell>/summary.json`` that ``python -m analysis.pruning --config ... --out DIR`` wrote
and prints, per cell, the dilution of the pruned layers, parameters kept, whole units emptied, the
accuracy right after pruning and after fine-tuning (val and test, in %), the validation curve of the
fine-tuning and its wall time, as a markdown table; ``--json`` prints the same rows as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


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
                "method": s["method"],
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
    order = {m: i for i, m in enumerate(("none", "afcc", "andc", "nodal", "random", "magnitude"))}
    return sorted(rows, key=lambda r: (r["finetune_epochs"], order.get(r["method"], 9), r["method"]))


def markdown(rows: list[dict]) -> str:
    head = (
        "| cell | FT epochs | dilution | params kept | units emptied | val / test right after | "
        "val / test fine-tuned | val curve | FT s |\n|---|---|---|---|---|---|---|---|---|"
    )
    lines = [
        f"| {r['method']} | {r['finetune_epochs']} | {r['dilution']:.3f} | {r['params_kept']:,} | "
        f"{r['units_emptied']} | {r['val_pruned']:.2f} / {r['test_pruned']:.2f} | "
        f"{r['val_finetuned']:.2f} / {r['test_finetuned']:.2f} | {' '.join(map(str, r['val_curve']))} | "
        f"{r['finetune_s']} |"
        for r in rows
    ]
    return "\n".join([head, *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the --out folder of analysis.pruning --config")
    parser.add_argument("--json", action="store_true", help="rows as JSON instead of markdown")
    args = parser.parse_args()
    rows = cell_rows(args.folder)
    print(json.dumps(rows, indent=1) if args.json else markdown(rows))


if __name__ == "__main__":
    main()
