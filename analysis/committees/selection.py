"""Soft committees of trained models (docs/methods.md section 6), on plain numpy arrays.

A committee averages its members' softmax outputs and takes the argmax. Members are chosen on the
validation split only; the test split is used only by ``evaluate``. A committee is an ``order``:
the model index added at each step (repeats allowed). Its output after ``t`` steps is the running
sum of those ``t`` probability vectors (same argmax as the mean), so every accuracy here, selection
and evaluation alike, is computed with the same float32 additions in the same order.

Selection methods (``select``):
- ``greedy``: forward selection with replacement (Caruana et al., 2004). Start empty; at each step
  add the model (repeats allowed) giving the highest validation accuracy of the averaged committee;
  ties go to the lower validation log-loss of the committee, then to the lower model index.
- ``topk``: the ``size`` models with the highest validation accuracy (same tie-breaks).
- ``diverse``: start from the best single model; then, without replacement, add the candidate ``c``
  maximising ``score(c) = (acc(S + c) - acc(S)) + lam * mean_{m in S} d(c, m)`` on validation,
  where ``d = (1 - mu) * d_pred + mu * d_mech`` (``d_mech`` only when mechanism profiles are given,
  else ``d = d_pred``). ``d_pred(a, b) = (disagreement + (1 - Q) / 2 + (1 - DF / min(err_a, err_b)))
  / 3`` combines the oracle diversity measures of Kuncheva and Whitaker (2003), each in [0, 1]
  (higher = more diverse); ``d_mech`` is the cosine distance of mechanism profiles, e.g. the label
  co-occurrence of the units' label sets (``label_set_profile``). Ties go to the lower log-loss,
  then the lower index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from trainables.schema import Settings, seed_setting, setting

METHODS = ("greedy", "topk", "diverse")


@dataclass(frozen=True)
class CommitteeConfig(Settings):
    """How a committee is built from candidate runs (all selection on validation)."""

    SECTION = "committee"

    size: int = setting(5, "committee size K (selection steps)", low=1)
    method: str = setting("greedy", "member selection", choices=METHODS)
    diversity_weight: float = setting(0.05, "diverse: lambda", low=0)
    mechanism_weight: float = setting(0.5, "diverse: share of mechanism distance in the diversity", low=0, high=1)
    profile_artifact: str = setting(
        "analysis/label_sets.json", "diverse: the runs' label sets for mechanism diversity ('' turns it off)"
    )
    seed_control: bool = setting(
        False, "fail unless the same-architecture seed committee can be formed (it is reported whenever it can)"
    )
    init_size: int = setting(0, "greedy: start from the N best single models (sorted initialisation)", low=0)
    bags: int = setting(
        1,
        "greedy: repeat the selection on this many random subsets of the candidates and "
        "average the members' weights (1: no bagging)",
        low=1,
    )
    bag_fraction: float = setting(0.5, "greedy: share of the candidates in each bag", gt=0, high=1)
    truncate: bool = setting(False, "greedy: cut each selection at its best validation accuracy")
    calibrate: bool = setting(True, "fit one temperature per member on validation NLL before averaging")
    bag_seed: int = seed_setting(0, "greedy: seed of the bags' draws")


_EPS = 1e-12


class Split:
    """Probabilities of M models on one split, with per-model statistics cached.

    ``probs``: an (M, N, C) array or a sequence of M (N, C) arrays of softmax outputs (kept as
    float32 views, never stacked); ``labels``: (N,) true labels. Cached per model, each (M, N):
    ``correct`` (argmax == label, first index wins ties as in ``np.argmax``), ``true_prob``,
    ``rival_max`` / ``rival_idx`` (largest probability among the other classes and its first index).
    """

    def __init__(self, probs: np.ndarray | Sequence[np.ndarray], labels: np.ndarray):
        self.labels = np.asarray(labels, dtype=np.int64)
        self.probs = [np.ascontiguousarray(p, dtype=np.float32) for p in probs]
        shapes = {p.shape for p in self.probs}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2 or next(iter(shapes))[0] != self.labels.shape[0]:
            raise ValueError(f"need M >= 1 arrays of shape (N, C) with N = {self.labels.shape[0]}, got {shapes}")
        stats = [_true_and_rival(p, self.labels) for p in self.probs]
        self.true_prob, self.rival_max, self.rival_idx = (np.stack(x) for x in zip(*stats))
        self.correct = (self.true_prob > self.rival_max) | (
            (self.true_prob == self.rival_max) & (self.labels < self.rival_idx)
        )

    @property
    def n_models(self) -> int:
        return len(self.probs)

    @property
    def n_samples(self) -> int:
        return self.labels.shape[0]

    def accuracy(self) -> np.ndarray:
        """(M,) accuracy of each model."""
        return self.correct.mean(axis=1)

    def log_loss(self) -> np.ndarray:
        """(M,) mean negative log-probability of the true label for each model."""
        return _log_loss(self.true_prob)

    def subset(self, models: Sequence[int]) -> Split:
        """The same split restricted to some models (their cached statistics reused)."""
        out = object.__new__(Split)
        idx = np.asarray(models, dtype=np.int64)
        out.labels, out.probs = self.labels, [self.probs[i] for i in idx]
        out.true_prob, out.rival_max, out.rival_idx = self.true_prob[idx], self.rival_max[idx], self.rival_idx[idx]
        out.correct = self.correct[idx]
        return out


def _true_and_rival(p: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of ``p``: the true label's value, the largest other value and its first index."""
    offset = np.arange(labels.shape[0]) * p.shape[1]
    rivals = p.copy()
    rivals.reshape(-1)[offset + labels] = -np.inf
    idx = rivals.argmax(axis=1)
    return p.reshape(-1).take(offset + labels), rivals.reshape(-1).take(offset + idx), idx


