"""The sweep layer's error: a spec or a command that cannot run, said in one line."""
from __future__ import annotations

from trainables.schema import InputError


class SweepError(InputError):
    """A sweep spec or command is invalid; the message starts with the field, e.g. ``sweep.axes.heads:``."""
