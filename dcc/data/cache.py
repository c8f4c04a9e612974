"""Reading a cache file that may be damaged (a write killed half-way, a full disk): name it, drop it, rebuild."""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def read_npz(path: str | Path) -> dict[str, np.ndarray] | None:
    """Every array of the ``.npz`` at ``path``, or None when it does not exist or cannot be read whole; a
    damaged file is deleted (with a warning naming it) so that the caller regenerates and rewrites it."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        with np.load(path) as data:
            return {name: data[name] for name in data.files}  # read every member: a truncated one fails here
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as exc:
        log.warning("cache file %s is damaged (%s: %s): deleting and regenerating it", path, type(exc).__name__, exc)
        print(f"cache file {path} is damaged ({type(exc).__name__}); regenerating it", flush=True)
        path.unlink(missing_ok=True)
        return None