@dataclass(frozen=True)
class Selection:
    """A committee as the sequence of model indices added, with validation accuracy after each step.

    A bagged selection also holds ``weights`` (member -> share, summing to 1); its ``order`` is then
    the members by decreasing weight, and its curves add them in that order with their weights."""

    method: str
    order: list[int]
    val_curve: list[float]
    weights: dict[int, float] | None = None

    def member_weights(self) -> dict[int, float]:
        """Member -> weight in the committee (its share of the selection steps unless bagged)."""
        if self.weights is not None:
            return dict(self.weights)
        return {m: c / len(self.order) for m, c in self.counts.items()}

    @property
    def members(self) -> list[int]:
        """Distinct members in order of first selection."""
        return list(dict.fromkeys(self.order))

    @property
    def counts(self) -> dict[int, int]:
        """How many times each member was selected (its weight is count / len(order))."""
        return {m: self.order.count(m) for m in self.members}


@dataclass(frozen=True)
class Evaluation:
    """Test-split results of a committee, plus its validation accuracy."""

    member_test_acc: dict[int, float]
    member_val_acc: dict[int, float]
    committee_test_acc: float
    committee_val_acc: float
    best_member_test_acc: float
    gain: float  # committee_test_acc - best_member_test_acc
    test_curve: list[float]  # committee test accuracy after each step of the order
    val_curve: list[float]


def _log_loss(true_prob: np.ndarray) -> np.ndarray:
    return -np.log(np.maximum(true_prob, _EPS)).mean(axis=-1)


def _best(primary: np.ndarray, log_loss: np.ndarray) -> int:
    """Index of the highest ``primary``, ties to the lowest ``log_loss``, then the lowest index."""
    return int(np.lexsort((np.arange(primary.size), log_loss, -primary))[0])


def candidate_correct(split: Split, running: np.ndarray) -> np.ndarray:
    """(M,) number of samples that ``argmax(running + probs[j]) == label`` gets right, for every j.

    Exact, without a full argmax per candidate: with ``t`` the true label's summed value, the
    largest rival is at most ``u = max rival of running + max rival of probs[j]`` and at least the
    summed value ``l`` at either part's top rival. Float rounding is monotone, so ``t > u`` is right
    and ``t < l`` is wrong for sure; only rows with ``l <= t <= u`` get an exact argmax.
    """
    y = split.labels
    offset = np.arange(split.n_samples) * running.shape[1]
    s_true, s_max, s_idx = _true_and_rival(running, y)
    t = s_true + split.true_prob
    upper = s_max + split.rival_max
    lower = running.reshape(-1).take(offset + split.rival_idx) + split.rival_max
    at_s_idx = offset + s_idx
    out = np.empty(split.n_models, dtype=np.int64)
    for j, p in enumerate(split.probs):
        low = np.maximum(lower[j], s_max + p.reshape(-1).take(at_s_idx))
        sure = t[j] > upper[j]
        rest = np.flatnonzero(~sure & (t[j] >= low))
        out[j] = np.count_nonzero(sure) + np.count_nonzero((running[rest] + p[rest]).argmax(axis=1) == y[rest])
    return out


