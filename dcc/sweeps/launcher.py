"""The steps behind the launchers of ``hydra/launcher=slurm`` and ``hydra/launcher=local`` (hydra-submitit-launcher, extended).

``SlurmLauncher``: submitit checkpoints and requeues a job on its preemption signal (``USR2`` by
default, ``$SUBMITIT_PREEMPT_SIGNAL`` to change it; SLURM sends it ``signal_delay_s`` seconds before
the time limit) but ignores ``SIGTERM``, which is what many clusters send on preemption (and what
``scancel --signal=TERM`` sends). Here ``SIGTERM`` does the same as the preemption signal: the job is
requeued (``scontrol requeue``, the same job id, ``SLURM_RESTART_COUNT`` + 1) and exits; the requeued
job runs the same config, so it finds its run directory and checkpoint and continues the same MLflow
run. A job being cancelled (``scancel``: slurmctld shows it COMPLETING when the SIGTERM arrives) is
not requeued: it exits.

``LocalLauncher``: several jobs at once on this machine (submitit's local executor). With
``visible_gpus`` the jobs take turns over those GPUs (job i gets ``gpus_per_node`` of them starting at
``i * gpus_per_node``); with ``cpus_per_task`` each job's torch/OpenMP threads are limited to it. With
``max_parallel: N`` the jobs of a batch run as a pool: at most N at a time, the next one starting as soon
as any finishes (Hydra's own batches, ``hydra.sweeper.max_batch_size``, wait for their slowest job, which
leaves cores idle when jobs differ in length).
The launcher classes themselves are the shims in hydra_plugins/dcc_plugins/launcher.py (Hydra instantiates
launchers only from there).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

log = logging.getLogger(__name__)


def job_state(job_id: str) -> str | None:
    """The job's state as slurmctld sees it (RUNNING, COMPLETING, ...), or None when it cannot be asked."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.split()
    return lines[0] if out.returncode == 0 and lines else None


def requeue_handler(requeue: Callable[[int, Any], Any], job_id: str, usr: int,
                    state: Callable[[str], str | None] = job_state) -> Callable[[int, Any], None]:
    """A handler for SIGTERM and the preemption signal ``usr`` that calls submitit's ``requeue``
    handler, except on a SIGTERM while the job is not RUNNING (being cancelled, or killed at its time
    limit), where it exits."""

    def on_signal(signum: int, frame: Any) -> None:
        # The requeue itself ends this job with SIGTERM: ignore any further signal while exiting.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(usr, signal.SIG_IGN)
        if signum == signal.SIGTERM:
            now = state(job_id)
            if now not in (None, "RUNNING"):
                log.warning("SIGTERM while job %s is %s: exiting without requeue", job_id, now)
                raise SystemExit(128 + signum)
        requeue(signum, frame)

    return on_signal


def requeue_on_sigterm() -> None:
    """In a SLURM job started by submitit: SIGTERM requeues the job like submitit's preemption signal."""
    import submitit

    usr = submitit.JobEnvironment._usr_sig()
    requeue = signal.getsignal(usr)
    if not callable(requeue):  # not under submitit's job runner (nothing to requeue with)
        return
    handler = requeue_handler(requeue, submitit.JobEnvironment().job_id, usr)
    signal.signal(signal.SIGTERM, handler)
    signal.signal(usr, handler)


def gpu_pool(params: dict[str, Any]) -> list[int]:
    """``visible_gpus`` taken out of the launcher's parameters (submitit does not know it)."""
    return [int(g) for g in (params.pop("visible_gpus", None) or [])]


def prepare_local_job(params: dict[str, Any], pool: list[int], job_num: int) -> None:
    """Before local job ``job_num`` starts: its GPUs (``gpus_per_node`` of ``pool``, in turn) and its thread cap."""
    n = int(params.get("gpus_per_node") or 0)
    if pool and n:
        first = (job_num * n) % len(pool)
        gpus = [pool[(first + k) % len(pool)] for k in range(n)]
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
    cpus = params.get("cpus_per_task")
    if cpus:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, str(cpus))


def max_parallel(params: dict[str, Any]) -> int | None:
    """``max_parallel`` taken out of the launcher's parameters (submitit does not know it), validated."""
    value = params.pop("max_parallel", None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"hydra.launcher.max_parallel={value!r}: a positive number of jobs, or null (the whole batch at once)")
    if params.get("visible_gpus"):
        raise ValueError("hydra.launcher.max_parallel with hydra.launcher.visible_gpus: not supported (GPUs are handed "
                         "out by job number, not by free slot); bound the batch with hydra.sweeper.max_batch_size")
    return value


def launch_pooled(launch: Callable[[Sequence[Sequence[str]], int], list[Any]], job_overrides: Sequence[Sequence[str]],
                  initial_job_idx: int, limit: int | None) -> list[Any]:
    """``launch`` (a launcher's batch launch) one job at a time, at most ``limit`` jobs running at once.

    Each job keeps its number (``initial_job_idx + i``, which names its sweep subdirectory), and the results
    come back in the jobs' order. When a job fails the others still run; the
    first failure (in job order) is raised once all have ended.
    """
    if not limit or limit >= len(job_overrides):
        return launch(job_overrides, initial_job_idx)
    with ThreadPoolExecutor(max_workers=limit) as pool:
        futures = [pool.submit(launch, [overrides], initial_job_idx + i) for i, overrides in enumerate(job_overrides)]
    return [ret for future in futures for ret in future.result()]
