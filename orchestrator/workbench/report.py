"""``python -m orchestrator report NAME [--out DIR]``: one self-contained HTML page about a sweep.

It refreshes the sweep summary on the parent run (``orchestrator.workbench.summary``) and writes
``report.html``: the summary and trials table, the sweep figures, each analysed trial's depth
figure, the pruned trials with accuracy vs dilution against their random controls, and the
committees built from the sweep. Figures are inlined (base64 PNG), so the page needs no network
and no MLflow; it is logged to the parent run as ``report/report.html`` and written to DIR.
"""

from __future__ import annotations

import argparse
import base64
import html
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Run  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from orchestrator.workbench.recap import committee_line, depth_rise, latest_committee, readout_series, recap  # noqa: E402
from orchestrator.workbench.runs import PRUNE_ACCURACIES, prune_rows, seed_spreads  # noqa: E402
from orchestrator.workbench.summary import TABLE, SweepSummary, finish, summarize_sweep  # noqa: E402
from orchestrator.workbench.tracking import (  # noqa: E402
    MEMBERS,
    METHOD,
    ROLE,
    ROLE_COMMITTEE,
    add_tracking_uri,
    find_parent,
    open_client,
    search_all,
    ui_links,
)
from trainables.schema import InputError, output_folder, refuse  # noqa: E402

STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%;margin:.5em 0}
h2{border-bottom:1px solid #ddd;padding-bottom:.2em}.note{color:#555;font-size:13px}"""


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


# What each figure shows, in one sentence under it (keys: the summary's figure names).
CAPTIONS = {
    "accuracy_by_variant": "Test accuracy of each variant: a dot per seed, the bar at their mean.",
    "accuracy_vs_latency": "Test accuracy against batch-1 latency per trial; the red line joins the trials "
    "that no other trial beats on both (the Pareto front), the dominated ones are grey.",
    "parallel_coordinates": "Every finished trial as one line across the axes that vary (seeds left out) "
    "to its validation accuracy, coloured by it: which axis values the best trials share.",
    "snr_by_depth": "Signal-to-noise ratio of the units' performance matrices at each tap, shallow to deep, "
    "one line per analysed trial: the papers expect it to rise with depth.",
    "heads_per_label": "How many heads of a block recognise a label, on average, against the block's head "
    "count; the dashed line is every head. Colour: the tap's depth.",
    "pruning": "Validation accuracy after fine-tuning against the share of weights removed, per pruning "
    "method; a guided mask should sit above the controls at its dilution.",
}


def _cell(column: str, value) -> str:
    """A table cell as a person reads it: accuracies in %, counts as integers, other numbers short."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return html.escape(str(value))
    if "acc" in column:
        return f"{100 * value:.2f} %"
    if float(value).is_integer() and abs(value) >= 1 or column in ("seed", "epochs", "members"):
        return f"{int(value):,}"
    if "dilution" in column:
        return f"{value:.3f}"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def _table(columns: tuple[str, ...], rows: list[dict]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(c, r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _figure(path: Path, key: str) -> str:
    """The image and, when known, the sentence that says what it shows."""
    caption = CAPTIONS.get(key)
    return _img(path, key) + (f'<p class="note">{html.escape(caption)}</p>' if caption else "")


def plot_pruning(rows: list[dict], path: Path) -> Path | None:
    """Fine-tuned validation accuracy vs dilution per prune method (random masks are the controls)."""
    points = [
        r
        for r in rows
        if r["status"] == "FINISHED" and r["dilution"] is not None and r["acc_finetuned_val"] is not None
    ]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in sorted({r["prune"].split(",")[0] for r in points}):
        mine = sorted((r for r in points if r["prune"].split(",")[0] == method), key=lambda r: r["dilution"])
        ax.plot(
            [r["dilution"] for r in mine],
            [r["acc_finetuned_val"] for r in mine],
            "o" if method == "none" else "o-",
            label=method,
            ms=5,
        )
    return finish(
        fig,
        ax,
        path,
        "dilution (share of weights removed)",
        "val accuracy after fine-tuning",
        "pruning: guided masks vs random controls",
    )


def committee_rows(client: MlflowClient, parent: Run) -> list[dict]:
    runs = search_all(client, [parent.info.experiment_id], f"tags.`{ROLE}` = '{ROLE_COMMITTEE}'")
    return [
        {
            "name": r.info.run_name,
            "method": r.data.tags.get(METHOD),
            "members": len(r.data.tags.get(MEMBERS, "").split(",")),
            **{
                k: r.data.metrics.get(k)
                for k in ("committee_val_acc", "committee_test_acc", "best_member_test_acc", "seed_committee_test_acc")
            },
            "run_id": r.info.run_id,
        }
        for r in runs
    ]


def analysis_figures(client: MlflowClient, summary: SweepSummary, folder: Path) -> list[tuple[str, Path]]:
    """(trial name, depth figure) of every analysed trial."""
    found = []
    for row in summary.rows:
        if row["analysed"]:
            try:
                found.append(
                    (
                        row["name"],
                        Path(
                            client.download_artifacts(
                                row["run_id"], "analysis/figures/depth.png", str(folder / row["run_id"])
                            )
                        ),
                    )
                )
            except (MlflowException, OSError):
                continue
    return found


def build_report(client: MlflowClient, name: str, out_dir: Path, uri: str) -> tuple[Path, list[str]]:
    """Refresh the summary, write ``out_dir/report.html`` and log it to the parent run; returns the
    page and the recap lines that open it."""
    parent = find_parent(client, name)
    if parent is None:
        raise InputError(f"report {name}: no sweep of that name in {uri}")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        summary = summarize_sweep(client, parent, out_dir=tmp / "summary")
        lines = recap(client, parent, summary.rows, summary.best)
        parts = [
            f"<h1>Sweep {html.escape(name)}</h1>",
            f'<p class="note">parent run {parent.info.run_id}, experiment {parent.info.experiment_id}</p>',
            "<h2>In short</h2>",
            "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ul>",
            "<h2>Summary</h2>",
            _markdown_lead(summary.markdown),
            _table(TABLE, summary.rows),
        ]
        spreads = seed_spreads(summary.rows)
        if spreads:
            parts += [
                "<h3>Variants with several seeds</h3>",
                '<p class="note">mean ± sample sd over seeds with the 95 % t interval of the mean.</p>',
                "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in spreads) + "</ul>",
            ]
        if summary.importance:
            parts += [
                "<h3>What mattered</h3>",
                '<p class="note">Each axis\'s share of the variance of the objective across the finished '
                "trials (Optuna's fANOVA on the sweep's study; <code>python -m orchestrator dashboard "
                f"{html.escape(name)}</code> explores it).</p>",
                "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in summary.importance) + "</ul>",
            ]
        parts += [_figure(path, key) for key, path in summary.figures.items()]
        pruned = prune_rows(client, parent)
        if pruned:
            parts += [
                "<h2>Pruning</h2>",
                '<p class="note">dilution is the share of weights removed; random cells keep the guided '
                "masks' per-layer dilution (or their own level). Compare on validation: the analysis "
                "that chose the masks read test images.</p>",
                _table(("variant", "seed", "prune", "dilution", "params_kept", *PRUNE_ACCURACIES), pruned),
            ]
            figure = plot_pruning(pruned, tmp / "pruning.png")
            if figure:
                parts.append(_figure(figure, "pruning"))
        committees = committee_rows(client, parent)
        if committees:
            parts += ["<h2>Committees</h2>", _table(tuple(committees[0]), committees)]
            latest = latest_committee(client, parent.info.experiment_id)
            parts.append(f'<p class="note">The latest {html.escape(committee_line(latest))}.</p>')
        figures = analysis_figures(client, summary, tmp / "analysis")
        if figures:
            parts += [
                "<h2>Single-unit analysis along depth</h2>",
                '<p class="note">Per analysed trial, at each tap from shallow to deep: the readout accuracy, '
                "the labels each unit recognises and its signal-to-noise ratio (docs/methods.md 2).</p>",
            ]
            rise = depth_rise(readout_series(client, summary.rows))
            if rise:
                parts.append(f'<p class="note">{html.escape(rise[0].upper() + rise[1:])}.</p>')
            for trial, path in figures:
                parts += [f"<h3>{html.escape(trial)}</h3>", _img(path, trial)]
        page = (
            f"<!doctype html><html><head><meta charset='utf-8'><title>Sweep {html.escape(name)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>"
        )
        report = out_dir / "report.html"
        report.write_text(page)
        client.log_artifact(parent.info.run_id, str(report), "report")
    return report, lines


def _markdown_lead(text: str) -> str:
    """The description's first paragraph (bold marks dropped) as HTML."""
    lead = text.split("\n\n")[0].replace("**", "").replace("`", "")
    return "".join(f"<p>{html.escape(line)}</p>" for line in lead.splitlines())


def run(args: argparse.Namespace) -> int:
    try:
        out = output_folder(f"reports/{args.name}" if args.out is None else args.out)  # before the summary is logged
        client, uri = open_client(args.tracking_uri, create=False)
        report, lines = build_report(client, args.name, out, uri)
    except InputError as err:
        return refuse(err)
    parent = find_parent(client, args.name)
    print("\n".join(lines))
    print(f"report: {report}")
    print(ui_links(uri, parent.info.experiment_id, parent.info.run_id, "sweep"))
    return 0


def add_report_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``report`` on the orchestrator's subparsers."""
    parser = subparsers.add_parser(
        "report", help="an HTML report of a sweep (also logged to its parent run)", description=__doc__.splitlines()[0]
    )
    parser.add_argument("name", help="the sweep's name")
    parser.add_argument("--out", default=None, help="folder for report.html (default: reports/NAME)")
    add_tracking_uri(parser)
    parser.set_defaults(func=run)
    return parser
