"""Prune a trained run: ``python -m analysis.pruning --parent RUN_DIR --method afcc --out DIR``.

Two modes:

- ``--parent RUN_DIR``: one job (``analysis.pruning.job.run_prune_job``) with the flags given.
- ``--config FILE.yaml --out DIR``: the file is a ``trainables.train`` job config plus a top-level
  ``prune:`` section (stripped by ``split_config`` before the job config is validated). The parent
  is trained into ``DIR/parent`` (skipped when ``DIR/parent/model.pt`` exists, or when
  ``--parent`` names one), then every method of ``prune.methods`` runs into ``DIR/<method>``
  with the other ``prune:`` keys as its ``PruneConfig``. Label sets are computed once, by the
  first method that needs them, and reused by the others (the random control gets exactly the
  guided mask's per-layer dilution).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from analysis.pruning.job import PruneConfig, PrunePlan, run_prune_job
from analysis.units.results import load_label_sets
from trainables.config import load_yaml, prepare
from trainables.run_folder import WEIGHTS, RunFolder
from trainables.schema import InputError, OneLineParser, output_folder, refuse
from trainables.train import run_job


def split_config(doc: dict[str, Any]) -> tuple[dict[str, Any], PrunePlan]:
    """(train job config, prune plan) from a config file with a ``prune:`` section."""
    train = {k: v for k, v in doc.items() if k != "prune"}
    return train, PrunePlan.parse(doc.get("prune") or {})


def run_config(
    path: str | Path, out: Path, parent: Path | None = None, label_sets_file: Path | None = None
) -> dict[str, dict]:
    """Train the parent if needed, then run every cell of the plan; returns summaries by cell label.
    ``label_sets_file`` (a ``label_sets.json`` of this parent) stands in for the first analysis."""
    train, plan = split_config(load_yaml(path))
    job = prepare(train)
    cells = plan.cells()
    if parent is None:
        parent = out / "parent"
        if RunFolder(parent).missing((WEIGHTS,)):
            run_job(
                job,
                parent,
                on_epoch=lambda m, _c: print(f"parent epoch {m['epoch'] + 1}: val_acc={m['val_acc']:.4f}", flush=True),
            )
    summaries: dict[str, dict] = {}
    label_sets = None
    if label_sets_file is not None:
        label_sets = (next(iter(cells.values())).threshold, load_label_sets(label_sets_file))
    per_method = [c.method for c in cells.values()]
    for label, config in cells.items():
        folder = out / (config.method if per_method.count(config.method) == 1 else label.replace(",", "_"))
        reuse = label_sets if label_sets and label_sets[0] == config.threshold else None
        summaries[label] = run_prune_job(parent, folder, config, label_sets=reuse and reuse[1])
        if reuse is None and (folder / "label_sets.json").is_file():
            label_sets = (config.threshold, load_label_sets(folder / "label_sets.json"))
        print(_line(summaries[label]), flush=True)
    return summaries


def _line(summary: dict) -> str:
    acc = {k: summary[f"acc_{k}"] for k in ("before", "pruned", "finetuned")}
    return (
        f"{summary['method']}: dilution={summary['dilution_pruned_layers']:.3f} "
        f"params_kept={summary['params_kept']:,}/{summary['params_total']:,} "
        + " ".join(f"{k}: val={v['val']:.4f} test={v['test']:.4f}" for k, v in acc.items())
    )


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="python -m analysis.pruning", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--parent", default=None, help="run_job output folder (spec.json, config.json, model.pt)")
    parser.add_argument("--config", default=None, help="job config YAML with a prune: section")
    parser.add_argument("--label-sets", default=None, help="label_sets.json to reuse instead of the analysis")
    parser.add_argument("--data-dir", default=None, help="override the parent's data.data_dir")
    PruneConfig.add_flags(parser, skip=("taps", "save_matrices"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = output_folder(args.out)
        if args.config:
            parent = Path(args.parent) if args.parent else None
            run_config(args.config, out, parent, Path(args.label_sets) if args.label_sets else None)
            return 0
        if not args.parent:
            raise InputError("--parent or --config: one is required")
        config = PruneConfig.from_flags(args)
        summary = run_prune_job(
            args.parent,
            out,
            config,
            overrides={"data": {"data_dir": args.data_dir}} if args.data_dir else None,
            label_sets=load_label_sets(args.label_sets) if args.label_sets else None,
            on_epoch=lambda m: print(f"finetune epoch {m['epoch'] + 1}: val_acc={m['val_acc']:.4f}", flush=True),
        )
    except InputError as exc:
        return refuse(exc)
    print(_line(summary) + f" -> {out}")
    return 0
