"""Soft committees: diversity measures, selection on validation only, validity filtering, MLflow CLI."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from analysis.committees.inputs import Candidate, ProbsFile, partition, read_files, stack
from analysis.committees.selection import (
    Split,
    candidate_correct,
    cooccurrence,
    disagreement,
    diverse_select,
    double_fault,
    evaluate,
    greedy_select,
    label_set_profile,
    pairwise_diversity,
    prediction_diversity,
    profile_distances,
    q_statistic,
    seed_control,
    topk_select,
)
from orchestrator.cli import main as cli
from trainables.probs import write_probs


def main(argv: list[str]) -> int:
    return cli(["committee", *argv])


REPO = Path(__file__).resolve().parents[1]
C = 5
N = 90  # three thirds of 30 samples each, in both splits
LABELS = np.arange(N) % C
THIRDS = [np.arange(N) // 30 == t for t in range(3)]


def toy_probs(wrong: np.ndarray, conf: float = 0.7, labels: np.ndarray = LABELS, classes: int = C) -> np.ndarray:
    """Right rows: ``conf`` on the label. Wrong rows: 0.5 on label + 1, 0.2 on the label."""
    n = len(labels)
    p = np.full((n, classes), (1 - conf) / (classes - 1))
    p[np.arange(n), labels] = conf
    rest = 0.3 / (classes - 2)
    p[wrong] = rest
    p[wrong, labels[wrong]] = 0.2
    p[wrong, (labels[wrong] + 1) % classes] = 0.5
    return p.astype(np.float32)


# ----------------------------------------------------------------------------- diversity measures

A = np.array([1, 1, 1, 1, 0, 0, 0, 0, 1, 1], bool)
B = np.array([1, 1, 0, 0, 1, 1, 0, 0, 1, 0], bool)  # N11=3, N10=3, N01=2, N00=2


def test_pairwise_measures_exact():
    assert disagreement(A, B) == pytest.approx(0.5)
    assert q_statistic(A, B) == pytest.approx(0.0)
    assert double_fault(A, B) == pytest.approx(0.2)
    d = np.array([1, 1, 1, 1, 0, 1, 0, 0], bool)
    e = np.array([1, 1, 1, 1, 1, 0, 1, 0], bool)  # N11=4, N10=1, N01=2, N00=1
    assert q_statistic(d, e) == pytest.approx((4 * 1 - 2 * 1) / (4 * 1 + 2 * 1))
    assert disagreement(A, ~A) == 1.0 and q_statistic(A, ~A) == -1.0 and double_fault(A, ~A) == 0.0
    assert q_statistic(A, A) == 1.0 and double_fault(A, A) == pytest.approx(0.4)
    assert q_statistic(np.ones(4, bool), np.ones(4, bool)) == 1.0  # degenerate 0/0 -> 1
    m = pairwise_diversity(np.stack([A, B, ~A]))
    assert all(np.allclose(v, v.T) for v in m.values())


def test_prediction_diversity_combines_three_terms():
    d = prediction_diversity(np.stack([A, B]))
    # dis 0.5, (1 - Q)/2 = 0.5, DF / min(err) = 0.2 / 0.4 -> 1 - 0.5 = 0.5
    assert d[0, 1] == pytest.approx(0.5) and d[1, 0] == pytest.approx(0.5)
    assert d[0, 0] == 0.0 and d[1, 1] == 0.0


def test_label_set_profile_and_distance():
    taps = {"block0": {"head": [[0, 2], [1]]}, "block1": {"node": [[0], [0], []]}}
    expected = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 1]]) / np.sqrt(5) + np.diag([1.0, 0, 0])
    assert np.allclose(label_set_profile(taps, 3), expected.reshape(-1))
    swapped = {"block0": {"head": [[1], [0, 2]]}, "block1": {"node": [[], [0], [0]]}}
    assert np.array_equal(label_set_profile(swapped, 3), label_set_profile(taps, 3))  # unit order does not matter
    assert np.array_equal(cooccurrence(np.zeros((2, 3))), np.zeros((3, 3)))
    d = profile_distances(np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [1.0, 1.0], [0.0, 0.0]]))
    assert d[0, 1] == 1.0 and d[0, 2] == 0.0
    assert d[0, 3] == pytest.approx(1 - 1 / np.sqrt(2))
    assert d[4, 0] == 1.0 and d[4, 4] == 0.0


# ----------------------------------------------------------------------------- selection


def naive_greedy(probs: np.ndarray, labels: np.ndarray, size: int) -> list[int]:
    """Reference: re-average the whole committee from scratch for every candidate."""
    order: list[int] = []
    for _ in range(size):
        keys = []
        for j in range(len(probs)):
            avg = probs[order + [j]].astype(np.float64).mean(axis=0)
            acc = (avg.argmax(axis=1) == labels).mean()
            loss = -np.log(np.maximum(avg[np.arange(len(labels)), labels], 1e-12)).mean()
            keys.append((-acc, loss, j))
        order.append(min(keys)[2])
    return order


def test_greedy_matches_naive_reference():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 60)
    logits = rng.normal(size=(8, 60, 4)) + 1.2 * np.eye(4)[labels] * rng.uniform(0.2, 1.5, (8, 1, 1))
    probs = np.exp(logits) / np.exp(logits).sum(axis=2, keepdims=True)
    sel = greedy_select(Split(probs, labels), 7)
    assert sel.order == naive_greedy(probs, labels, 7)
    assert sel.val_curve[-1] == pytest.approx((probs[sel.order].sum(0).argmax(1) == labels).mean())


def test_candidate_correct_exact_with_ties():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 6, 400)
    probs = rng.integers(0, 4, (9, 400, 6)).astype(np.float32) / 8  # exact ties everywhere
    split = Split(probs, labels)
    assert np.array_equal(split.correct, probs.argmax(axis=2) == labels)
    running = probs[[0, 3, 3]].sum(axis=0)
    brute = [int(((running + p).argmax(axis=1) == labels).sum()) for p in probs]
    assert candidate_correct(split, running).tolist() == brute


def test_selection_uses_validation_only_and_gain():
    # a, b, c: complementary (each wrong on one third); d: wrong on all of val, perfect on test
    confs = (0.72, 0.71, 0.7)
    val = Split(np.stack([toy_probs(THIRDS[i], confs[i]) for i in range(3)] + [toy_probs(np.ones(N, bool))]), LABELS)
    test = Split(np.stack([toy_probs(THIRDS[i], confs[i]) for i in range(3)] + [toy_probs(np.zeros(N, bool))]), LABELS)
    for sel in (greedy_select(val, 3), topk_select(val, 3), diverse_select(val, 3)):
        assert 3 not in sel.members
        result = evaluate(sel, val, test)
        avg = np.stack(test.probs)[sel.order].astype(np.float64).mean(axis=0)
        assert result.committee_test_acc == pytest.approx((avg.argmax(1) == LABELS).mean())
        assert result.committee_test_acc == 1.0 and result.best_member_test_acc == pytest.approx(2 / 3)
        assert result.gain == pytest.approx(1 / 3)
        assert result.test_curve[0] == pytest.approx(2 / 3) and len(result.test_curve) == 3
    assert greedy_select(val, 3).order == [0, 1, 2]


def test_diverse_prefers_complementary_and_mechanism_distance():
    near_dup = toy_probs(THIRDS[0] & (np.arange(N) % 2 == 0), conf=0.69)  # errors inside a's, fewer
    val = Split(np.stack([toy_probs(THIRDS[0] & (np.arange(N) % 3 > 0)), near_dup, toy_probs(THIRDS[1])]), LABELS)
    assert topk_select(val, 2).order == [1, 0]  # the two most accurate share their errors
    assert diverse_select(val, 2, lam=0.5).order == [1, 2]
    same = Split(np.stack([toy_probs(THIRDS[0]), toy_probs(THIRDS[1]), toy_probs(THIRDS[1])]), LABELS)
    assert diverse_select(same, 2).order == [0, 1]  # exact tie: lower index
    profiles = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert diverse_select(same, 2, mu=1.0, profiles=profiles).order == [0, 2]


def test_seed_control_best_variant():
    val = Split(
        np.stack(
            [
                toy_probs(THIRDS[0]),
                toy_probs(THIRDS[0], 0.6),
                toy_probs(THIRDS[1]),
                toy_probs(THIRDS[0] | THIRDS[1]),
                toy_probs(THIRDS[0] | THIRDS[2]),
            ]
        ),
        LABELS,
    )
    out = seed_control(val, val, {"x": [0, 1], "y": [2], "z": [3, 4]})
    assert out["variant"] == "x" and out["members"] == [0, 1]
    assert out["committee_test_acc"] == pytest.approx(2 / 3) and out["gain"] == pytest.approx(0.0)
    assert seed_control(val, val, {"y": [2], "w": [3]}) is None


# ----------------------------------------------------------------------------- validity filtering


def _file(probs, split, dataset="synthetic", labels=LABELS) -> ProbsFile:
    return ProbsFile(
        np.arange(len(labels)), labels, probs, {"dataset": dataset, "split": split, "num_classes": str(probs.shape[1])}
    )


def _cand(run_id, val=None, test=None, **records) -> Candidate:
    good = toy_probs(THIRDS[0])
    files = {
        "val": val if val is not None else _file(good, "val"),
        "test": test if test is not None else _file(good, "test"),
    }
    return Candidate(run_id, files=files, **records)


def test_partition_lists_every_reason():
    good = toy_probs(THIRDS[0])
    nan = good.copy()
    nan[3, 1] = np.nan
    cands = [
        _cand("ok1"),
        _cand("ok2"),
        _cand("ok3"),
        _cand("split", val=_file(good, "test")),
        _cand("nan", test=_file(nan, "test")),
        _cand("unnormalised", val=_file(good * 2, "val")),
        _cand("dataset", val=_file(good, "val", "cifar10"), test=_file(good, "test", "cifar10")),
        _cand(
            "classes",
            val=_file(toy_probs(THIRDS[0], classes=6), "val"),
            test=_file(toy_probs(THIRDS[0], classes=6), "test"),
        ),
        _cand("tag", recorded_classes=7),
        _cand("labels", test=_file(good, "test", labels=np.roll(LABELS, 1))),
        Candidate("missing", files={"val": _file(good, "val"), "test": None}),
        Candidate("failed", problem="status FAILED"),
    ]
    valid, excluded = partition(cands)
    assert [c.run_id for c in valid] == ["ok1", "ok2", "ok3"]
    reasons = dict(excluded)
    assert reasons == {
        "split": "probs_val holds split 'test'",
        "nan": "probs_test has NaN or infinite probabilities",
        "unnormalised": "probs_val rows are not probability vectors",
        "dataset": "dataset cifar10, expected synthetic",
        "classes": "6 classes, expected 5",
        "tag": "recorded 7 classes but probs have 5",
        "labels": "test sample index/labels differ from the other runs'",
        "missing": "missing artifact probs/probs_test.parquet",
        "failed": "status FAILED",
    }
    val, test = stack(valid)
    assert val.n_models == test.n_models == 3 and val.probs[0] is valid[0].files["val"].probs


def test_read_files_reports_unreadable_and_missing(tmp_path):
    write_probs(tmp_path / "val.parquet", toy_probs(THIRDS[0]), LABELS, np.arange(N), "synthetic", "val")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    ok, broken = Candidate("ok"), Candidate("broken")
    read_files(
        [ok, broken],
        [
            {"val": tmp_path / "val.parquet", "test": None},
            {"val": tmp_path / "val.parquet", "test": tmp_path / "broken.parquet"},
        ],
    )
    assert ok.files["val"].meta["split"] == "val" and ok.files["test"] is None and ok.problem is None
    assert broken.problem.startswith("unreadable probs_test.parquet")
    assert dict(partition([ok, broken])[1]) == {
        "ok": "missing artifact probs/probs_test.parquet",
        "broken": broken.problem,
    }


# ----------------------------------------------------------------------------- MLflow end to end

MODELS = {  # name: (variant, seed, val wrong mask, test wrong mask, confidence)
    "a": ("heads=4", 0, THIRDS[0], THIRDS[0], 0.72),
    "a_seed1": ("heads=4", 1, THIRDS[0], THIRDS[0], 0.6),
    "b": ("heads=16", 0, THIRDS[1], THIRDS[1], 0.71),
    "c": ("heads=25", 0, THIRDS[2], THIRDS[2], 0.7),
    "test_only": ("heads=64", 0, np.ones(N, bool), np.zeros(N, bool), 0.7),
}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A sweep experiment in SQLite: 5 valid trial runs and 6 that must be left out."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("toy", artifact_location=(root / "artifacts").as_uri())
    parent = client.create_run(exp, tags={"unitlab.role": "sweep", "unitlab.sweep": "toy"}).info.run_id
    client.set_terminated(parent)
    ids, probs = {}, {}

    def trial(
        name,
        variant="heads=4",
        seed=0,
        dataset="synthetic",
        classes=C,
        status="FINISHED",
        val=None,
        test=None,
        test_labels=LABELS,
        profile=None,
    ):
        run_id = client.create_run(
            exp,
            run_name=name,
            tags={
                "mlflow.parentRunId": parent,
                "unitlab.role": "trial",
                "unitlab.sweep": "toy",
                "unitlab.trial_id": name,
                "unitlab.dataset": dataset,
                "unitlab.num_classes": str(classes),
                "unitlab.variant": variant,
                "unitlab.seed": str(seed),
            },
        ).info.run_id
        folder = root / name
        folder.mkdir()
        for split, p, labels in (("val", val, LABELS), ("test", test, test_labels)):
            if p is not None:
                write_probs(folder / f"probs_{split}.parquet", p, labels, np.arange(N), dataset, split)
                client.log_artifact(run_id, str(folder / f"probs_{split}.parquet"), "probs")
        if profile is not None:
            label_sets = {"threshold": 0.3, "num_classes": classes, "taps": {"block0": {"head": profile}}}
            (folder / "label_sets.json").write_text(json.dumps(label_sets))
            client.log_artifact(run_id, str(folder / "label_sets.json"), "analysis")
        client.set_terminated(run_id, status)
        ids[name] = run_id
        probs[name] = test

    for k, (name, (variant, seed, wv, wt, conf)) in enumerate(MODELS.items()):
        trial(
            name,
            variant,
            seed,
            val=toy_probs(wv, conf),
            test=toy_probs(wt, conf),
            profile=[[k % C], [(k + 1) % C, (k + 2) % C]],
        )
    good = toy_probs(THIRDS[0])
    nan = good.copy()
    nan[0, 0] = np.nan
    trial("missing", val=good)
    trial("other_dataset", dataset="cifar10", val=good, test=good)
    trial("other_classes", classes=6, val=toy_probs(THIRDS[0], classes=6), test=toy_probs(THIRDS[0], classes=6))
    trial("nan", val=nan, test=good)
    trial("failed", status="FAILED", val=good, test=good)
    trial("shuffled", val=good, test=good, test_labels=np.roll(LABELS, 1))
    return {"uri": uri, "client": client, "ids": ids, "probs": probs, "root": root}


def committee_runs(sweep, method):
    runs = sweep["client"].search_runs(
        [sweep["client"].get_experiment_by_name("toy").experiment_id],
        f"tags.`unitlab.role` = 'committee' AND tags.`unitlab.method` = '{method}'",
    )
    assert len(runs) == 1
    return runs[0]


def test_committee_run_logged_and_shown(sweep, capsys):
    ids, client = sweep["ids"], sweep["client"]
    assert main(["--experiment", "toy", "--size", "3", "--tracking-uri", sweep["uri"], "--seed-control"]) == 0
    printed = capsys.readouterr().out
    run = committee_runs(sweep, "greedy")
    tags, m = run.data.tags, run.data.metrics
    members = [ids["a"], ids["b"], ids["c"]]
    assert tags["unitlab.members"] == ",".join(members) and tags["unitlab.sweep"] == "toy"
    assert run.info.status == "FINISHED"
    avg = np.mean([sweep["probs"][k] for k in ("a", "b", "c")], axis=0)
    assert m["committee_test_acc"] == pytest.approx((avg.argmax(1) == LABELS).mean()) == 1.0
    assert m["best_member_test_acc"] == pytest.approx(2 / 3) and m["gain"] == pytest.approx(1 / 3)
    assert m["committee_val_acc"] == 1.0 and m["size"] == 3 and m["excluded_runs"] == 6
    assert tags["unitlab.seed_variant"] == "heads=4"
    assert tags["unitlab.seed_members"] == f"{ids['a']},{ids['a_seed1']}"
    assert m["seed_committee_test_acc"] == pytest.approx(2 / 3) and m["seed_gain"] == pytest.approx(0.0)
    # the intervals, recomputed from the stored probabilities with the textbook paired bootstrap
    best = (sweep["probs"]["a"].argmax(1) == LABELS).astype(float)
    seed_avg = np.mean([sweep["probs"][k] for k in ("a", "a_seed1")], axis=0)
    for key, other in (("gain", best), ("vs_seed", (seed_avg.argmax(1) == LABELS).astype(float))):
        d = (avg.argmax(1) == LABELS).astype(float) - other
        draws = np.random.default_rng(0).integers(0, d.size, size=(2000, d.size))
        low, high = np.percentile(d[draws].mean(axis=1), [2.5, 97.5])
        assert m.get(key, m["committee_test_acc"] - m["seed_committee_test_acc"]) == pytest.approx(d.mean())
        assert (m[f"{key}_ci_low"], m[f"{key}_ci_high"]) == (pytest.approx(low), pytest.approx(high))
    history = sorted(client.get_metric_history(run.info.run_id, "test_acc_vs_size"), key=lambda h: h.step)
    assert [(h.step, round(h.value, 4)) for h in history] == [(1, 0.6667), (2, 1.0), (3, 1.0)]

    arts = {a.path for a in client.list_artifacts(run.info.run_id, "committee")}
    assert arts == {f"committee/{f}" for f in ("members.csv", "excluded.csv", "curve.csv", "accuracy_vs_size.png")}
    folder = client.download_artifacts(run.info.run_id, "committee", str(sweep["root"] / "dl"))
    with open(Path(folder) / "members.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run_id"] for r in rows] == members and [r["variant"] for r in rows] == [
        "heads=4",
        "heads=16",
        "heads=25",
    ]
    assert [float(r["test_acc"]) for r in rows] == pytest.approx([2 / 3] * 3)
    with open(Path(folder) / "excluded.csv") as f:
        excluded = {r["run_id"]: r["reason"] for r in csv.DictReader(f)}
    assert excluded == {
        ids["missing"]: "missing artifact probs/probs_test.parquet",
        ids["other_dataset"]: "dataset cifar10, expected synthetic",
        ids["other_classes"]: "6 classes, expected 5",
        ids["nan"]: "probs_val has NaN or infinite probabilities",
        ids["failed"]: "status FAILED",
        ids["shuffled"]: "test sample index/labels differ from the other runs'",
    }
    assert (Path(folder) / "accuracy_vs_size.png").read_bytes()[:4] == b"\x89PNG"

    assert main(["show", run.info.run_id, "--tracking-uri", sweep["uri"]]) == 0
    shown = capsys.readouterr().out
    assert printed.startswith(shown) and f"runs/{run.info.run_id}" in printed[len(shown) :]  # then the UI links
    assert "gain +0.3333" in shown and "seed control (heads=4, 2 runs)" in shown
    assert "gain over the best member +33.33 points (95 % CI" in shown
    assert "committee minus seed committee +33.33 points" in shown
    assert all(r in shown for r in members) and "excluded runs: 6" in shown


def test_diverse_with_profiles_and_filter(sweep, capsys):
    uri = sweep["uri"]
    assert (
        main(
            [
                "--experiment",
                "toy",
                "--method",
                "diverse",
                "--size",
                "2",
                "--tracking-uri",
                uri,
                "--filter",
                "tags.`unitlab.variant` != 'heads=25'",
            ]
        )
        == 0
    )
    run = committee_runs(sweep, "diverse")
    assert run.data.params["mechanism_diversity"] == "on: analysis/label_sets.json"
    assert run.data.tags["unitlab.members"] == f"{sweep['ids']['a']},{sweep['ids']['b']}"
    assert run.data.metrics["committee_test_acc"] == 1.0
    capsys.readouterr()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--experiment", "nope"], "error: unknown experiment 'nope'"),
        (["--experiment", "toy", "--size", "0"], "error: --size: must be >= 1, got 0"),
        (
            ["--experiment", "toy", "--method", "vote"],
            "error: --method: must be one of greedy, topk, diverse, got 'vote'",
        ),
        (
            ["--experiment", "toy", "--method", "diverse", "--diversity-weight", "-1"],
            "error: --diversity-weight: must be >= 0, got -1.0",
        ),
        (
            ["--experiment", "toy", "--method", "diverse", "--mechanism-weight", "5"],
            "error: --mechanism-weight: must be in [0, 1], got 5.0",
        ),
        (
            ["--experiment", "toy", "--filter", "tags.`unitlab.variant` = 'none'"],
            "error: no valid runs in 'toy' (no trial runs)",
        ),
        (["show", "0" * 32], "error: Run with id=" + "0" * 32 + " not found"),
        ([], "error: --experiment or --runs is required"),
    ],
)
def test_bad_input_exits_2_with_one_line(sweep, capsys, argv, message):
    assert main([*argv, "--tracking-uri", sweep["uri"]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [message]


@pytest.mark.parametrize(
    "argv",
    [
        ["committee", "--experiment", "toy"],
        ["committee", "show", "0" * 32],
        ["analyze", "toy"],
        ["runs", "toy"],
        ["prune", "toy", "--methods", "none"],
    ],
)
def test_missing_database_is_bad_input_for_every_verb(tmp_path, capsys, argv):
    """A mistyped SQLite path is one line naming it; no verb creates an empty database there."""
    assert cli([*argv, "--tracking-uri", f"sqlite:///{tmp_path}/none.db"]) == 2
    assert capsys.readouterr().err.strip() == f"error: --tracking-uri: no MLflow database at {tmp_path}/none.db"
    assert not (tmp_path / "none.db").exists()


def test_show_refuses_a_trial_run_from_the_cli_process(sweep):
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "committee", "show", sweep["ids"]["a"], "--tracking-uri", sweep["uri"]],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: run {sweep['ids']['a']} is not a committee run (unitlab.role=trial)"
    )
