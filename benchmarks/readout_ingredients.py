"""Which readout ingredients move the unit statistics, and does L-BFGS give the authors' answer?

    python benchmarks/readout_ingredients.py --run-dir RUN [--train-size 2000] [--test-size 2000] \\
        [--taps a,b] [--variants paper,lbfgs,adamw_wd1e-4_30ep]

For every tap of a trained model (a ``trainables.train`` output folder), train readouts with several
recipes on the same cached features (all taps at once, ``readout.train_readouts``) and report per
variant and tap: readout test accuracy, labels per unit, noise per unit, SNR (primary unit kind,
threshold 0.3), plus each variant's seconds for all taps. Variants:

- ``paper``: the authors' SGD schedule (200 epochs, weight decay 1e-3);
- ``lbfgs``: our default, the same objective solved by full-batch L-BFGS;
- ``adamw_wd1e-4_30ep``: the old default (AdamW lr 2e-3, weight decay 1e-4, 30 epochs, cosine);
- ``adamw_wd1e-3_30ep``: the same with the authors' weight decay;
- ``paper_seed1``: the authors' schedule with another shuffle (SGD's own seed-to-seed spread);
- ``paper_100ep`` / ``paper_50ep``: the authors' schedule stopped after 100 / 50 epochs;
- ``lbfgs_wd1e-4``, ``lbfgs_wd4e-3``, ``lbfgs_wd8e-3``: L-BFGS with other weight decays (does a
  larger penalty stand in for the authors' early stopping? Not within 10 % at every tap).

Prints one JSON object: per variant and tap the statistics, plus each variant's difference from
``paper`` (accuracy in points, labels per unit and SNR relative).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from analysis.units.features import collect_features
from analysis.units.matrices import tap_unit_matrices
from analysis.units.readout import evaluate, train_readouts
from analysis.units.run import load_model, norm_of, run_dir_inputs
from analysis.units.summary import summarise_tap
from trainables.data import load_splits
from trainables.loader import to_model_input

ADAMW = dict(optimizer="adamw", lr=2e-3, batch_size=256, epochs=30, schedule="cosine", scale_features=True)
VARIANTS: dict[str, tuple[str, dict]] = {
    "paper": ("paper", {}),
    "lbfgs": ("lbfgs", {}),
    "adamw_wd1e-4_30ep": ("paper", {**ADAMW, "weight_decay": 1e-4}),
    "adamw_wd1e-3_30ep": ("paper", {**ADAMW, "weight_decay": 1e-3}),
    "paper_seed1": ("paper", {"seed": 1}),
    "paper_100ep": ("paper", {"epochs": 100}),
    "paper_50ep": ("paper", {"epochs": 50}),
    "lbfgs_wd1e-4": ("lbfgs", {"weight_decay": 1e-4}),
    "lbfgs_wd4e-3": ("lbfgs", {"weight_decay": 4.1e-3}),
    "lbfgs_wd8e-3": ("lbfgs", {"weight_decay": 8e-3}),
}
STATS = ("accuracy", "labels_per_unit", "noise_per_unit", "snr")


def tap_stats(result, test_x, test_y, info, num_labels: int) -> dict:
    tm = tap_unit_matrices(result.readout, test_x, test_y, num_labels, head_dim=info.head_dim)
    summary = summarise_tap(tm.units, num_labels, result.test_accuracy, head_dim=info.head_dim)
    kind = "filter" if info.kind == "conv" else "node"
    s = summary["kinds"][kind]["summary"]
    return {
        "accuracy": result.test_accuracy,
        "train_accuracy": result.train_accuracy,
        "labels_per_unit": s["mean_labels_per_unit"],
        "noise_per_unit": s["mean_noise_per_unit"],
        "snr": s["snr"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--taps", default=None)
    parser.add_argument(
        "--variants", default="paper,paper_seed1,paper_100ep,paper_50ep,lbfgs,adamw_wd1e-4_30ep,adamw_wd1e-3_30ep"
    )
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    spec, ckpt, job = run_dir_inputs(args.run_dir)
    data_cfg, seed = job.data, job.seed
    model = load_model(spec, ckpt)
    splits = load_splits(data_cfg, seed)
    mean, std = norm_of(data_cfg) or (splits.mean, splits.std)
    mean_t, std_t = torch.tensor(mean), torch.tensor(std)
    taps = args.taps.split(",") if args.taps else list(model.taps)
    num_labels = model.num_classes

    def transform(images):
        return to_model_input(torch.from_numpy(np.ascontiguousarray(images)), mean_t, std_t)

    train_y = torch.from_numpy(splits.train.labels[: args.train_size].astype(np.int64))
    test_y = torch.from_numpy(splits.test.labels[: args.test_size].astype(np.int64))
    report: dict = {
        "run_dir": args.run_dir,
        "train_size": len(train_y),
        "test_size": len(test_y),
        "variants": {},
        "seconds": {},
    }
    train_x = collect_features(
        model, splits.train.images[: args.train_size], taps, transform=transform, dtype=torch.float16
    )
    test_x = collect_features(model, splits.test.images[: args.test_size], taps, transform=transform)
    kinds = {t: model.taps[t].kind for t in taps}
    for name in args.variants.split(","):
        recipe, overrides = VARIANTS[name]
        start = time.perf_counter()
        results = train_readouts(train_x, kinds, train_y, num_labels, recipe, **overrides)
        report["seconds"][name] = round(time.perf_counter() - start, 1)
        rows = {}
        for tap in taps:
            results[tap].test_accuracy = evaluate(results[tap].readout, test_x[tap], test_y)
            rows[tap] = tap_stats(results[tap], test_x[tap], test_y, model.taps[tap], num_labels)
        report["variants"][name] = rows
        print(f"{name} ({report['seconds'][name]} s): {json.dumps(rows)}", file=sys.stderr, flush=True)
    if "paper" in report["variants"]:
        paper = report["variants"]["paper"]
        report["vs_paper"] = {
            name: {
                tap: {
                    "accuracy_points": round(100 * (row["accuracy"] - paper[tap]["accuracy"]), 2),
                    **{k: round(row[k] / paper[tap][k] - 1, 4) for k in ("labels_per_unit", "snr")},
                }
                for tap, row in rows.items()
            }
            for name, rows in report["variants"].items()
            if name != "paper"
        }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
