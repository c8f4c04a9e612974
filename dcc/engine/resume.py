"""What a run does with what its run directory already holds: ``trainer.resume`` = auto | true | restart.

* ``auto`` (default): a run directory with a checkpoint continues from it (``resuming <dir> from step N``);
  a finished run (``result.json``) is not trained again: its final metrics are reported and the job
  succeeds, so re-running a sweep re-runs only its unfinished jobs. Nothing there: start from step 0.
* ``true``: the same, and says ``no checkpoint in <dir>, starting from step 0`` when there is none.
* ``restart`` (``false`` is the same): the previous run directory is renamed to
  ``<dir>.replaced-<time>`` (never deleted; the message says where) and the run starts from step 0.

A requeued SLURM job always continues (``restart`` applies to the first start only).

One process at a time trains a run directory: :func:`hold` locks ``.<run dir name>.lock`` beside it, and a
second job of the same config (the same run directory: a sweep started twice, an Optuna trial that repeats a
running job) fails at start naming the process that holds it, instead of writing the same checkpoints.
The lock goes with the process (``flock``): a killed or preempted job leaves nothing to clean up.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from dcc.config import TrainerConfig
from dcc.engine import checkpoint as ckpt
from dcc.engine.preemption import requeued
from dcc.engine.metrics import percent

RESULT_FILE = "result.json"  # written when a run has finished and logged everything


def resume_mode(trainer: TrainerConfig) -> str:
    """``auto``, ``true`` or ``restart`` (``false`` -> ``restart``; a requeued job -> ``true``)."""
    mode = str(trainer.resume).lower()
    if requeued():
        return "true"
    return "restart" if mode == "false" else mode


def _checkpoints(run_dir: Path) -> list[Path]:
    """The checkpoints of a run: its own ``last.pt``, then a self-training teacher's."""
    return [p for p in (run_dir / "last.pt", run_dir / "teacher" / "last.pt") if p.exists()]


def restart_command(argv: list[str] | None = None) -> str:
    """The command that starts this run over: the same command with ``trainer.resume=restart``."""
    argv = list(sys.argv if argv is None else argv)
    if not argv or not argv[0].endswith("run.py"):
        return "the same command with trainer.resume=restart"
    keep = [a for a in argv[1:] if not a.startswith("trainer.resume=")]
    return shlex.join(["python", argv[0], *keep, "trainer.resume=restart"])


def damaged(path: Path, exc: BaseException) -> ckpt.CheckpointError:
    """The one-line error for a checkpoint that cannot be read, saying what to do about it."""
    run_dir = path.parent if path.parent.name != "teacher" else path.parent.parent
    reason = str(exc).removeprefix(f"cannot read checkpoint {path}: ").splitlines()[0].split(". ")[0][:160]
    return ckpt.CheckpointError(
        f"the checkpoint {path} is damaged and cannot be read ({reason}); to start this run over, keeping the "
        f"damaged run as {run_dir.name}.replaced-<time> beside it: {restart_command()}")


def _peek_step(path: Path) -> int | None:
    """The checkpoint's step, or None when the file cannot be read."""
    try:
        return ckpt.peek(path)["step"]
    except Exception:  # noqa: BLE001 - a damaged file: the caller says so
        return None


@dataclass
class Decision:
    action: str  # fresh | resume | finished | restart
    message: str | None = None  # what to print (None: nothing to say)
    result: dict[str, Any] | None = None  # finished: the stored final metrics
    step: int = 0  # resume: the checkpoint's step


def read_result(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / RESULT_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # a torn write: treat the run as unfinished (its checkpoint continues it)
        return None


def write_result(run_dir: Path, result: dict[str, Any]) -> None:
    tmp = run_dir / (RESULT_FILE + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(run_dir / RESULT_FILE)


def decide(run_dir: Path, mode: str) -> Decision:
    """Look at ``run_dir`` (read only) and say what to do; :func:`apply` acts on a ``restart``."""
    result = read_result(run_dir)
    found = _checkpoints(run_dir)
    if mode == "restart":  # whatever the directory holds (even unreadable files), it is moved aside whole
        if result is None and not found and not (run_dir.is_dir() and any(run_dir.iterdir())):
            return Decision("fresh")
        return Decision("restart")
    if result is not None:
        return Decision(
            "finished", result=result,
            message=(f"already finished: {run_dir} (final val mIoU {percent(result['final_miou']):.2f}%, best "
                     f"{percent(result['best_miou']):.2f}% after {result['steps']} steps"
                     + (f", MLflow run {result['mlflow_run_id']}" if result.get("mlflow_run_id") else "")
                     + "); not training it again "
                     "(trainer.resume=restart trains it from scratch)"),
        )
    if found:
        try:
            step = ckpt.peek(found[0])["step"]
        except Exception as exc:  # noqa: BLE001 - truncated or corrupt: say how to start over
            raise damaged(found[0], exc) from exc
        where = "" if found[0].parent == run_dir else " (self-training teacher)"
        return Decision("resume", step=step, message=f"resuming {run_dir} from step {step}{where}")
    if mode == "true":
        return Decision("fresh", message=f"no checkpoint in {run_dir}, starting from step 0")
    return Decision("fresh")


def set_aside(run_dir: Path) -> Path:
    """Rename ``run_dir`` to ``<run_dir>.replaced-<YYYYmmdd-HHMMSS>`` (a free name); returns the new path."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}-{n}")
    run_dir.rename(target)
    return target


def apply(run_dir: Path, decision: Decision) -> Decision:
    """Carry out a ``restart``: move the previous run aside and say where. Call on one process only."""
    if decision.action != "restart":
        return decision
    found = _checkpoints(run_dir)
    step = _peek_step(found[0]) if found else None
    if not found:
        what = "finished run" if read_result(run_dir) is not None else "run"
    else:
        what = f"checkpoint at step {step}" if step is not None else f"damaged checkpoint {found[0].name}"
    target = set_aside(run_dir)
    decision.message = (f"trainer.resume=restart: moved the previous run ({what}) to {target}; "
                        f"starting {run_dir} from step 0 (delete {target.name} when you no longer need it)")
    return decision


def continue_command(argv: list[str] | None = None) -> str:
    """The command that continues this run: the same command without ``trainer.resume=restart|false``."""
    argv = list(sys.argv if argv is None else argv)
    if not argv or not argv[0].endswith("run.py"):
        return "the same command (trainer.resume=auto, the default, continues it)"
    keep = [a for a in argv[1:] if not (a.startswith("trainer.resume=")
                                        and a.split("=", 1)[1].lower() in ("restart", "false"))]
    return shlex.join(["python", argv[0], *keep])


class RunDirBusy(Exception):
    """Another live process trains this run directory."""


def lock_path(run_dir: Path) -> Path:
    return run_dir.with_name(f".{run_dir.name}.lock")


@contextlib.contextmanager
def hold(run_dir: Path) -> Iterator[None]:
    """Hold the run directory's lock for the ``with`` block; :class:`RunDirBusy` when another process holds it."""
    path = lock_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise RunDirBusy(f"{run_dir} is being trained by {owner}; a second job of the same config would "
                             "write the same checkpoints: wait for it to end (it continues or finishes the run), or "
                             "change the config (e.g. trainer.seed, trainer.runs_root)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