def running_accuracy(split: Split, order: list[int]) -> list[float]:
    """Accuracy of the committee after each step of ``order`` (running float32 sum)."""
    running = np.zeros_like(split.probs[0])
    curve = []
    for j in order:
        running += split.probs[j]
        curve.append(float((running.argmax(axis=1) == split.labels).mean()))
    return curve


def greedy_select(val: Split, size: int, init_size: int = 0, truncate: bool = False) -> Selection:
    """Caruana forward selection with replacement to ``size`` steps, on validation only.

    ``init_size``: start from that many best single models (sorted initialisation, Caruana et al.
    2006); ``truncate``: keep the trajectory up to its best validation accuracy (the earliest step
    reaching it)."""
    running = np.zeros_like(val.probs[0])
    running_true = np.zeros(val.n_samples, dtype=np.float64)
    order, curve = [], []
    ranked = np.lexsort((np.arange(val.n_models), val.log_loss(), -val.accuracy()))
    for step in range(size):
        if step < min(init_size, val.n_models):
            j = int(ranked[step])
            running += val.probs[j]
            running_true += val.true_prob[j]
            order.append(j)
            curve.append(float((running.argmax(axis=1) == val.labels).mean()))
            continue
        correct = val.correct.sum(axis=1) if step == 0 else candidate_correct(val, running)
        loss = _log_loss((running_true + val.true_prob) / (step + 1))
        j = _best(correct, loss)
        running += val.probs[j]
        running_true += val.true_prob[j]
        order.append(j)
        curve.append(float(correct[j] / val.n_samples))
    if truncate:
        keep = int(np.argmax(curve)) + 1
        order, curve = order[:keep], curve[:keep]
    return Selection("greedy", order, curve)


def bagged_select(
    val: Split, size: int, bags: int, fraction: float = 0.5, seed: int = 0, init_size: int = 0, truncate: bool = False
) -> Selection:
    """Greedy selection on ``bags`` random subsets of ``fraction`` of the candidates (drawn without
    replacement, seeded), each member's weight averaged over the bags (Caruana et al. 2006)."""
    rng = np.random.default_rng(seed)
    k = max(1, int(round(fraction * val.n_models)))
    weights = np.zeros(val.n_models)
    for _ in range(bags):
        pool = np.sort(rng.choice(val.n_models, size=k, replace=False))
        chosen = greedy_select(val.subset(pool), size, init_size, truncate)
        for j, w in chosen.member_weights().items():
            weights[pool[j]] += w / bags
    order = [int(j) for j in np.lexsort((np.arange(val.n_models), -weights)) if weights[j] > 0]
    shares = {j: float(weights[j]) for j in order}
    return Selection("greedy", order, weighted_curve(val, order, shares), shares)


def weighted_curve(split: Split, order: list[int], weights: dict[int, float]) -> list[float]:
    """Accuracy after adding each member of ``order`` with its weight."""
    running = np.zeros(split.probs[0].shape, dtype=np.float64)
    curve = []
    for j in order:
        running += weights[j] * split.probs[j]
        curve.append(float((running.argmax(axis=1) == split.labels).mean()))
    return curve


def committee_correct(split: Split, order: list[int], weights: dict[int, float] | None = None) -> np.ndarray:
    """Per-image correctness of the committee ``order`` (with ``weights``, else each entry counted
    once), summed exactly as ``running_accuracy`` / ``weighted_curve`` do, so its mean is the
    accuracy they report."""
    if weights is None:
        running = np.zeros_like(split.probs[0])
        for j in order:
            running += split.probs[j]
    else:
        running = np.zeros(split.probs[0].shape, dtype=np.float64)
        for j in order:
            running += weights[j] * split.probs[j]
    return running.argmax(axis=1) == split.labels


def committee_probs(split: Split, selection: Selection) -> np.ndarray:
    """The committee's averaged probabilities on a split (weights summing to 1)."""
    out = np.zeros(split.probs[0].shape, dtype=np.float64)
    for j, w in selection.member_weights().items():
        out += w * split.probs[j]
    return out


