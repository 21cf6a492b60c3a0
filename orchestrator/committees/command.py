"""Soft committees from finished trial runs in MLflow (docs/methods.md section 6).

``python -m orchestrator committee --experiment NAME[,NAME] | --runs ID,ID [--include-pruned] [--filter F] [--size K] [--method M]`` reads
the trial runs' stored ``probs/probs_{val,test}.parquet`` (no model is re-evaluated), selects
members on validation only, evaluates on test, and logs a committee run in the same experiment:
tags ``unitlab.role=committee``, ``unitlab.members``, ``unitlab.method``; metrics
``committee_test_acc``, ``best_member_test_acc``, ``gain`` with its paired bootstrap interval over
the test images (``gain_ci_low`` / ``gain_ci_high``), ``committee_val_acc``, ``size``; the
``committee/`` artifacts ``members.csv``, ``excluded.csv``, ``curve.csv`` and
``accuracy_vs_size.png``. The seed control (the best variant with >= 2 valid runs, as an
equal-weight committee of its seeds) is added whenever available, with the committee's difference
from it and that difference's interval (``vs_seed``, ``vs_seed_ci_low`` / ``_high``). ``--method diverse`` adds
mechanism diversity from the runs' ``analysis/label_sets.json`` when every valid run has one
(param ``mechanism_diversity`` says whether it was on, and why not).
``python -m orchestrator committee show RUN_ID`` prints a committee run.
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

from analysis.committees.calibration import ece, nll
from analysis.committees.inputs import SPLITS, Candidate
from analysis.committees.selection import (
    CommitteeConfig,
    committee_correct,
    committee_probs,
    evaluate,
    seed_control,
    select,
)
from analysis.stats import paired_bootstrap
from orchestrator.committees.candidates import candidate_runs, load_runs
from orchestrator.committees.draws import add_draws_parser
from orchestrator.committees.draws import run as run_draws
from orchestrator.committees.predict import predict_images
from orchestrator.committees.register import (
    check_registry_names,
    gather_members,
    register_committee,
)
from orchestrator.schema import CommitteeError
from orchestrator.workbench.tracking import (
    MEMBERS,
    METHOD,
    ROLE,
    ROLE_COMMITTEE,
    ROLE_TRIAL,
    SEED_MEMBERS,
    SEED_VARIANT,
    SWEEP,
    add_tracking_uri,
    open_client,
    resolve_tracking_uri,
    ui_links,
)
from trainables.schema import InputError, output_file, refuse

ARTIFACT_DIR = "committee"
MEMBER_FIELDS = (
    "run_id",
    "variant",
    "seed",
    "val_acc",
    "test_acc",
    "count",
    "weight",
    "temperature",
    "test_nll_raw",
    "test_nll",
    "test_ece_raw",
    "test_ece",
)


def _profile_matrix(
    valid: list[Candidate], profiles: dict[str, np.ndarray | None], artifact: str | None
) -> tuple[np.ndarray | None, str]:
    """Stacked mechanism profiles of all valid runs, or None with the reason it is off."""
    if not artifact:
        return None, "off: no --profile-artifact"
    found = [profiles.get(c.run_id) for c in valid]
    lacking = sum(p is None for p in found)
    if lacking:
        return None, f"off: {lacking} of {len(valid)} runs lack {artifact}"
    if len({p.shape for p in found}) > 1:
        return None, f"off: {artifact} profiles differ in length"
    return np.stack(found), f"on: {artifact}"


def _write_csv(path: Path, fields: tuple[str, ...], rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _figure(path: Path, curve: list[dict], best_member: float, seed: dict | None, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    sizes = [r["size"] for r in curve]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(sizes, [r["test_acc"] for r in curve], "o-", label="committee, test")
    ax.plot(sizes, [r["val_acc"] for r in curve], "s--", alpha=0.6, label="committee, val (selection)")
    ax.axhline(best_member, color="gray", ls=":", label="best member, test")
    if seed:
        ax.plot(
            [seed["size"]], [seed["committee_test_acc"]], "r*", ms=12, label=f"seed committee ({seed['variant']}), test"
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("committee size (selection steps)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclass
class Record:
    """Everything a committee run logs."""

    tags: dict[str, str]
    params: dict[str, object]
    metrics: dict[str, float]
    members: list[dict]
    excluded: list[dict]
    curve: list[dict]
    seed: dict | None
    title: str


def _seed_groups(valid: list[Candidate]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(valid):
        if c.variant:
            groups.setdefault(c.variant, []).append(i)
    return groups


def compose(
    client: MlflowClient, runs: list, experiment: str, user_filter: str | None, config: CommitteeConfig
) -> Record:
    """Load and check the trial runs, select on validation, evaluate on test, seed control."""
    method, size = config.method, config.size
    profile_artifact = config.profile_artifact or None
    loaded = load_runs(client, runs, experiment, config.calibrate, profile_artifact if method == "diverse" else None)
    valid, excluded, raw_test = loaded.valid, loaded.excluded, loaded.raw_test
    temperatures, val, test = loaded.temperatures, loaded.val, loaded.test
    params: dict[str, object] = {
        "method": method,
        "size_requested": size,
        "filter": user_filter or "",
        "calibrate": config.calibrate,
    }
    if method == "greedy":
        params.update(
            init_size=config.init_size,
            bags=config.bags,
            bag_fraction=config.bag_fraction,
            truncate=config.truncate,
            bag_seed=config.bag_seed,
        )
    options = {}
    if method == "diverse":
        profiles, mechanism = _profile_matrix(valid, loaded.profiles, profile_artifact)
        options = {"lam": config.diversity_weight, "mu": config.mechanism_weight, "profiles": profiles}
        params.update(
            diversity_weight=config.diversity_weight,
            mechanism_weight=config.mechanism_weight,
            mechanism_diversity=mechanism,
        )
    selection = select(
        val,
        size,
        method,
        init_size=config.init_size,
        bags=config.bags,
        bag_fraction=config.bag_fraction,
        truncate=config.truncate,
        bag_seed=config.bag_seed,
        **options,
    )
    result = evaluate(selection, val, test)
    seed = seed_control(val, test, _seed_groups(valid))
    if seed is None and config.seed_control:
        raise CommitteeError("seed control unavailable: no variant has >= 2 valid runs")

    ids = [c.run_id for c in valid]
    counts, weights = selection.counts, selection.member_weights()
    labels = raw_test.labels
    members = [
        {
            "run_id": ids[m],
            "variant": valid[m].variant,
            "seed": valid[m].seed,
            "val_acc": result.member_val_acc[m],
            "test_acc": result.member_test_acc[m],
            "count": "" if selection.weights else counts[m],
            "weight": weights[m],
            "temperature": temperatures[m],
            "test_nll_raw": nll(raw_test.probs[m], labels),
            "test_nll": nll(test.probs[m], labels),
            "test_ece_raw": ece(raw_test.probs[m], labels),
            "test_ece": ece(test.probs[m], labels),
        }
        for m in selection.members
    ]
    curve = [
        {"size": i + 1, "added_run_id": ids[j], "val_acc": v, "test_acc": t}
        for i, (j, v, t) in enumerate(zip(selection.order, result.val_curve, result.test_curve))
    ]
    tags = {ROLE: ROLE_COMMITTEE, METHOD: method, MEMBERS: ",".join(ids[m] for m in selection.members)}
    sweeps = {c.sweep for c in valid}
    if len(sweeps) == 1 and None not in sweeps:
        tags[SWEEP] = sweeps.pop()
    metrics = {
        "committee_test_acc": result.committee_test_acc,
        "best_member_test_acc": result.best_member_test_acc,
        "gain": result.gain,
        "committee_val_acc": result.committee_val_acc,
        "size": len(selection.order),
        "n_members": len(members),
        "valid_runs": len(valid),
        "excluded_runs": len(excluded),
        "committee_test_nll": nll(committee_probs(test, selection), labels),
        "committee_test_ece": ece(committee_probs(test, selection), labels),
        "committee_test_nll_raw": nll(committee_probs(raw_test, selection), labels),
        "committee_test_ece_raw": ece(committee_probs(raw_test, selection), labels),
    }
    # Paired bootstrap intervals over the test images (analysis/stats.py): against the best member
    # and, where it exists, against the seed committee.
    correct = committee_correct(test, selection.order, selection.weights)
    best = max(selection.members, key=lambda m: result.member_test_acc[m])
    gain = paired_bootstrap(correct, test.correct[best])
    metrics.update(gain_ci_low=gain.low, gain_ci_high=gain.high)
    if seed:
        versus = paired_bootstrap(correct, committee_correct(test, seed["members"]))
        metrics.update(vs_seed=versus.estimate, vs_seed_ci_low=versus.low, vs_seed_ci_high=versus.high)
        seed = {**seed, "size": len(seed["members"]), "members": [ids[i] for i in seed["members"]]}
        tags.update({SEED_VARIANT: seed["variant"], SEED_MEMBERS: ",".join(seed["members"])})
        metrics.update(
            seed_committee_test_acc=seed["committee_test_acc"],
            seed_gain=seed["gain"],
            seed_best_member_test_acc=seed["best_member_test_acc"],
            seed_size=seed["size"],
        )
    return Record(
        tags,
        params,
        metrics,
        members,
        [{"run_id": r, "reason": why} for r, why in excluded],
        curve,
        seed,
        f"{method} committee, {experiment}",
    )


def log_committee(client: MlflowClient, experiment_id: str, record: Record) -> str:
    """Log ``record`` as a FINISHED committee run (FAILED if logging breaks); returns its id."""
    run = client.create_run(
        experiment_id, tags=record.tags, run_name=f"committee·{record.tags[METHOD]}·k{record.params['size_requested']}"
    )
    run_id = run.info.run_id
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            _write_csv(out / "members.csv", MEMBER_FIELDS, record.members)
            _write_csv(out / "excluded.csv", ("run_id", "reason"), record.excluded)
            _write_csv(out / "curve.csv", ("size", "added_run_id", "val_acc", "test_acc"), record.curve)
            _figure(
                out / "accuracy_vs_size.png",
                record.curve,
                record.metrics["best_member_test_acc"],
                record.seed,
                record.title,
            )
            client.log_artifacts(run_id, str(out), ARTIFACT_DIR)
        stamp = run.info.start_time
        metrics = [Metric(k, float(v), stamp, 0) for k, v in record.metrics.items()]
        metrics += [
            Metric(f"{split}_acc_vs_size", r[f"{split}_acc"], stamp, r["size"])
            for r in record.curve
            for split in SPLITS
        ]
        client.log_batch(run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in record.params.items()])
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


def build(
    client: MlflowClient,
    experiments: str | None,
    user_filter: str | None,
    config: CommitteeConfig,
    register: str | None = None,
    alias: str | None = None,
    tracking_uri: str = "",
    run_ids: list[str] | None = None,
    include_pruned: bool = False,
) -> tuple[str, str | None]:
    """Check the input, then select, evaluate and log one committee; with ``register``, check every
    member's files first, then log the committee as an MLflow Model and register it.

    Candidates: the trial runs of ``experiments`` (comma-separated names; pruned trials too with
    ``include_pruned``), or the runs ``run_ids``. The committee run goes to the first experiment
    (or the first run's). Returns (committee run id, registered model URI or None)."""
    runs, home, label = candidate_runs(client, experiments, user_filter, run_ids, include_pruned)
    record = compose(client, runs, label, user_filter, config)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "committee"
        shape = gather_members(client, record.members, folder) if register else None  # before anything is logged
        run_id = log_committee(client, home, record)
        try:
            model_uri = register_committee(tracking_uri, run_id, folder, shape, register, alias) if register else None
        except BaseException:
            client.delete_run(run_id)  # no committee run left behind without its Model
            raise
    return run_id, model_uri


def _read_csv(client: MlflowClient, run_id: str, name: str, dst: str) -> list[dict]:
    with open(client.download_artifacts(run_id, f"{ARTIFACT_DIR}/{name}", dst), newline="") as f:
        return list(csv.DictReader(f))


def _points(estimate: float, low: float, high: float) -> str:
    """An accuracy difference in points with its interval."""
    return f"{100 * estimate:+.2f} points (95 % CI {100 * low:+.2f} to {100 * high:+.2f}, paired bootstrap over test images)"


def show(client: MlflowClient, run_id: str) -> str:
    """A committee run as text: metrics, seed control, member table, excluded runs."""
    run = client.get_run(run_id)
    tags, m = run.data.tags, run.data.metrics
    if tags.get(ROLE) != ROLE_COMMITTEE:
        raise CommitteeError(f"run {run_id} is not a committee run ({ROLE}={tags.get(ROLE)})")
    with tempfile.TemporaryDirectory() as tmp:
        members = _read_csv(client, run_id, "members.csv", tmp)
        excluded = _read_csv(client, run_id, "excluded.csv", tmp)
    exp = client.get_experiment(run.info.experiment_id).name
    lines = [
        f"committee {run_id}  experiment {exp}  method {tags.get(METHOD)}  "
        f"size {int(m['size'])}  members {len(members)}",
        f"  test acc {m['committee_test_acc']:.4f}  best member {m['best_member_test_acc']:.4f}  "
        f"gain {m['gain']:+.4f}  val acc {m['committee_val_acc']:.4f}",
    ]
    if "gain_ci_low" in m:
        lines.append(f"  gain over the best member {_points(m['gain'], m['gain_ci_low'], m['gain_ci_high'])}")
    if "committee_test_nll" in m:
        lines.append(
            f"  test NLL {m['committee_test_nll']:.4f} (members uncalibrated: {m['committee_test_nll_raw']:.4f})  "
            f"ECE {m['committee_test_ece']:.4f} ({m['committee_test_ece_raw']:.4f})"
        )
    if "seed_committee_test_acc" in m:
        lines.append(
            f"  seed control ({tags[SEED_VARIANT]}, {int(m['seed_size'])} runs): "
            f"test acc {m['seed_committee_test_acc']:.4f}  best member "
            f"{m['seed_best_member_test_acc']:.4f}  gain {m['seed_gain']:+.4f}"
        )
        if "vs_seed" in m:
            lines.append(
                f"  committee minus seed committee {_points(m['vs_seed'], m['vs_seed_ci_low'], m['vs_seed_ci_high'])}"
            )
    else:
        lines.append("  seed control: unavailable (no variant with >= 2 valid runs)")
    lines.append(
        f"  {'run_id':<32}  {'variant':<30}  {'seed':>4}  {'val_acc':>7}  {'test_acc':>8}  "
        f"{'count':>5}  {'weight':>6}  {'T':>5}"
    )
    for r in members:
        lines.append(
            f"  {r['run_id']:<32}  {r['variant']:<30}  {r['seed']:>4}  {float(r['val_acc']):7.4f}  "
            f"{float(r['test_acc']):8.4f}  {r['count']:>5}  {float(r['weight']):6.3f}  "
            f"{float(r.get('temperature') or 1):5.2f}"
        )
    lines.append(f"  excluded runs: {len(excluded)}")
    lines.extend(f"    {r['run_id']}  {r['reason']}" for r in excluded)
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Handle a parsed ``committee`` command; bad input gives one line on stderr and exit code 2."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        if args.committee_command == "predict":
            out = output_file(args.out, "--out")
            open_client(args.tracking_uri, create=False)  # a registry that is not there: one line
            uri = resolve_tracking_uri(args.tracking_uri)
            print(
                f"predictions: {predict_images(args.model_uri, Path(args.images), out, args.device, tracking_uri=uri)}"
            )
            return 0
        if args.committee_command == "draws":
            return run_draws(args)
        if args.committee_command == "show":
            print(show(open_client(args.tracking_uri, create=False)[0], args.run_id))
            return 0
        config = CommitteeConfig.from_flags(args)
        if args.alias is not None and args.register is None:
            raise CommitteeError("--alias needs --register NAME")
        check_registry_names(args.register, args.alias)  # MLflow's rules, before any run exists
        client, uri = open_client(args.tracking_uri, create=False)
        run_ids = [r.strip() for r in (args.runs or "").split(",") if r.strip()]
        run_id, model_uri = build(
            client, args.experiment, args.filter, config, args.register, args.alias, uri, run_ids, args.include_pruned
        )
        print(show(client, run_id))
        if model_uri:
            print(
                f"registered: {model_uri}  (mlflow.pyfunc.load_model({model_uri!r}); "
                f"python -m orchestrator committee predict {model_uri} IMAGES)"
            )
        print(ui_links(uri, client.get_run(run_id).info.experiment_id, run_id, "committee"))
        return 0
    except (InputError, MlflowException, OSError) as err:
        return refuse(err)


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the committee options and its nested ``show`` command to ``parser``."""
    parser.add_argument("--experiment", help="experiment (sweep) name, or several, comma-separated (same dataset)")
    parser.add_argument(
        "--runs", default=None, help="explicit candidate run ids, comma-separated (instead of --experiment)"
    )
    parser.add_argument("--include-pruned", action="store_true", help="pruned trial runs are candidates too")
    parser.add_argument("--filter", help=f"extra MLflow filter string, ANDed with tags.`{ROLE}` = '{ROLE_TRIAL}'")
    CommitteeConfig.add_flags(parser)
    parser.add_argument(
        "--register",
        default=None,
        metavar="NAME",
        help="log the committee as an MLflow Model and register it under NAME",
    )
    parser.add_argument("--alias", default=None, help="with --register: an alias for the new version (e.g. champion)")
    add_tracking_uri(parser)
    sub = parser.add_subparsers(dest="committee_command", title="subcommands", metavar="{show,predict,draws}")
    show_parser = sub.add_parser("show", help="print a committee run")
    show_parser.add_argument("run_id")
    add_tracking_uri(show_parser, nested=True)
    predict_parser = sub.add_parser("predict", help="label images with a registered committee (models:/NAME@ALIAS)")
    predict_parser.add_argument("model_uri")
    predict_parser.add_argument("images", help="a folder of PNG/JPEG files or a Parquet file of images")
    predict_parser.add_argument("--out", default="predictions.parquet", help="output Parquet (source, label, probs)")
    predict_parser.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="where the members run (auto: the GPU when one is visible)",
    )
    add_tracking_uri(predict_parser, nested=True)
    add_draws_parser(sub)
    parser.set_defaults(func=run)
    return parser


def add_committee_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``committee`` (and ``committee show``) on a CLI's subparsers; sets ``func=run``."""
    return configure(
        subparsers.add_parser(
            "committee", help="soft committees from finished trial runs", description=__doc__.split("\n\n")[0]
        )
    )
