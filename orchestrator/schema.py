"""The orchestrator's errors (a spec or a command that cannot run, said in one line, exit code 2) and the
checks of its output paths."""
from __future__ import annotations

import os
from pathlib import Path

from trainables.schema import InputError, output_folder


class SweepError(InputError):
    """A sweep spec or command is invalid; the message starts with the field, e.g. ``sweep.axes.heads:``."""


class CommitteeError(InputError):
    """A committee command cannot run (unknown experiment, bad runs, a member that does not load)."""


def output_dir(text: str, flag: str = "--out") -> Path:
    """``text`` as a folder that can be created or written (``output_folder``); an empty string is
    refused rather than read as the current folder."""
    if not str(text).strip():
        raise InputError(flag, "empty path; give a folder")
    return output_folder(text, flag)


def output_file(text: str, flag: str = "--out") -> Path:
    """``text`` as a file that can be written: not empty, not a folder, in a folder that can be
    created or written, not a read-only file."""
    if not str(text).strip():
        raise InputError(flag, "empty path; give a file")
    path = Path(text)
    if path.is_dir():
        raise InputError(flag, f"{path} is a folder; give a file")
    output_folder(path.parent, flag)
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(flag, f"{path} cannot be written (read-only file)")
    return path
