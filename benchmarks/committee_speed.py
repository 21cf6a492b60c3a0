"""Committee speed: build + evaluate from 100 runs x 10,000 samples x 100 classes; prints JSON.

For each method (greedy, topk, diverse) it times the whole path from in-memory arrays and from
Parquet files on disk (``read_probs`` in threads, validity checks, stacking), next to a plain-numpy
baseline for greedy that re-sums the whole committee from scratch for every candidate at every
step. The first read of the just-written files is timed on its own before the per-method passes.
Target: under 10 s per committee on 2 CPUs.

Also times greedy with sorted initialisation, truncation and 20 bags of half the runs, and the
calibration (one temperature per run on validation).

``python benchmarks/committee_speed.py [--runs 100] [--samples 10000] [--classes 100] [--size 10] [--bags 20]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.committees.calibration import fit_temperature  # noqa: E402
from analysis.committees.inputs import SPLITS, Candidate, partition, read_files, stack  # noqa: E402
from analysis.committees.selection import METHODS, Split, evaluate, select  # noqa: E402
from trainables.probs import write_probs  # noqa: E402


def synthetic_runs(runs: int, samples: int, classes: int, seed: int = 0) -> tuple[dict, np.ndarray]:
    """Softmax outputs of ``runs`` models with correlated errors (shared noise) and varied skill."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, samples)
    onehot = np.eye(classes, dtype=np.float32)[labels]
    shared = {s: rng.standard_normal((samples, classes), dtype=np.float32) for s in SPLITS}
    probs = {s: np.empty((runs, samples, classes), dtype=np.float32) for s in SPLITS}
    for m in range(runs):
        skill, rho = rng.uniform(3.0, 3.6), rng.uniform(0.75, 0.9)
        for s in SPLITS:
            noise = np.sqrt(rho) * shared[s] + np.sqrt(1 - rho) * rng.standard_normal(
                (samples, classes), dtype=np.float32
            )
            logits = 1.3 * noise + skill * onehot
            logits -= logits.max(axis=1, keepdims=True)
            e = np.exp(logits)
            probs[s][m] = e / e.sum(axis=1, keepdims=True)
    return probs, labels


def naive_greedy(probs: np.ndarray, labels: np.ndarray, size: int) -> list[int]:
    """Baseline: for every step and candidate, re-sum the committee's probabilities from scratch."""
    order: list[int] = []
    rows = np.arange(len(labels))
    for _ in range(size):
        keys = []
        for j in range(len(probs)):
            total = probs[order + [j]].sum(axis=0)
            acc = int((total.argmax(axis=1) == labels).sum())
            loss = -np.log(np.maximum(total[rows, labels] / (len(order) + 1), 1e-12)).mean()
            keys.append((-acc, loss, j))
        order.append(min(keys)[2])
    return order


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def committee(val_probs, val_labels, test_probs, test_labels, size: int, method: str):
    val, test = Split(val_probs, val_labels), Split(test_probs, test_labels)
    sel = select(val, size, method)
    return sel, evaluate(sel, val, test)


def committee_bagged(probs, labels, size: int, bags: int):
    """Greedy with sorted initialisation (5), truncation and ``bags`` bags of half the runs."""
    val, test = Split(probs["val"], labels), Split(probs["test"], labels)
    sel = select(val, size, "greedy", init_size=5, bags=bags, bag_fraction=0.5, truncate=True)
    return sel, evaluate(sel, val, test)


def from_disk(folder: Path, runs: int, size: int, method: str):
    cands = [Candidate(f"run{m}") for m in range(runs)]
    read_files(cands, [{s: folder / f"run{m}_{s}.parquet" for s in SPLITS} for m in range(runs)])
    valid, excluded = partition(cands)
    assert not excluded, excluded
    val, test = stack(valid)
    sel = select(val, size, method)
    return sel, evaluate(sel, val, test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--size", type=int, default=10)
    parser.add_argument("--bags", type=int, default=20)
    args = parser.parse_args()
    probs, labels = synthetic_runs(args.runs, args.samples, args.classes)
    report = {
        "runs": args.runs,
        "samples_per_split": args.samples,
        "classes": args.classes,
        "size": args.size,
        "cpus": os.cpu_count(),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "target_s": 10.0,
        "in_memory_s": {},
        "from_parquet_s": {},
        "committee": {},
    }
    results = {}
    for method in METHODS:
        (sel, ev), seconds = timed(lambda: committee(probs["val"], labels, probs["test"], labels, args.size, method))  # noqa: B023 - called within this iteration
        results[method] = sel
        report["in_memory_s"][method] = round(seconds, 3)
        report["committee"][method] = {
            "members": len(sel.members),
            "test_acc": round(ev.committee_test_acc, 4),
            "best_member_test_acc": round(ev.best_member_test_acc, 4),
            "gain": round(ev.gain, 4),
        }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for m in range(args.runs):
            for s in SPLITS:
                write_probs(folder / f"run{m}_{s}.parquet", probs[s][m], labels, np.arange(args.samples), "bench", s)
        _, first = timed(
            lambda: read_files(
                [Candidate(f"run{m}") for m in range(args.runs)],
                [{s: folder / f"run{m}_{s}.parquet" for s in SPLITS} for m in range(args.runs)],
            )
        )
        report["parquet_first_read_s"] = round(first, 3)  # files just written; later passes find them cached
        for method in METHODS:
            (sel, _), seconds = timed(lambda: from_disk(folder, args.runs, args.size, method))  # noqa: B023 - called within this iteration
            assert sel.order == results[method].order
            report["from_parquet_s"][method] = round(seconds, 3)
    order, seconds = timed(lambda: naive_greedy(probs["val"], labels, args.size))
    report["naive_greedy_selection_s"] = round(seconds, 3)
    report["naive_same_selection"] = order == results["greedy"].order
    _, fast = timed(lambda: select(Split(probs["val"], labels), args.size, "greedy"))
    report["fast_greedy_selection_s"] = round(fast, 3)
    report["speedup_greedy_selection"] = round(seconds / fast, 1)
    (bagged, _), seconds = timed(lambda: committee_bagged(probs, labels, args.size, args.bags))
    report["in_memory_s"][f"greedy_bagged_{args.bags}"] = round(seconds, 3)
    report["committee"][f"greedy_bagged_{args.bags}"] = {"members": len(bagged.members)}
    _, seconds = timed(lambda: [fit_temperature(p, labels) for p in probs["val"]])
    report["calibration_s"] = round(seconds, 3)  # one temperature per run, fitted on validation
    report["all_under_target"] = max(*report["in_memory_s"].values(), *report["from_parquet_s"].values()) < 10.0
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
