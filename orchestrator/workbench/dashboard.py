"""``python -m orchestrator dashboard NAME``: optuna-dashboard on a sweep's Optuna study.

Every sweep is also an Optuna study (``orchestrator.sweeps.study``); this serves it on 127.0.0.1
(``--host`` to change) with optuna-dashboard: each trial's parameters, its val accuracy per epoch
while it trains, the history and Pareto front of the sweep's metrics, parameter importances and
parallel coordinates. The study's storage: ``--study-storage``, else ``UNITLAB_STUDY_STORAGE``, else
the URL on the sweep's parent run (``unitlab.study_storage``), else ``optuna.db`` beside the
tracking store. Blocks until interrupted.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from orchestrator.workbench.study_store import STUDY_STORAGE_ENV, open_storage, public_url, study_storage
from orchestrator.workbench.tracking import STUDY, add_tracking_uri, find_parent, open_client
from trainables.schema import InputError, check_int, refuse


def study_url(name: str, tracking_uri: str | None, explicit: str | None) -> tuple[str, int]:
    """The storage URL of sweep ``name``'s study and the study's id; one-line errors for a sweep
    or study that is not there."""
    client, uri = open_client(tracking_uri, create=False)
    parent = find_parent(client, name)
    if parent is None:
        raise InputError(f"dashboard {name}: no sweep of that name in {uri}")
    logged = parent.data.tags.get(STUDY, "")
    url = study_storage(uri, explicit or (logged if logged and "***" not in logged else None))
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise InputError(f"dashboard {name}: no study file {url.removeprefix('sqlite:///')} (set --study-storage)")
    try:
        storage = open_storage(url)
        return url, storage.get_study_id_from_name(name)
    except KeyError:
        raise InputError(
            f"dashboard {name}: no study {name!r} in {public_url(url)} (sweeps record one since this version; "
            f"set --study-storage or {STUDY_STORAGE_ENV} if it lives elsewhere)"
        ) from None


def run(args: argparse.Namespace) -> int:
    """Handle ``dashboard``: check the study, print its URL, serve until interrupted."""
    try:
        check_int(args.port, "--port", 1, 65535)
        url, sid = study_url(args.name, args.tracking_uri, args.study_storage)
    except InputError as err:
        return refuse(err)
    from optuna_dashboard import run_server  # imported here: only this command needs it

    print(f"study {args.name} ({public_url(url)}): http://{args.host}:{args.port}/dashboard/studies/{sid}", flush=True)
    try:
        run_server(url, host=args.host, port=args.port)
    except KeyboardInterrupt:
        pass
    return 0


def add_dashboard_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``dashboard`` on the orchestrator's subparsers."""
    parser = subparsers.add_parser(
        "dashboard", help="optuna-dashboard on a sweep's Optuna study", description=__doc__.splitlines()[0]
    )
    parser.add_argument("name", help="the sweep's name")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    parser.add_argument(
        "--study-storage", default=None, help=f"the study's RDB URL (default: {STUDY_STORAGE_ENV}, else the sweep's)"
    )
    add_tracking_uri(parser)
    parser.set_defaults(func=run)
    return parser
