"""Checkpoint-then-exit on SIGTERM / SIGUSR1 / SIGUSR2 (SLURM preemption and time limits) and SIGINT (Ctrl-C).

The handler only records the signal; the training loop checkpoints at the next step boundary (a
consistent state) and then hands the signal on: to the previous handler when there is one
(submitit's, which requeues the job), else it exits with 128 + the signal number. A requeued job, or
the same command run again, resumes from that checkpoint. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any, Callable

# SIGUSR2: submitit's default time-limit signal; SIGINT: Ctrl-C, treated like SIGTERM
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)


def requeued() -> bool:
    """True in a SLURM job that was requeued (after preemption or a time limit)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


class PreemptionGuard:
    def __init__(self) -> None:
        self.signum: int | None = None
        self.frame: FrameType | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: do not wait for the step boundary
        self.signum, self.frame = signum, frame

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def hand_on(self) -> None:
        """Call the handler that was installed before ours, or exit with 128 + signal number."""
        signum = self.signum
        assert signum is not None
        previous: Callable | int | None = self._previous.get(signum)
        self.__exit__()
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, self.frame)
        raise SystemExit(128 + signum)