def topk_select(val: Split, size: int) -> Selection:
    """The ``size`` best models by validation accuracy (ties: log-loss, index)."""
    keys = np.lexsort((np.arange(val.n_models), val.log_loss(), -val.accuracy()))
    order = [int(j) for j in keys[: min(size, val.n_models)]]
    return Selection("topk", order, running_accuracy(val, order))


def diverse_select(
    val: Split, size: int, lam: float = 0.05, mu: float = 0.5, profiles: np.ndarray | None = None
) -> Selection:
    """Greedy without replacement on validation gain + ``lam`` x mean diversity to the members."""
    d = prediction_diversity(val.correct)
    if profiles is not None:
        d = (1.0 - mu) * d + mu * profile_distances(profiles)
    first = _best(val.correct.sum(axis=1), val.log_loss())
    running = val.probs[first].copy()
    running_true = val.true_prob[first].astype(np.float64)
    order, curve = [first], [float(val.accuracy()[first])]
    current = int(val.correct[first].sum())
    for step in range(1, min(size, val.n_models)):
        correct = candidate_correct(val, running)
        score = (correct - current) / val.n_samples + lam * d[:, order].mean(axis=1)
        score[order] = -np.inf
        loss = _log_loss((running_true + val.true_prob) / (step + 1))
        j = _best(score, loss)
        running += val.probs[j]
        running_true += val.true_prob[j]
        current = int(correct[j])
        order.append(j)
        curve.append(current / val.n_samples)
    return Selection("diverse", order, curve)


def select(
    val: Split,
    size: int,
    method: str = "greedy",
    *,
    init_size: int = 0,
    bags: int = 1,
    bag_fraction: float = 0.5,
    truncate: bool = False,
    bag_seed: int = 0,
    **options,
) -> Selection:
    """Dispatch to ``greedy_select`` (``bagged_select`` when ``bags`` > 1), ``topk_select`` or
    ``diverse_select`` (``options`` go to diverse)."""
    if size < 1:
        raise ValueError(f"committee size must be >= 1, got {size}")
    if method == "greedy" and bags > 1:
        return bagged_select(val, size, bags, bag_fraction, bag_seed, init_size, truncate)
    if method == "greedy":
        return greedy_select(val, size, init_size, truncate)
    if method == "topk":
        return topk_select(val, size)
    if method == "diverse":
        return diverse_select(val, size, **options)
    raise ValueError(f"unknown method {method!r} (choose {', '.join(METHODS)})")


def evaluate(selection: Selection, val: Split, test: Split) -> Evaluation:
    """Members' and committee's test accuracy, gain over the best member, accuracy vs size."""
    test_acc, val_acc = test.accuracy(), val.accuracy()
    members = selection.members
    if selection.weights is not None:
        test_curve = weighted_curve(test, selection.order, selection.weights)
    else:
        test_curve = running_accuracy(test, selection.order)
    best = float(max(test_acc[m] for m in members))
    return Evaluation(
        member_test_acc={m: float(test_acc[m]) for m in members},
        member_val_acc={m: float(val_acc[m]) for m in members},
        committee_test_acc=test_curve[-1],
        committee_val_acc=selection.val_curve[-1],
        best_member_test_acc=best,
        gain=test_curve[-1] - best,
        test_curve=test_curve,
        val_curve=list(selection.val_curve),
    )


def seed_control(val: Split, test: Split, groups: dict[str, list[int]]) -> dict | None:
    """Committee of one architecture's seeds: the group (>= 2 models) with the best mean val accuracy.

    Returns ``{"variant", "members", "committee_test_acc", "committee_val_acc",
    "best_member_test_acc", "gain"}`` for an equal-weight committee of all its models, or None
    when no group has two models.
    """
    val_acc = val.accuracy()
    eligible = {g: idx for g, idx in groups.items() if len(idx) >= 2}
    if not eligible:
        return None
    variant = max(sorted(eligible), key=lambda g: float(np.mean(val_acc[eligible[g]])))
    members = list(eligible[variant])
    best = float(test.accuracy()[members].max())
    committee = running_accuracy(test, members)[-1]
    return {
        "variant": variant,
        "members": members,
        "committee_test_acc": committee,
        "committee_val_acc": running_accuracy(val, members)[-1],
        "best_member_test_acc": best,
        "gain": committee - best,
    }


# ----------------------------------------------------------------------------- diversity measures


