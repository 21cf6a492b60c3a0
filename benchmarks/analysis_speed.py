"""Speed of the unit-matrix analysis: fast path (class means) vs brute force (one readout pass per unit).

    python benchmarks/analysis_speed.py [--data-dir DIR] [--test-size 10000] [--run-dir RUN] [--recipes paper100,paper]

Part 1, CCT-7/3x1 (random-init weights, every tap): readouts are trained on the cached features of
``--train-size`` training images (at most ``--readout-max-iter`` L-BFGS iterations). The test split then
goes through the model once, in chunks; on each chunk's features (the *same* tensors for both) the
fast path feeds the per-label input sums (``pipeline.TapAccumulator``, also counting the readout's
correct answers) and the brute force runs, for a random subset of ``--units-per-kind`` units of each
tap and unit kind, the readout with every other unit silenced and accumulates its per-label output
sums. Brute-force time is measured on the subset and extrapolated linearly to all units; the fast
path's time (sums plus the final products with W for all units) is measured in full. The equality
check compares the two on the subset.

Part 2: the whole analysis (features, readout training, test pass, clusters) of one CCT, trained
weights from ``--run-dir`` (else a random-init ``cct_narrow``), once per recipe in ``--recipes``
(default: our ``paper100`` and the authors' full ``paper`` schedule), readouts on ``--analysis-train-size``
training images, matrices on the whole test split. Prints each recipe's wall time and per-tap
statistics, and their differences (results folders under ``--out``; writing is not timed).

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import numpy as np
import torch

from analysis.units.features import collect_features
from analysis.units.matrices import unit_groups
from analysis.units.pipeline import AnalysisConfig, TapAccumulator, matrices_from_means, plan_groups, tap_shapes
from analysis.units.readout import Readout, ReadoutResult, train_readout
from analysis.units.results import write_results
from analysis.units.run import analyze, load_model, norm_of, run_dir_inputs
from analysis.units.summary import primary_kind
from trainables.data import DataConfig, load_splits
from trainables.loader import to_model_input
from trainables.models import build_model


def silenced(readout: Readout, start: int, stop: int) -> Readout:
    """A copy of the readout keeping only the weights of inputs ``start:stop`` (one unit)."""
    copy_ = copy.deepcopy(readout).eval()
    with torch.no_grad():
        keep = torch.zeros_like(copy_.fc.weight)
        keep[:, start:stop] = 1.0
        copy_.fc.weight.mul_(keep)
    return copy_


def cifar(data_dir: str | None) -> DataConfig:
    return DataConfig(name="cifar100", data_dir=data_dir)


def bench_fast_vs_brute(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    model = build_model({"preset": "cct_7_3x1"}).eval()
    splits = load_splits(cifar(args.data_dir), 0)
    mean, std = torch.tensor(splits.mean), torch.tensor(splits.std)

    def transform(images: np.ndarray) -> torch.Tensor:
        return to_model_input(torch.from_numpy(np.ascontiguousarray(images)), mean, std)

    taps = list(model.taps)
    train_x, train_y = splits.train.images[: args.train_size], splits.train.labels[: args.train_size]
    labels = torch.from_numpy(train_y)
    shapes = tap_shapes(model, transform(splits.test.images[:1]), taps)
    readouts: dict[str, ReadoutResult] = {}
    start = time.perf_counter()
    for group in plan_groups(shapes, len(train_y), int(args.max_gib * 2**30)):
        feats = collect_features(model, train_x, group, batch_size=100, transform=transform, dtype=torch.float16)
        for tap in group:
            f = feats.pop(tap)
            readouts[tap] = train_readout(
                f,
                labels,
                f[:0],
                labels[:0],
                model.taps[tap].kind,
                model.num_classes,
                "lbfgs",
                max_iter=args.readout_max_iter,
            )
    readout_s = time.perf_counter() - start
    rng = np.random.default_rng(0)
    subsets: dict[tuple[str, str], tuple[list[int], list[Readout], int, int]] = {}
    for tap in taps:
        info = model.taps[tap]
        for kind, group in unit_groups(info.kind, (1, *shapes[tap]), info.head_dim).items():
            n_units = readouts[tap].weight.shape[1] // group
            pick = sorted(rng.choice(n_units, min(args.units_per_kind, n_units), replace=False).tolist())
            subsets[tap, kind] = (
                pick,
                [silenced(readouts[tap].readout, u * group, (u + 1) * group) for u in pick],
                n_units,
                group,
            )

    test_x, test_y = splits.test.images[: args.test_size], splits.test.labels[: args.test_size]
    L = model.num_classes
    acc = {t: TapAccumulator(readouts[t].readout, L, torch.device("cpu")) for t in taps}
    brute_sums = {key: torch.zeros(len(sub[0]), L, L, dtype=torch.float64) for key, sub in subsets.items()}
    fast_s = {t: 0.0 for t in taps}
    brute_s = {key: 0.0 for key in subsets}
    forward_s = 0.0
    with torch.no_grad():
        for s in range(0, len(test_y), args.chunk):
            t0 = time.perf_counter()
            _, feats = model(transform(test_x[s : s + args.chunk]), taps=taps)
            forward_s += time.perf_counter() - t0
            y = torch.from_numpy(test_y[s : s + args.chunk])
            for tap in taps:
                t0 = time.perf_counter()
                acc[tap].add(feats[tap], y)
                fast_s[tap] += time.perf_counter() - t0
            for key, (_pick, units, _, _) in subsets.items():
                t0 = time.perf_counter()
                for i, unit in enumerate(units):
                    brute_sums[key][i].index_add_(0, y, unit(feats[key[0]]).double())
                brute_s[key] += time.perf_counter() - t0
            del feats

    counts = np.bincount(test_y, minlength=L).clip(min=1)[:, None]
    max_rel, fast_total, brute_total, brute_measured, units_total, units_measured = 0.0, 0.0, 0.0, 0.0, 0, 0
    per_tap = {}
    for tap in taps:
        info = model.taps[tap]
        t0 = time.perf_counter()
        matrices = matrices_from_means(readouts[tap].readout, acc[tap].means(), info.kind, shapes[tap], info.head_dim)
        fast_s[tap] += time.perf_counter() - t0
        fast_total += fast_s[tap]
        tap_brute = 0.0
        for kind, fast in matrices.items():
            pick, _, n_units, _ = subsets[tap, kind]
            brute = brute_sums[tap, kind].numpy() / counts
            ref = fast[pick]
            max_rel = max(max_rel, float(np.abs(ref - brute).max() / np.abs(brute).max()))
            tap_brute += brute_s[tap, kind] * n_units / len(pick)
            brute_measured += brute_s[tap, kind]
            units_total += n_units
            units_measured += len(pick)
        brute_total += tap_brute
        per_tap[tap] = {
            "units": sum(subsets[tap, k][2] for k in matrices),
            "fast_s": round(fast_s[tap], 4),
            "brute_force_s_extrapolated": round(tap_brute, 2),
        }
    return {
        "model": "cct_7_3x1, random-init weights (timing only), every tap",
        "data": f"CIFAR-100 test, first {len(test_y)} images; readouts on {len(train_y)} training images, "
        f"at most {args.readout_max_iter} L-BFGS iterations",
        "taps": len(taps),
        "units_total": units_total,
        "units_brute_forced": units_measured,
        "fast_path_s": round(fast_total, 3),
        "brute_force_s_measured_on_subset": round(brute_measured, 2),
        "brute_force_s_extrapolated_all_units": round(brute_total, 1),
        "extrapolation": f"linear per tap and unit kind: measured time x (units / {args.units_per_kind} sampled units)",
        "speedup": round(brute_total / fast_total, 1),
        "max_relative_difference_on_subset": max_rel,
        "test_forward_pass_s": round(forward_s, 1),
        "readout_features_and_training_s": round(readout_s, 1),
        "threads": torch.get_num_threads(),
        "per_tap": per_tap,
    }


def bench_full_analysis(args: argparse.Namespace) -> dict:
    """The whole analysis of one trained CCT, once per readout recipe, with per-tap statistics."""
    if args.run_dir:
        spec_path, ckpt, job = run_dir_inputs(args.run_dir)
        data_cfg, seed = job.data, job.seed
        model, weights = load_model(spec_path, ckpt), f"trained ({args.run_dir})"
    else:
        torch.manual_seed(0)
        model, data_cfg, seed, weights = build_model({"preset": "cct_narrow"}), cifar(args.data_dir), 0, "random-init"
    # the readouts take --analysis-train-size images of the full training split
    data_cfg = data_cfg.replace(train_size=None, data_dir=args.data_dir or data_cfg.data_dir)
    splits = load_splits(data_cfg, seed)
    out = {
        "model": f"width {model.spec['width']}, {model.spec['blocks']} blocks, {model.spec['heads']} heads, {weights}",
        "train_images": min(args.analysis_train_size, len(splits.train)),
        "test_images": len(splits.test),
        "threads": torch.get_num_threads(),
        "recipes": {},
    }
    for recipe in args.recipes.split(","):
        start, cpu_start = time.perf_counter(), time.process_time()
        config = AnalysisConfig(recipe=recipe, train_size=args.analysis_train_size, max_gib=args.max_gib, device="cpu")
        result = analyze(
            model,
            splits,
            config,
            norm=norm_of(data_cfg),
            seed=seed,
            log=lambda m: print(f"{recipe} {time.perf_counter() - start:7.1f}s {m}", file=sys.stderr, flush=True),  # noqa: B023 - called within this iteration
        )
        total, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        if args.out:
            write_results(result, f"{args.out}/{recipe}")
        taps = {}
        for tap, info in result.taps.items():
            s = info["kinds"][primary_kind(info)]["summary"]
            taps[tap] = {
                "accuracy": round(info["accuracy"], 4),
                "labels_per_unit": round(s["mean_labels_per_unit"], 3),
                "noise_per_unit": round(s["mean_noise_per_unit"], 2),
                "snr": round(s["snr"], 4),
            }
        out["recipes"][recipe] = {
            "total_s": round(total, 1),
            "process_cpu_s": round(cpu, 1),
            "stages_s": {k: round(v, 1) for k, v in result.meta["timings"].items()},
            "under_10_min": total < 600,
            "taps": taps,
        }
        print(json.dumps({recipe: out["recipes"][recipe]}), file=sys.stderr, flush=True)
    others = [r for r in out["recipes"] if r != "paper"]
    if "paper" in out["recipes"] and others:  # the first other recipe against the authors' full schedule
        mine = others[0]
        a, b = out["recipes"][mine]["taps"], out["recipes"]["paper"]["taps"]
        out[f"{mine}_vs_paper"] = {
            tap: {
                "accuracy_points": round(100 * (a[tap]["accuracy"] - b[tap]["accuracy"]), 2),
                **{k: round(a[tap][k] / b[tap][k] - 1, 4) for k in ("labels_per_unit", "snr")},
            }
            for tap in a
        }
        out["speedup"] = round(out["recipes"]["paper"]["total_s"] / out["recipes"][mine]["total_s"], 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("DATA_DIR"))
    parser.add_argument("--test-size", type=int, default=10000)
    parser.add_argument("--train-size", type=int, default=500)
    parser.add_argument("--readout-max-iter", type=int, default=30)
    parser.add_argument("--units-per-kind", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=100)
    parser.add_argument("--max-gib", type=float, default=3.0)
    parser.add_argument(
        "--run-dir", default=None, help="run_job folder of a trained CCT (default: random-init cct_narrow)"
    )
    parser.add_argument("--analysis-train-size", type=int, default=10000, help="training images for the readouts")
    parser.add_argument(
        "--recipes",
        default="paper100,paper",
        help="readout recipes to time on that model (the first is compared with paper)",
    )
    parser.add_argument("--out", default=None, help="also write each recipe's results folder under here")
    parser.add_argument("--skip", choices=("fast-vs-brute", "full"), action="append", default=[])
    args = parser.parse_args()
    out = {"device": "cpu", "cpu_count": os.cpu_count()}
    if "fast-vs-brute" not in args.skip:
        out["fast_vs_brute_force"] = bench_fast_vs_brute(args)
    if "full" not in args.skip:
        out["full_analysis"] = bench_full_analysis(args)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
