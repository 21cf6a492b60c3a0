"""The statistics module against textbook computations: scipy's t interval, the normal
approximation of a paired difference's standard error, and hand-built cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from analysis.stats import grouped_bootstrap, mean_spread, paired_bootstrap, t975


@pytest.mark.parametrize("df", [1, 2, 5, 12, 30, 31, 45, 100, 1000])
def test_t_quantile_matches_scipy(df):
    assert t975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-4)


def test_mean_interval_is_scipys_t_interval():
    values = [0.3545, 0.3563, 0.3564]  # three seeds of one committee member (docs/results.md)
    spread = mean_spread(values)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert spread.n == 3 and spread.mean == pytest.approx(np.mean(values))
    assert spread.sd == pytest.approx(np.std(values, ddof=1))
    assert (spread.low, spread.high) == (pytest.approx(low, abs=1e-6), pytest.approx(high, abs=1e-6))
    assert "± 0.11 %" in spread.text() and "3 seeds" in spread.text()
    one = mean_spread([0.5])
    assert one.sd is None and one.text() == "50.00 % (1 seed)"
    with pytest.raises(ValueError):
        mean_spread([])


def test_paired_bootstrap_against_the_normal_approximation():
    rng = np.random.default_rng(1)
    n = 4000
    a = rng.random(n) < 0.42
    b = np.where(rng.random(n) < 0.8, a, rng.random(n) < 0.40)  # mostly the same answers: paired
    diff = paired_bootstrap(a, b, n_boot=4000, seed=3)
    d = a.astype(float) - b.astype(float)
    se = d.std(ddof=1) / math.sqrt(n)
    assert diff.estimate == pytest.approx(a.mean() - b.mean())
    assert diff.high - diff.low == pytest.approx(2 * 1.96 * se, rel=0.1)
    assert diff.low < diff.estimate < diff.high and diff.n == n
    unpaired_se = math.sqrt(a.var() / n + b.var() / n)
    assert se < 0.7 * unpaired_se  # pairing is what makes the interval narrow


def test_paired_bootstrap_edge_cases():
    same = np.array([1, 0, 1, 1, 0], dtype=bool)
    assert paired_bootstrap(same, same).low == 0.0 == paired_bootstrap(same, same).high
    always = paired_bootstrap(np.ones(50), np.zeros(50))
    assert (always.estimate, always.low, always.high) == (1.0, 1.0, 1.0)
    assert paired_bootstrap(same, ~same, seed=0) == paired_bootstrap(same, ~same, seed=0)  # seeded
    assert "paired bootstrap over 5 test images" in paired_bootstrap(same, ~same).text()
    with pytest.raises(ValueError):
        paired_bootstrap(np.ones(3), np.ones(4))


def test_runs_and_summary_give_each_multi_seed_variant_its_spread():
    from orchestrator.workbench.runs import seed_spreads

    row = {"status": "FINISHED", "val_acc": 0.36}
    rows = [{**row, "variant": "heads=4", "test_acc": t} for t in (0.3545, 0.3563, 0.3564)] + [
        {**row, "variant": "heads=16", "test_acc": 0.375},
        {**row, "variant": "heads=4", "status": "FAILED", "test_acc": None},
    ]
    (line,) = seed_spreads(rows)
    assert line.startswith("heads=4: test 35.57 ± 0.11 % (95 % CI 35.31 to 35.84, 3 seeds)"), line


def test_grouped_bootstrap_with_one_model_each_is_the_paired_bootstrap():
    rng = np.random.default_rng(4)
    a = rng.random(3000) < 0.45
    b = np.where(rng.random(3000) < 0.7, a, rng.random(3000) < 0.40)
    paired = paired_bootstrap(a, b, n_boot=3000, seed=1)
    grouped = grouped_bootstrap(a[None], b[None], n_boot=3000, seed=1)
    assert grouped.estimate == pytest.approx(paired.estimate)
    assert grouped.high - grouped.low == pytest.approx(paired.high - paired.low, rel=0.1)
    assert grouped.groups == (1, 1) and "and 1 vs 1 models" in grouped.text()


def test_grouped_bootstrap_against_the_two_level_variance():
    """Three models of very different accuracy against one: the interval's width follows
    var(model means) / k + var(image means of the difference) / n (the textbook two-stage variance)."""
    rng = np.random.default_rng(5)
    n = 4000
    shared = rng.random(n)
    a = np.stack([shared < p for p in (0.30, 0.40, 0.50)])  # nested answers: models differ by skill
    b = (shared < 0.38)[None]
    diff = grouped_bootstrap(a, b, n_boot=4000, seed=2)
    between = a.mean(axis=1).var() / 3  # the bootstrap's plug-in (ddof 0) between-model variance
    within = (a.mean(axis=0) - b[0]).var() / n
    assert diff.estimate == pytest.approx(a.mean() - b.mean())
    assert diff.high - diff.low == pytest.approx(2 * 1.96 * math.sqrt(between + within), rel=0.15)
    only_images = paired_bootstrap(a.mean(axis=0), b[0].astype(float), n_boot=4000, seed=2)
    assert diff.high - diff.low > 3 * (only_images.high - only_images.low)  # the seeds' spread counts
    with pytest.raises(ValueError):
        grouped_bootstrap(a, b[:, :10])


def test_head_statistics_get_their_seed_spread():
    from orchestrator.workbench.runs import seed_spreads

    heads = [(37.5, 1.50, 0.534, 0.420), (42.8, 1.71, 0.504, 0.412), (38.3, 1.53, 0.478, 0.419)]
    keys = ("labels_per_head_by_depth", "heads_per_label_by_depth", "head_max_share_by_depth")
    rows = [
        {
            "status": "FINISHED",
            "variant": "heads=4",
            "val_acc": 0.36,
            "test_acc": 0.35,
            "metrics": dict(zip((*keys, "head_max_share_control_by_depth"), h)),
        }
        for h in heads
    ]
    _, line = seed_spreads(rows)
    labels = mean_spread([h[0] for h in heads])
    assert line.startswith(f"heads=4 heads: labels per head {labels.mean:.1f} ± {labels.sd:.1f} (95 % CI")
    assert "heads per label 1.58 ± 0.11" in line and "its shuffled control 0.417 ± 0.004" in line
    above = mean_spread([h[2] - h[3] for h in heads])
    assert f"share above the control {above.mean:.3f} ± {above.sd:.3f}" in line
    del rows[0]["metrics"][keys[0]]  # a seed without it: that statistic is left out, not half-averaged
    assert "labels per head" not in seed_spreads(rows)[1]


def test_report_shows_the_seed_spread(tmp_path):
    """A sweep's report, built from a real MLflow store holding three seeds of one variant."""
    from mlflow import MlflowClient

    from orchestrator.workbench.report import build_report

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("seeds", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp, tags={"unitlab.role": "sweep", "unitlab.sweep": "seeds"}).info.run_id
    for seed, acc in enumerate((0.3545, 0.3563, 0.3564)):
        tags = {"mlflow.parentRunId": parent, "unitlab.role": "trial", "unitlab.sweep": "seeds"}
        tags |= {"unitlab.variant": "heads=4", "unitlab.seed": str(seed), "unitlab.trial_id": f"t{seed}"}
        run = client.create_run(exp, tags=tags).info.run_id
        for name, value in (("val_acc", acc + 0.01), ("test_acc", acc)):
            client.log_metric(run, name, value)
        client.set_terminated(run)
    client.set_terminated(parent)
    page, _ = build_report(client, "seeds", tmp_path / "report", uri)
    assert "heads=4: test 35.57 ± 0.11 % (95 % CI 35.31 to 35.84, 3 seeds)" in page.read_text()
