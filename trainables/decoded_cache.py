"""Where decoded image arrays are kept, and the error every data reader raises.

Images are decoded once and saved as ``.npy`` in ``cache_dir()``, so every trial on a node
memory-maps the same array instead of decoding the files again.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from trainables.schema import InputError


class DataError(InputError):
    """Bad data configuration or an unreadable data file; the message names the field or file."""


def cache_dir() -> Path:
    """Folder for decoded arrays (UNITLAB_CACHE, else ~/.cache/unitlab)."""
    path = Path(os.environ.get("UNITLAB_CACHE", Path.home() / ".cache" / "unitlab"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_save(path: Path, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` whole or not at all (other trials may read it meanwhile)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        np.save(handle, array)
    os.replace(tmp, path)
