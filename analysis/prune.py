"""Prune a trained run: ``python -m analysis.prune --parent RUN_DIR --method afcc --out DIR``.

Two modes:

- ``--parent RUN_DIR``: one job (``analysis.prune_job.run_prune_job``) with the flags given.
- ``--config FILE.yaml --out DIR``: the file is a ``trainables.train`` job config plus a top-level
  ``prune:`` section (stripped by ``split_config`` before the job config is validated). The parent
  is trained into ``DIR/parent`` (skipped when ``DIR/parent/model.pt`` exists, or when
  ``--parent`` names one), then every method of ``prune.methods`` runs into ``DIR/<method>``
  with the other ``prune:`` keys as its ``PruneConfig``. Label sets are computed once, by the
  first method that needs them, and reused by the others (the random control gets exactly the
  guided mask's per-layer dilution).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from analysis.prune_job import PruneConfig, load_label_sets, run_prune_job
from analysis.pruning import PruneError
from trainables.config import ConfigError, load_yaml
from trainables.data import DataError
from trainables.models import SpecError
from trainables.train import run_job


def split_config(doc: dict[str, Any]) -> tuple[dict[str, Any], list[str], dict[str, Any]]:
    """(train job config, methods, PruneConfig keys) from a config file with a ``prune:`` section."""
    train = {k: v for k, v in doc.items() if k != "prune"}
    prune = dict(doc.get("prune") or {})
    if "method" in prune:
        raise PruneError("prune.method: list the methods under prune.methods")
    methods = prune.pop("methods", ["afcc"])
    if not isinstance(methods, list) or not methods:
        raise PruneError(f"prune.methods: must be a non-empty list, got {methods!r}")
    for method in methods:
        PruneConfig.from_dict({**prune, "method": method})
    return train, methods, prune


def run_config(path: str | Path, out: Path, parent: Path | None = None) -> dict[str, dict]:
    """Train the parent if needed, then run every configured method; returns summaries by method."""
    train, methods, prune = split_config(load_yaml(path))
    if parent is None:
        parent = out / "parent"
        if not (parent / "model.pt").is_file():
            run_job(train, parent, on_epoch=lambda m, _c: print(f"parent epoch {m['epoch'] + 1}: "
                                                                f"val_acc={m['val_acc']:.4f}", flush=True))
    summaries: dict[str, dict] = {}
    label_sets = None
    for method in methods:
        config = PruneConfig.from_dict({**prune, "method": method})
        summaries[method] = run_prune_job(parent, out / method, config, label_sets=label_sets)
        if label_sets is None and (out / method / "label_sets.json").is_file():
            label_sets = load_label_sets(out / method / "label_sets.json")
        print(_line(summaries[method]), flush=True)
    return summaries


def _line(summary: dict) -> str:
    acc = {k: summary[f"acc_{k}"] for k in ("before", "pruned", "finetuned")}
    return (f"{summary['method']}: dilution={summary['dilution_pruned_layers']:.3f} "
            f"params_kept={summary['params_kept']:,}/{summary['params_total']:,} "
            + " ".join(f"{k}: val={v['val']:.4f} test={v['test']:.4f}" for k, v in acc.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.prune", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--parent", default=None, help="run_job output folder (spec.json, config.json, model.pt)")
    parser.add_argument("--config", default=None, help="job config YAML with a prune: section")
    parser.add_argument("--method", default="afcc", help="none | afcc | andc | nodal | random | random_labels")
    parser.add_argument("--threshold", type=float, default=0.3)
    parser.add_argument("--level", type=float, default=None, help="dilution of a random mask (method random)")
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--finetune-lr", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--random-labels-k", type=int, default=5, help="labels per unit (method random_labels)")
    parser.add_argument("--start-tap", default=None, help="prune only layers fed by this tap or deeper ones")
    parser.add_argument("--label-sets", default=None, help="label_sets.json to reuse instead of the analysis")
    parser.add_argument("--data-dir", default=None, help="override the parent's data.data_dir")
    args = parser.parse_args(argv)
    try:
        out = Path(args.out)
        if args.config:
            run_config(args.config, out, Path(args.parent) if args.parent else None)
            return 0
        if not args.parent:
            raise PruneError("--parent or --config: one is required")
        config = PruneConfig(method=args.method, threshold=args.threshold, level=args.level,
                             finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr,
                             seed=args.seed, start_tap=args.start_tap,
                             random_labels_k=args.random_labels_k)
        summary = run_prune_job(
            args.parent, out, config,
            overrides={"data": {"data_dir": args.data_dir}} if args.data_dir else None,
            label_sets=load_label_sets(args.label_sets) if args.label_sets else None,
            on_epoch=lambda m: print(f"finetune epoch {m['epoch'] + 1}: val_acc={m['val_acc']:.4f}", flush=True))
    except (PruneError, ConfigError, SpecError, DataError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(_line(summary) + f" -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
