"""How a job of an Optuna trial and the sweeper talk: two kinds of small files in the trial's directory.

The sweeper process is the only writer of the study's storage. A job never opens it: it writes what it has
measured to a file of its trial directory, and the sweeper (polling) reports it to the study, asks the pruner
and, when the trial is pruned, writes a stop file that the job checks after every step.

* ``<trial dir>/replicate-<r>.json`` (written by replicate ``r``'s job, atomically, at every evaluation and when
  it stops): ``{"history": [[step, val mIoU], ...], "step": last step trained, "max_steps": M, "pruned": bool}``.
* ``<trial dir>/PRUNE`` (written by the sweeper): the study pruned the trial; its jobs write a checkpoint and
  end cleanly (:class:`TrialPruned`, turned by :mod:`dcc.engine.job` into a normal return).

A job learns its trial directory and replicate from the environment (:data:`DIR_ENV`, :data:`REPLICATE_ENV`),
which the sweeper sets per job through ``hydra.job.env_set`` (so it reaches local and SLURM jobs alike and stays
out of the job's config, its run directory and its MLflow params). Plain files on the filesystem the jobs share
with the sweeper: no database, no lock, one writer per file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

DIR_ENV = "DCC_TRIAL_DIR"
REPLICATE_ENV = "DCC_TRIAL_REPLICATE"
STOP_FILE = "PRUNE"


class TrialPruned(Exception):
    """Raised in a job whose trial the study pruned, after its checkpoint is written (not an error)."""

    def __init__(self, step: int, value: float, stopped: int | None = None) -> None:
        stopped = step if stopped is None else stopped
        super().__init__(f"pruned by the Optuna study at step {step} (stopped at step {stopped})")
        self.step, self.value, self.stopped = step, value, stopped


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


class TrialLink:
    """The job's side: :meth:`report` its evaluations, :meth:`stop_requested` after each step."""

    def __init__(self, trial_dir: str | os.PathLike, replicate: str = "0") -> None:
        self.dir, self.replicate = Path(trial_dir), str(replicate)
        self.file = self.dir / f"replicate-{self.replicate}.json"
        self._stop = self.dir / STOP_FILE

    @classmethod
    def from_env(cls) -> "TrialLink | None":
        """The link of this job, or None outside an Optuna trial."""
        d = os.environ.get(DIR_ENV)
        return cls(d, os.environ.get(REPLICATE_ENV, "0")) if d else None

    def report(self, step: int, history: Sequence[Sequence[float]], max_steps: int, pruned: bool = False) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        _write_json(self.file, {"history": [[int(s), float(v)] for s, v in history], "step": int(step),
                                "max_steps": int(max_steps), "pruned": bool(pruned)})

    def stop_requested(self) -> bool:
        return self._stop.exists()

    def pruned_at(self, default: int) -> int:
        """The step whose value made the study prune the trial (from the stop file)."""
        try:
            return int(json.loads(self._stop.read_text())["pruned_at_step"])
        except (OSError, ValueError, KeyError, TypeError):
            return default


# ------------------------------------------------------------------------------------------ the sweeper's side
def read_reports(trial_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """``{replicate: report}`` of every job of the trial that has reported (a torn or missing file: left out)."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(Path(trial_dir).glob("replicate-*.json")):
        try:
            out[path.stem.split("-", 1)[1]] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return out


def request_stop(trial_dir: str | os.PathLike, step: int) -> None:
    d = Path(trial_dir)
    d.mkdir(parents=True, exist_ok=True)
    _write_json(d / STOP_FILE, {"pruned_at_step": int(step)})