def pairwise_diversity(correct: np.ndarray) -> dict[str, np.ndarray]:
    """Oracle diversity of every pair of models from (M, N) correctness (Kuncheva & Whitaker, 2003).

    With N11 = both right, N00 = both wrong, N10 / N01 = only one right:
    ``disagreement = (N01 + N10) / N``; ``q_statistic = (N11 N00 - N01 N10) / (N11 N00 + N01 N10)``,
    set to 1 when both products are 0; ``double_fault = N00 / N``. Each is an (M, M) array.
    """
    a = np.asarray(correct, dtype=np.float64)
    n = a.shape[1]
    n11 = a @ a.T
    right = a.sum(axis=1)
    n10 = right[:, None] - n11
    n01 = right[None, :] - n11
    n00 = n - n11 - n10 - n01
    num = n11 * n00 - n01 * n10
    den = n11 * n00 + n01 * n10
    q = np.divide(num, den, out=np.ones_like(num), where=den > 0)
    return {"disagreement": (n01 + n10) / n, "q_statistic": q, "double_fault": n00 / n}


def disagreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of samples where exactly one of two models is right (correctness vectors)."""
    return float(pairwise_diversity(np.stack([a, b]))["disagreement"][0, 1])


def q_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Yule's Q of two correctness vectors (1 = errors aligned, -1 = complementary)."""
    return float(pairwise_diversity(np.stack([a, b]))["q_statistic"][0, 1])


def double_fault(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of samples both models get wrong."""
    return float(pairwise_diversity(np.stack([a, b]))["double_fault"][0, 1])


def prediction_diversity(correct: np.ndarray) -> np.ndarray:
    """(M, M) combined diversity in [0, 1]: mean of disagreement, (1 - Q) / 2 and 1 - DF / min error.

    The last term is the share of the more accurate model's errors that the other gets right (1
    when either model makes no error). The diagonal is 0.
    """
    div = pairwise_diversity(correct)
    err = 1.0 - np.asarray(correct, dtype=np.float64).mean(axis=1)
    min_err = np.minimum(err[:, None], err[None, :])
    shared = np.divide(div["double_fault"], min_err, out=np.zeros_like(min_err), where=min_err > 0)
    d = (div["disagreement"] + (1.0 - div["q_statistic"]) / 2.0 + (1.0 - shared)) / 3.0
    np.fill_diagonal(d, 0.0)
    return d


def cooccurrence(units_by_labels: np.ndarray) -> np.ndarray:
    """(L, L) label co-occurrence ``X.T @ X`` of a units x labels matrix, scaled to unit Frobenius norm.

    Entry (a, b) counts the units recognising both labels (the diagonal is the per-label coverage):
    which labels a model groups together, independent of unit order and unit count (so models with
    different head counts compare). All zeros if no unit recognises any label.
    """
    x = np.asarray(units_by_labels, dtype=np.float64)
    co = x.T @ x
    norm = np.linalg.norm(co)
    return co / norm if norm > 0 else co


def label_set_profile(taps: dict[str, dict[str, list[list[int]]]], num_classes: int) -> np.ndarray:
    """A model's mechanism profile from its analysis label sets (``analysis/label_sets.json``).

    ``taps``: ``{tap: {unit_kind: [labels recognised by unit 0, ...]}}``. Each (tap, unit kind),
    e.g. a block's heads or nodes, gives a binary units x labels matrix; the profile is the sum of
    their ``cooccurrence`` matrices, flattened to a vector of length ``num_classes ** 2``.
    """
    total = np.zeros((num_classes, num_classes))
    for kinds in taps.values():
        for units in kinds.values():
            x = np.zeros((len(units), num_classes))
            for u, labels in enumerate(units):
                x[u, labels] = 1.0
            total += cooccurrence(x)
    return total.reshape(-1)


def profile_distances(profiles: np.ndarray) -> np.ndarray:
    """(M, M) cosine distance 1 - cos between profile rows (1 for a zero profile, 0 on the diagonal)."""
    p = np.asarray(profiles, dtype=np.float64)
    norm = np.linalg.norm(p, axis=1)
    unit = np.divide(p, norm[:, None], out=np.zeros_like(p), where=norm[:, None] > 0)
    d = np.clip(1.0 - unit @ unit.T, 0.0, 2.0)
    np.fill_diagonal(d, 0.0)
    return d
