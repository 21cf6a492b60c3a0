"""The orchestrator's errors: a spec or a command that cannot run, said in one line (exit code 2)."""

from __future__ import annotations

from trainables.schema import InputError


class SweepError(InputError):
    """A sweep spec or command is invalid; the message starts with the field, e.g. ``sweep.axes.heads:``."""


class CommitteeError(InputError):
    """A committee command cannot run (unknown experiment, bad runs, a member that does not load)."""
