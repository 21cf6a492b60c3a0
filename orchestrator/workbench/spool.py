"""A trial's MLflow writes, sent in order by a background thread and kept while the server is away.

Training never waits for MLflow: ``submit`` queues a write and returns. When the tracking server
does not answer (a transient error: connection refused, timeout, 5xx after MLflow's own retries,
an error answer that says the server's side failed: its database away, locked or overloaded),
the writer keeps the write at the head of the queue, prints one warning line (Ray forwards it to
the driver's console) and tries again every ``poll_s`` seconds; writes are never reordered or
dropped. ``drain`` waits until everything is sent, at most ``wait_s`` seconds, which is what a
trial does before it reports itself finished. A write that fails for any other reason (a bad
value, a read-only artifact store) is not retried: it is raised by the next ``submit`` or
``drain``, so the trial fails with that error.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import requests
from mlflow.exceptions import MlflowException, RestException

SPOOL_RECORDS = 10_000  # writes kept while the server is away; one per epoch plus a few per trial
WAIT_SECONDS = float(os.environ.get("UNITLAB_MLFLOW_WAIT_S", 3600))  # how long a finished trial waits for the server
POLL_SECONDS = float(os.environ.get("UNITLAB_MLFLOW_POLL_S", 10))  # retry interval while it is away
# Per-request budget inside trials: fail a write within about a minute and let the spool retry,
# instead of MLflow's default of several minutes of blocking retries per call.
TRIAL_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


# Error codes of a server that answered but could not do the write now (HTTP 5xx / 429): worth
# retrying; a rejected request (4xx: a bad value, a missing run) is not.
SERVER_SIDE_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}

# What a busy or unreachable server says, whatever code it answers with: MLflow's client after its
# own retries, SQLite's lock, and the server's SQLAlchemy pool exhausted (answered as BAD_REQUEST by
# MLflow 3.17 under 128 concurrent trials: benchmarks/tracking_load.py).
BUSY_SIGNS = ("API request to", "Max retries exceeded", "database is locked", "QueuePool limit", "connection timed out")

T = TypeVar("T")


class TrackingUnavailable(RuntimeError):
    """The tracking server stayed away longer than the spool allows."""


def is_transient(exc: BaseException) -> bool:
    """Whether a failed MLflow call is worth retrying later (the server or network, not the request)."""
    if isinstance(
        exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError, TimeoutError)
    ):
        return True
    if isinstance(exc, RestException) and exc.error_code in SERVER_SIDE_CODES:
        return True  # the server answered that it failed (its database away or locked, overloaded)
    if isinstance(exc, MlflowException):
        text = str(exc)
        return any(sign in text for sign in BUSY_SIGNS)
    return False


def call_when_up(call: Callable[[], T], where: str, poll_s: float = POLL_SECONDS, wait_s: float = WAIT_SECONDS) -> T:
    """``call()``, retried every ``poll_s`` while the server at ``where`` is away (one warning line),
    for at most ``wait_s``; any other error is raised at once."""
    deadline = time.monotonic() + wait_s
    warned = False
    while True:
        try:
            return call()
        except Exception as exc:
            if not is_transient(exc) or time.monotonic() > deadline:
                raise
            if not warned:
                print(
                    f"unitlab: MLflow at {where} is not answering ({_first_line(exc)}); waiting up to "
                    f"{wait_s:g} s, retrying every {poll_s:g} s",
                    file=sys.stderr,
                    flush=True,
                )
                warned = True
            time.sleep(poll_s)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


class Spool:
    """Ordered, bounded, asynchronous MLflow writes for one trial run."""

    def __init__(
        self, where: str, limit: int = SPOOL_RECORDS, poll_s: float = POLL_SECONDS, wait_s: float = WAIT_SECONDS
    ):
        self.where, self.limit, self.poll_s, self.wait_s = where, limit, poll_s, wait_s
        self._queue: collections.deque[tuple[str, Callable[[], Any]]] = collections.deque()
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._busy = False
        self.away_since: float | None = None
        self.outages = 0
        self._thread = threading.Thread(target=self._run, name="unitlab-mlflow-spool", daemon=True)
        self._thread.start()

    def submit(self, what: str, write: Callable[[], Any]) -> None:
        """Queue one write (``what`` names it in warnings); raises a permanent error of an earlier write."""
        with self._cond:
            self._raise_error()
            if len(self._queue) >= self.limit:
                raise TrackingUnavailable(
                    f"MLflow at {self.where} away for {self._away():.0f} s with "
                    f"{len(self._queue)} writes waiting (spool limit {self.limit})"
                )
            self._queue.append((what, write))
            self._cond.notify_all()

    def drain(self) -> None:
        """Wait until every queued write is sent (at most ``wait_s``), then raise any permanent error."""
        deadline = time.monotonic() + self.wait_s
        with self._cond:
            while (self._queue or self._busy) and self._error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TrackingUnavailable(
                        f"MLflow at {self.where} away for {self._away():.0f} s; "
                        f"{len(self._queue)} writes not sent (waited {self.wait_s:g} s)"
                    )
                self._cond.wait(min(left, 1.0))
            self._raise_error()

    def drain_now(self, wait_s: float = 5.0) -> None:
        """Give queued writes a few seconds (a failing trial's last metrics), raising nothing."""
        with self._cond:
            deadline = time.monotonic() + wait_s
            while (self._queue or self._busy) and self._error is None and time.monotonic() < deadline:
                self._cond.wait(0.2)

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue) + self._busy

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _away(self) -> float:
        return 0.0 if self.away_since is None else time.monotonic() - self.away_since

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue or self._error is not None:
                    self._cond.wait()
                what, write = self._queue[0]
                self._busy = True
            try:
                write()
            except Exception as exc:  # noqa: BLE001 - classified below, never lost
                with self._cond:
                    self._busy = False
                    if not is_transient(exc):
                        self._error = exc
                        self._cond.notify_all()
                        continue
                    if self.away_since is None:
                        self.away_since = time.monotonic()
                        self.outages += 1
                        print(
                            f"unitlab: MLflow at {self.where} is not answering ({_first_line(exc)}); training "
                            f"goes on and {len(self._queue)} writes wait here, retried every {self.poll_s:g} s",
                            file=sys.stderr,
                            flush=True,
                        )
                time.sleep(self.poll_s)
                continue
            with self._cond:
                self._queue.popleft()
                self._busy = False
                if self.away_since is not None:
                    print(
                        f"unitlab: MLflow at {self.where} answers again after {self._away():.0f} s; "
                        f"sending the waiting writes in order",
                        file=sys.stderr,
                        flush=True,
                    )
                    self.away_since = None
                self._cond.notify_all()
