"""Orchestrator overhead: N short trials through the sweep driver vs the same jobs in a plain loop.

    python benchmarks/sweep_overhead.py [--trials 4] [--concurrent 2] [--train-size 1280]

Both paths train the same synthetic-data jobs with one torch thread per job (``--concurrent`` trials
share ``--concurrent`` cores). The orchestrated wall time covers everything a sweep does: starting
Ray, the MLflow parent and child runs with artifacts, checkpoints every epoch, and shutting down.
Prints JSON; ``ratio`` = orchestrated wall / (plain loop wall / concurrent trials). To tell the
orchestrator's cost from what the cores allow, the same jobs also run ``--concurrent`` at a time in
plain worker processes (``plain_parallel_s``, no Ray, no MLflow).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import ray
import torch
import yaml

from orchestrator.sweeps.run import run_sweep
from orchestrator.sweeps.spec import load_spec
from trainables.config import JobConfig
from trainables.train import run_job


def spec_dict(trials: int, concurrent: int, train_size: int, epochs: int) -> dict:
    """``trials`` seeds of a narrow CCT on 32 px synthetic images, one CPU each."""
    return {
        "name": "overhead",
        "data": {
            "name": "synthetic",
            "num_classes": 10,
            "image_size": 32,
            "train_size": train_size,
            "val_size": 200,
            "test_size": 200,
        },
        "base": {
            "model": {"preset": "cct_narrow", "tokenizer_layers": 2},
            "recipe": {"name": "adamw_cosine", "lr": 0.002, "warmup_epochs": 0},
            "epochs": epochs,
            "batch_size": 64,
            "latency": {"large_batch": 32, "repeats": 5},
        },
        "axes": {"seed": list(range(trials))},
        "resources": {"cpus": 1},
        "max_concurrent": concurrent,
    }


def plain_loop(spec_file: Path, work: Path) -> list[float]:
    """Each trial's job run one after another in this process; seconds per job."""
    spec = load_spec(spec_file)
    torch.set_num_threads(spec.threads)
    times = []
    for i, point in enumerate(spec.grid_points()):
        start = time.perf_counter()
        run_job(spec.job(point), work / f"job{i}")
        times.append(time.perf_counter() - start)
    return times


def _job(job: JobConfig, out: Path, threads: int) -> None:
    torch.set_num_threads(threads)
    run_job(job, out)


def plain_parallel(spec_file: Path, work: Path, concurrent: int) -> float:
    """Wall time of the same jobs, ``concurrent`` at a time, in plain worker processes."""
    spec = load_spec(spec_file)
    jobs = [spec.job(p) for p in spec.grid_points()]
    start = time.perf_counter()
    with ProcessPoolExecutor(concurrent, mp_context=get_context("spawn")) as pool:
        list(pool.map(_job, jobs, [work / f"job{i}" for i in range(len(jobs))], [spec.threads] * len(jobs)))
    return time.perf_counter() - start


def orchestrated(spec_file: Path, work: Path, cpus: int) -> dict:
    """Wall time of the whole sweep: Ray start, Tuner with MLflow logging, Ray shutdown."""
    start = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False)
    ray_start = time.perf_counter() - start
    code = run_sweep(spec_file, None, f"sqlite:///{work / 'mlflow.db'}", str(work / "store"))
    ray.shutdown()
    if code != 0:
        raise SystemExit(f"sweep failed with exit code {code}")
    return {"wall_s": time.perf_counter() - start, "ray_init_s": ray_start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--concurrent", type=int, default=2)
    parser.add_argument("--train-size", type=int, default=1280, help="images per epoch (sets the trial length)")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sweep-overhead-") as tmp:
        work = Path(tmp)
        spec_file = work / "overhead.yaml"
        spec_file.write_text(yaml.safe_dump(spec_dict(args.trials, args.concurrent, args.train_size, args.epochs)))
        plain = plain_loop(spec_file, work / "plain")
        parallel = plain_parallel(spec_file, work / "parallel", args.concurrent)
        orch = orchestrated(spec_file, work / "orchestrated", cpus=args.concurrent)
    ideal = sum(plain) / args.concurrent
    print(
        json.dumps(
            {
                "trials": args.trials,
                "concurrent": args.concurrent,
                "torch_threads_per_trial": 1,
                "plain_trial_s": [round(t, 2) for t in plain],
                "plain_loop_s": round(sum(plain), 2),
                "ideal_parallel_s": round(ideal, 2),
                "plain_parallel_s": round(parallel, 2),
                "orchestrated_s": round(orch["wall_s"], 2),
                "ray_init_s": round(orch["ray_init_s"], 2),
                "ratio": round(orch["wall_s"] / ideal, 3),
                "ratio_without_ray_init": round((orch["wall_s"] - orch["ray_init_s"]) / ideal, 3),
                "orchestrated_vs_plain_parallel": round(orch["wall_s"] / parallel, 3),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
