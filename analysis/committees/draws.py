"""Committees of different structures against committees of one structure's seeds, on disjoint
draws (docs/methods.md section 6, claim 4).

Given K variants with at least K seeds each, draw ``s`` is the committee of every variant's seed
``s`` (one model of each structure), and each variant's seed committee is its first K seeds: both
kinds have K members, every member is one trained model, and no two draws of a kind share a model.
All committees are equal-weight averages of (calibrated) member probabilities. The verdict is the
difference between the two kinds' mean test accuracy, with an interval over the test images and
over the committees of each kind (``analysis.stats.grouped_bootstrap``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from analysis.committees.selection import Split, committee_correct
from analysis.stats import Difference, grouped_bootstrap


@dataclass(frozen=True)
class DrawCommittee:
    """One equal-weight committee: its kind (``structures`` or ``seeds``), its name (the seed or
    the variant it stands for), its member indices and its accuracies."""

    kind: str
    name: str
    members: tuple[int, ...]
    val_acc: float
    test_acc: float
    best_member_test_acc: float


@dataclass(frozen=True)
class DrawComparison:
    committees: list[DrawCommittee]
    difference: Difference  # structures minus seeds, test accuracy

    def of(self, kind: str) -> list[DrawCommittee]:
        return [c for c in self.committees if c.kind == kind]


def _seed_key(seed: str) -> tuple[int, str]:
    return (int(seed), seed) if seed.lstrip("-").isdigit() else (1 << 62, seed)


def plan_draws(variants: list[str], seeds: list[str]) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """Member indices of the structure draws (by seed) and of the seed committees (by variant),
    for models described by parallel ``variants`` / ``seeds`` lists. Raises ValueError when
    fewer than two committees of either kind can be formed."""
    by_variant: dict[str, dict[str, int]] = {}
    for i, (variant, seed) in enumerate(zip(variants, seeds)):
        if seed in by_variant.setdefault(variant, {}):
            raise ValueError(f"two models of variant {variant!r} have seed {seed}")
        by_variant[variant][seed] = i
    names = sorted(by_variant)
    k = len(names)
    if k < 2:
        raise ValueError(f"need at least 2 variants, found {k}")
    shared = sorted(set.intersection(*(set(s) for s in by_variant.values())), key=_seed_key)
    structures = {s: [by_variant[v][s] for v in names] for s in shared}
    own = {v: [by_variant[v][s] for s in sorted(by_variant[v], key=_seed_key)[:k]] for v in names}
    own = {v: idx for v, idx in own.items() if len(idx) == k}
    if len(structures) < 2 or len(own) < 2:
        counts = ", ".join(f"{v}: {len(by_variant[v])}" for v in names)
        raise ValueError(
            f"{k} variants need >= 2 seeds common to all and >= 2 variants with {k} seeds each (seeds per variant: {counts})"
        )
    return structures, own


def compare_draws(
    val: Split, test: Split, variants: list[str], seeds: list[str], n_boot: int = 2000, seed: int = 0
) -> DrawComparison:
    """Every structure draw and seed committee on ``val``/``test`` and the interval of their difference."""
    structures, own = plan_draws(variants, seeds)
    test_acc = test.accuracy()
    committees = []
    correct: dict[str, list[np.ndarray]] = {"structures": [], "seeds": []}
    for kind, plan in (("structures", structures), ("seeds", own)):
        for name, members in plan.items():
            answers = committee_correct(test, members)
            correct[kind].append(answers)
            committees.append(
                DrawCommittee(
                    kind,
                    name,
                    tuple(members),
                    float(committee_correct(val, members).mean()),
                    float(answers.mean()),
                    float(test_acc[members].max()),
                )
            )
    difference = grouped_bootstrap(np.stack(correct["structures"]), np.stack(correct["seeds"]), n_boot, seed)
    return DrawComparison(committees, difference)
