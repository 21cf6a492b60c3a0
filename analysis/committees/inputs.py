"""Which runs may join a committee: validity checks on their probability files, with reasons.

A run is left out, with a one-line reason, when an artifact is missing or unreadable, a file's
metadata names another split, its probabilities are not finite or not normalised, its dataset or
class count differs from the reference, or its sample index / label vector differs from the other
runs'. The reference dataset, class count and sample vectors (per split) are the most common among
the runs still in the pool, the first seen winning a tie.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from analysis.committees.selection import Split
from trainables.probs import read_probs

SPLITS = ("val", "test")
_SUM_TOL = 1e-3


@dataclass(frozen=True)
class ProbsFile:
    """Contents of one probability Parquet (``trainables.probs`` format)."""

    index: np.ndarray
    labels: np.ndarray
    probs: np.ndarray
    meta: dict[str, str]

    @classmethod
    def read(cls, path: Path) -> ProbsFile:
        index, labels, probs, meta = read_probs(path)
        return cls(index, labels, probs, meta)


@dataclass
class Candidate:
    """One run offered to a committee: what its records say about it and its files per split
    (None = missing). ``recorded_dataset`` / ``recorded_classes`` are what the run's records claim
    (None: not recorded); the files must agree with them."""

    run_id: str
    variant: str = ""
    seed: str = ""
    sweep: str | None = None
    recorded_dataset: str | None = None
    recorded_classes: int | None = None
    files: dict[str, ProbsFile | None] = field(default_factory=dict)
    problem: str | None = None  # set by the loader (e.g. run status, unreadable artifact)

    @property
    def dataset(self) -> str:
        return self.files["val"].meta.get("dataset", "?")

    @property
    def num_classes(self) -> int:
        return self.files["val"].probs.shape[1]


def read_files(candidates: list[Candidate], paths: list[dict[str, Path | None]], workers: int | None = None) -> None:
    """Fill each candidate's ``files`` from its paths per split (None = missing), reading in threads.

    A file that cannot be read becomes the run's ``problem``.
    """
    jobs = [(c, split, path) for c, per_run in zip(candidates, paths) for split, path in per_run.items()]

    def read(job: tuple[Candidate, str, Path | None]) -> ProbsFile | str | None:
        path = job[2]
        if path is None:
            return None
        try:
            return ProbsFile.read(path)
        except (OSError, ValueError, KeyError) as err:
            return f"unreadable probs_{job[1]}.parquet: {err}"

    with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
        for (c, split, _), result in zip(jobs, pool.map(read, jobs)):
            if isinstance(result, str):
                c.problem = c.problem or result
                c.files[split] = None
            else:
                c.files[split] = result


def file_problem(f: ProbsFile, split: str) -> str | None:
    """Why one split's file is unusable on its own, or None."""
    n = f.probs.shape[0]
    if f.meta.get("split") != split:
        return f"probs_{split} holds split {f.meta.get('split')!r}"
    if f.index.shape != (n,) or f.labels.shape != (n,):
        return f"probs_{split}: index/label/probs lengths differ"
    if f.meta.get("num_classes") not in (None, str(f.probs.shape[1])):
        return f"probs_{split}: metadata num_classes {f.meta['num_classes']} but {f.probs.shape[1]} columns"
    if not np.isfinite(f.probs).all():
        return f"probs_{split} has NaN or infinite probabilities"
    if (f.probs < 0).any() or np.abs(f.probs.sum(axis=1) - 1.0).max(initial=0.0) > _SUM_TOL:
        return f"probs_{split} rows are not probability vectors"
    return None


def run_problem(c: Candidate) -> str | None:
    """Why a run is unusable on its own (missing files, bad files, tags disagreeing with files)."""
    if c.problem:
        return c.problem
    missing = [s for s in SPLITS if c.files.get(s) is None]
    if missing:
        return "missing artifact " + ", ".join(f"probs/probs_{s}.parquet" for s in missing)
    for split in SPLITS:
        problem = file_problem(c.files[split], split)
        if problem:
            return problem
    val, test = c.files["val"], c.files["test"]
    if val.meta.get("dataset") != test.meta.get("dataset") or val.probs.shape[1] != test.probs.shape[1]:
        return "val and test files disagree on dataset or class count"
    if c.recorded_dataset is not None and c.recorded_dataset != c.dataset:
        return f"recorded dataset {c.recorded_dataset} but probs say {c.dataset}"
    if c.recorded_classes is not None and c.recorded_classes != c.num_classes:
        return f"recorded {c.recorded_classes} classes but probs have {c.num_classes}"
    return None


def _most_common(values: list) -> object:
    return Counter(values).most_common(1)[0][0]


def partition(candidates: list[Candidate]) -> tuple[list[Candidate], list[tuple[str, str]]]:
    """Split candidates into (valid runs, [(run_id, reason)] for every run left out)."""
    excluded: list[tuple[str, str]] = []
    pool = []
    for c in candidates:
        problem = run_problem(c)
        if problem:
            excluded.append((c.run_id, problem))
        else:
            pool.append(c)

    def keep(test, reason) -> None:
        nonlocal pool
        kept = []
        for c in pool:
            if test(c):
                kept.append(c)
            else:
                excluded.append((c.run_id, reason(c)))
        pool = kept

    if pool:
        ref_dataset = _most_common([c.dataset for c in pool])
        keep(lambda c: c.dataset == ref_dataset, lambda c: f"dataset {c.dataset}, expected {ref_dataset}")
    if pool:
        ref_classes = _most_common([c.num_classes for c in pool])
        keep(lambda c: c.num_classes == ref_classes, lambda c: f"{c.num_classes} classes, expected {ref_classes}")
    for split in SPLITS:
        if pool:
            key = {id(c): _sample_key(c.files[split]) for c in pool}
            ref = _most_common(list(key.values()))
            keep(lambda c: key[id(c)] == ref, lambda c, s=split: f"{s} sample index/labels differ from the other runs'")  # noqa: B023 - called within this iteration
    return pool, excluded


def _sample_key(f: ProbsFile) -> tuple[int, bytes, bytes]:
    return len(f.index), np.asarray(f.index, np.int64).tobytes(), np.asarray(f.labels, np.int64).tobytes()


def stack(valid: list[Candidate]) -> tuple[Split, Split]:
    """(val, test) ``Split``s of the valid runs, in the given order (the arrays are not copied)."""
    if not valid:
        raise ValueError("no valid runs to stack")
    val, test = (Split([c.files[s].probs for c in valid], valid[0].files[s].labels) for s in SPLITS)
    return val, test
