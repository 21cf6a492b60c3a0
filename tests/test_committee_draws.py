"""``committee draws`` (claim 4 on disjoint draws): which committees are formed, their accuracies
and the interval of the difference, recomputed from the stored probabilities by brute force, through
a real SQLite MLflow store and the CLI."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from analysis.committees.draws import plan_draws
from orchestrator.cli import main as cli
from trainables.probs import write_probs

C, N = 6, 240
LABELS = np.arange(N) % C
# variant -> seeds; "h2" has a fourth seed (not used: committees have as many seeds as variants)
MODELS = {("h4", 0): 0.55, ("h4", 1): 0.5, ("h4", 2): 0.6, ("h8", 0): 0.5, ("h8", 1): 0.65, ("h8", 2): 0.45}
MODELS |= {("h2", 0): 0.5, ("h2", 1): 0.55, ("h2", 2): 0.6, ("h2", 3): 0.7}


def noisy_probs(rng: np.random.Generator, skill: float) -> np.ndarray:
    """Random probabilities whose argmax is the label on about ``skill`` of the images."""
    logits = rng.normal(size=(N, C))
    logits[np.arange(N), LABELS] += 2.5 * skill
    p = np.exp(logits)
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("draws")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("heads", artifact_location=(root / "artifacts").as_uri())
    rng = np.random.default_rng(0)
    runs = {}
    for (variant, seed), skill in MODELS.items():
        run_id = client.create_run(
            exp,
            tags={
                "unitlab.role": "trial",
                "unitlab.sweep": "heads",
                "unitlab.dataset": "synthetic",
                "unitlab.num_classes": str(C),
                "unitlab.variant": f"heads={variant[1:]}",
                "unitlab.seed": str(seed),
            },
        ).info.run_id
        folder = root / f"{variant}_{seed}"
        folder.mkdir()
        runs[(variant, seed)] = {"id": run_id}
        for split in ("val", "test"):
            p = noisy_probs(rng, skill)
            runs[(variant, seed)][split] = p
            write_probs(folder / f"probs_{split}.parquet", p, LABELS, np.arange(N), "synthetic", split)
            client.log_artifact(run_id, str(folder / f"probs_{split}.parquet"), "probs")
        client.set_terminated(run_id, "FINISHED")
    failed = client.create_run(exp, tags={"unitlab.role": "trial", "unitlab.variant": "heads=4", "unitlab.seed": "9"})
    client.set_terminated(failed.info.run_id, "FAILED")
    return {"uri": uri, "client": client, "runs": runs, "exp": exp, "root": root}


def test_plan_draws_disjoint_and_equal_size():
    variants = ["a", "a", "a", "b", "b", "b", "c", "c", "c", "c"]
    seeds = ["0", "1", "2", "0", "2", "1", "10", "2", "1", "0"]
    structures, own = plan_draws(variants, seeds)
    assert structures == {"0": [0, 3, 9], "1": [1, 5, 8], "2": [2, 4, 7]}  # seed s of every variant
    assert own == {"a": [0, 1, 2], "b": [3, 5, 4], "c": [9, 8, 7]}  # the first 3 seeds, numerically
    with pytest.raises(ValueError, match="seeds per variant: a: 3, b: 1"):
        plan_draws(["a", "a", "a", "b"], ["0", "1", "2", "0"])
    with pytest.raises(ValueError, match="have seed 0"):
        plan_draws(["a", "a"], ["0", "0"])


def brute_force(
    store, members_by_committee: dict[str, list[tuple[str, int]]], split: str = "test"
) -> dict[str, np.ndarray]:
    runs = store["runs"]
    return {
        name: np.mean([runs[m][split] for m in members], axis=0).argmax(axis=1) == LABELS
        for name, members in members_by_committee.items()
    }


def test_draws_recomputed_from_the_stored_probabilities(store, capsys):
    argv = [
        "committee",
        "draws",
        "--experiment",
        "heads",
        "--no-calibrate",
        "--n-boot",
        "500",
        "--tracking-uri",
        store["uri"],
    ]
    assert cli(argv) == 0
    printed = capsys.readouterr().out
    variants = ("h2", "h4", "h8")
    structures = {f"seed {s}": [(v, s) for v in variants] for s in range(3)}  # seed 3 of h2 alone: no draw
    seeds = {v: [(v, s) for s in range(3)] for v in variants}
    a, b = brute_force(store, structures), brute_force(store, seeds)
    diff = np.mean(list(a.values())) - np.mean(list(b.values()))

    (run,) = store["client"].search_runs([store["exp"]], "tags.`unitlab.role` = 'committee_draws'")
    m = run.data.metrics
    assert run.info.status == "FINISHED" and run.data.tags["unitlab.sweep"] == "heads"
    assert m["structures_test_acc"] == pytest.approx(np.mean(list(a.values())))
    assert m["seeds_test_acc"] == pytest.approx(np.mean(list(b.values())))
    assert m["difference"] == pytest.approx(diff) and m["structure_draws"] == 3 == m["seed_committees"]

    # the interval, by brute force: per draw, images and each kind's committees with replacement
    rng = np.random.default_rng(0)
    A, B = np.stack(list(a.values())).astype(float), np.stack(list(b.values())).astype(float)
    boot = []
    for _ in range(500):
        images = rng.integers(0, N, size=N)
        pick_a, pick_b = rng.integers(0, 3, size=3), rng.integers(0, 3, size=3)
        boot.append(A[pick_a][:, images].mean() - B[pick_b][:, images].mean())
    low, high = np.percentile(boot, [2.5, 97.5])
    assert (m["difference_ci_low"], m["difference_ci_high"]) == (
        pytest.approx(low, abs=0.02),
        pytest.approx(high, abs=0.02),
    )
    assert m["difference_ci_low"] < diff < m["difference_ci_high"]

    folder = store["client"].download_artifacts(run.info.run_id, "draws", str(store["root"] / "dl"))
    with open(Path(folder) / "draws.csv") as f:
        rows = list(csv.DictReader(f))
    ids = {k: v["id"] for k, v in store["runs"].items()}
    assert [(r["kind"], r["name"]) for r in rows] == [("structures", s) for s in "012"] + [
        ("seeds", f"heads={v[1:]}") for v in variants
    ]
    assert rows[0]["members"] == ",".join(ids[(v, 0)] for v in variants)
    assert rows[3]["members"] == ",".join(ids[("h2", s)] for s in range(3))
    for r, acc in zip(rows, [*a.values(), *b.values()]):
        assert float(r["test_acc"]) == pytest.approx(acc.mean())
    assert "structures minus seeds" in printed and f"{100 * diff:+.2f} points" in printed
    assert "and 3 vs 3 models" in printed and "excluded" in printed  # the FAILED run is named


def test_draws_calibrated_by_default_and_filtered(store, capsys):
    from analysis.committees.calibration import fit_temperature, scale

    query = "tags.`unitlab.variant` != 'heads=2'"
    argv = ["committee", "draws", "--experiment", "heads", "--filter", query, "--tracking-uri", store["uri"]]
    assert cli(argv) == 0
    capsys.readouterr()
    runs = store["runs"]
    cal = {k: scale(v["test"], fit_temperature(v["val"], LABELS)) for k, v in runs.items() if k[0] != "h2"}
    # two variants: committees of two, seeds 0 and 1 of each
    structures = [np.mean([cal[(v, s)] for v in ("h4", "h8")], axis=0) for s in range(3)]
    seeds = [np.mean([cal[(v, s)] for s in range(2)], axis=0) for v in ("h4", "h8")]
    expected = np.mean([(p.argmax(1) == LABELS).mean() for p in structures]) - np.mean(
        [(p.argmax(1) == LABELS).mean() for p in seeds]
    )
    newest = store["client"].search_runs(
        [store["exp"]], "tags.`unitlab.role` = 'committee_draws'", order_by=["attributes.start_time DESC"]
    )[0]
    assert newest.data.metrics["difference"] == pytest.approx(expected)
    assert newest.data.metrics["structure_draws"] == 3 and newest.data.metrics["seed_committees"] == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--filter", "tags.`unitlab.variant` = 'heads=4'"], "committee draws: need at least 2 variants, found 1"),
        (["--n-boot", "5"], "--n-boot: must be in [100, 100000], got 5"),
        (["--experiment", "nope"], "unknown experiment 'nope'"),
    ],
)
def test_draws_bad_input_is_one_line(store, capsys, extra, message):
    argv = ["committee", "draws", "--experiment", "heads", *extra, "--tracking-uri", store["uri"]]
    before = len(store["client"].search_runs([store["exp"]], "tags.`unitlab.role` = 'committee_draws'"))
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {message}"
    assert len(store["client"].search_runs([store["exp"]], "tags.`unitlab.role` = 'committee_draws'")) == before


def test_runs_versus_gives_each_variant_its_difference_over_images_and_seeds(store, capsys):
    """`runs NAME --versus VARIANT`: the mean test difference over seeds with its two-level interval,
    recomputed by brute force from the stored probabilities."""
    client, exp = store["client"], store["exp"]
    parent = client.create_run(exp, tags={"unitlab.role": "sweep", "unitlab.sweep": "heads"}).info.run_id
    for key, run in store["runs"].items():
        client.set_tag(run["id"], "mlflow.parentRunId", parent)
        client.set_tag(run["id"], "unitlab.trial_id", f"{key[0]}_{key[1]}")
        client.log_metric(run["id"], "test_acc", float((run["test"].argmax(1) == LABELS).mean()))
        client.log_metric(run["id"], "val_acc", float((run["val"].argmax(1) == LABELS).mean()))
    client.set_terminated(parent)
    assert cli(["runs", "heads", "--versus", "heads=4", "--tracking-uri", store["uri"]]) == 0
    out = capsys.readouterr().out
    correct = {
        v: np.stack([store["runs"][k]["test"].argmax(1) == LABELS for k in store["runs"] if k[0] == v])
        for v in ("h2", "h4", "h8")
    }
    rng = np.random.default_rng(0)
    a, b = correct["h8"].astype(float), correct["h4"].astype(float)
    boot = []
    for _ in range(2000):
        images = rng.integers(0, N, size=N)
        boot.append(a[rng.integers(0, 3, size=3)][:, images].mean() - b[rng.integers(0, 3, size=3)][:, images].mean())
    low, high = np.percentile(boot, [2.5, 97.5])
    line = next(x for x in out.splitlines() if "heads=8 minus heads=4" in x)
    assert f"{100 * (a.mean() - b.mean()):+.2f} points" in line and "and 3 vs 3 models" in line
    shown = [float(v) for v in line.split("95 % CI ")[1].split(",")[0].split(" to ")]
    assert shown == [pytest.approx(100 * low, abs=1.0), pytest.approx(100 * high, abs=1.0)]
    assert "heads=2 minus heads=4" in out and "and 4 vs 3 models" in out  # every seed of heads=2 counts here
    assert cli(["runs", "heads", "--versus", "heads=5", "--tracking-uri", store["uri"]]) == 2
    assert (
        "--versus: no finished trial of variant 'heads=5' (variants: heads=2; heads=4; heads=8)"
        in capsys.readouterr().err
    )
