"""Where a sweep's Optuna study lives: the RDB URL beside the tracking store, without passwords in
what is logged or printed."""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path

import optuna
from optuna.storages import RDBStorage

STUDY_STORAGE_ENV = "UNITLAB_STUDY_STORAGE"
STUDY_FILE = "optuna.db"


def study_storage(tracking_uri: str, explicit: str | None = None) -> str:
    """The study's RDB URL: ``explicit``, else ``UNITLAB_STUDY_STORAGE``, else ``optuna.db`` beside a
    SQLite tracking file, else (a tracking server) ``optuna.db`` in the working directory."""
    chosen = explicit or os.environ.get(STUDY_STORAGE_ENV)
    if chosen:
        return chosen
    parsed = urllib.parse.urlparse(tracking_uri)
    if parsed.scheme == "sqlite":
        path = Path(tracking_uri.removeprefix("sqlite:///"))
        return f"sqlite:///{path.parent / STUDY_FILE}"
    return f"sqlite:///{Path.cwd() / STUDY_FILE}"


def public_url(url: str) -> str:
    """``url`` without its password (for tags and messages)."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.password is None:
        return url
    netloc = parsed.netloc.replace(f":{parsed.password}@", ":***@")
    return urllib.parse.urlunsplit(parsed._replace(netloc=netloc))


def open_storage(url: str) -> RDBStorage:
    """The RDB storage at ``url`` (created with its schema on first use)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {})


def logged_study_url(tag: str) -> str | None:
    """The study URL from a parent run's tag: as logged, or ``UNITLAB_STUDY_STORAGE`` where the
    logged one hides a password; None when there is none."""
    if "***" in tag:
        return os.environ.get(STUDY_STORAGE_ENV)
    if tag.startswith("sqlite:///") and not Path(tag.removeprefix("sqlite:///")).is_file():
        return None  # never create an empty study file by reading
    return tag or None
