"""Command line: ``python -m orchestrator sweep SPEC | resume NAME | runs NAME | analyze | prune | committee | report | dashboard NAME``.

Exit codes: 0 done, 1 some trials failed, 2 bad spec or arguments (one line on stderr, nothing
written), 130 interrupted (continue with ``resume``).
"""

from __future__ import annotations

import argparse
import os
import sys

from orchestrator.committees.command import add_committee_parser
from orchestrator.stages.analyze import add_analyze_parser
from orchestrator.stages.prune import add_prune_parser
from orchestrator.sweeps.callbacks import VERBOSE
from orchestrator.sweeps.run import resume_sweep, run_sweep
from orchestrator.workbench.dashboard import add_dashboard_parser
from orchestrator.workbench.report import add_report_parser
from orchestrator.workbench.runs import format_runs
from orchestrator.workbench.tracking import add_tracking_uri, open_client
from trainables.schema import InputError, OneLineParser, refuse


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m orchestrator", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show everything Ray, Tune and MLflow print (Tune's status tables, per-checkpoint lines)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    sweep = commands.add_parser("sweep", help="validate a sweep spec and run it")
    sweep.add_argument("spec", help="sweep spec YAML")
    sweep.add_argument(
        "--new", action="store_true", help="if the spec's name already has a sweep, run this one as NAME-2, NAME-3..."
    )
    resume = commands.add_parser("resume", help="continue an interrupted sweep")
    resume.add_argument("name", help="the sweep's name")
    for sub in (sweep, resume):
        sub.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else local)")
        sub.add_argument("--storage-path", default=None, help="Tune storage folder or URI (default: the spec's)")
    runs = commands.add_parser("runs", help="print a sweep's trials from MLflow")
    runs.add_argument("name", help="the sweep's name")
    runs.add_argument(
        "--versus",
        metavar="VARIANT",
        default=None,
        help="also every other variant's test accuracy minus this one's (mean over seeds, 95 %% interval)",
    )
    for sub in (sweep, resume, runs):
        add_tracking_uri(sub)
    add_analyze_parser(commands)
    add_committee_parser(commands)
    add_prune_parser(commands)
    add_report_parser(commands)
    add_dashboard_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        os.environ[VERBOSE] = "1"
    if args.command in ("analyze", "committee", "prune", "report", "dashboard"):
        return args.func(args)
    try:
        if args.command == "runs":
            client, uri = open_client(args.tracking_uri, create=False)
            print(format_runs(client, args.name, uri, args.versus))
            return 0
        if args.command == "sweep":
            return run_sweep(args.spec, args.address, args.tracking_uri, args.storage_path, args.new)
        return resume_sweep(args.name, args.address, args.tracking_uri, args.storage_path)
    except InputError as exc:
        return refuse(exc)
    except KeyboardInterrupt:
        print("interrupted; continue with `python -m orchestrator resume NAME`", file=sys.stderr)
        return 130
