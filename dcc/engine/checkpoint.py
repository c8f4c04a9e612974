"""Atomic checkpoints: written to a temporary file in the same directory, then renamed over the old one.

A write killed half-way (``kill -9``, a node failure) leaves ``last.pt.<random>.tmp`` beside an intact
``last.pt``; :func:`remove_stale_tmp` deletes such files at the next start.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit; names the file."""


def save_atomic(state: dict[str, Any], path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch's writer reports a full disk as "unexpected pos ..."
        written = Path(tmp).stat().st_size if Path(tmp).exists() else 0
        error = _write_error(path, exc, written)  # the free space as the write met it, before the cleanup
        Path(tmp).unlink(missing_ok=True)
        raise error from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_error(path: Path, exc: BaseException, written: int) -> CheckpointError:
    """One line for a failed checkpoint write: a full disk said in words, with the free space and the directory."""
    free = shutil.disk_usage(path.parent).free
    full = getattr(exc, "errno", None) == errno.ENOSPC or "No space" in str(exc) or free < max(2 * written, 64 << 20)
    why = "no space left on the device" if full else str(exc).strip().splitlines()[0][:200]
    kept = (f"the previous checkpoint {path} is intact; free some space, then re-run the same command to continue "
            "from it") if path.exists() else "no earlier checkpoint exists; free some space, then re-run the same command"
    return CheckpointError(f"cannot write the checkpoint {path}: {why} ({free / 2**20:.0f} MiB free in {path.parent} "
                           f"after {written / 2**20:.0f} MiB were written); {kept}")


def load(path: str | os.PathLike) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - re-raised naming the file
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc


def peek(path: str | os.PathLike) -> dict[str, Any]:
    """``step``, ``finished`` and ``best_miou`` of a checkpoint without reading its tensors (memory-mapped)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # noqa: BLE001 - an old (non-zip) file: read it whole
        state = load(path)
    return {"step": int(state.get("step", 0)), "finished": bool(state.get("finished", False)),
            "best_miou": state.get("best_miou")}


def remove_stale_tmp(path: str | os.PathLike) -> list[Path]:
    """Delete ``<path>.*.tmp`` left by a write that was killed (the checkpoint itself is intact); returns them."""
    path = Path(path)
    stale = sorted(path.parent.glob(path.name + ".*.tmp")) if path.parent.is_dir() else []
    for tmp in stale:
        tmp.unlink(missing_ok=True)
        log.warning("removed %s, left by a checkpoint write that was interrupted", tmp)
    return stale


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
