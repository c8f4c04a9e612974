"""Project errors reach the user as one message naming the culprit, without a traceback.

``run.py`` calls its job through :func:`one_message`. An error of the project (a rejected config, a missing
dataset file, unreadable weights, an unreachable tracking store, ...) is printed as ``error: <message>``
and the process exits with status 1; in a sweep (``-m``) it is re-raised as a Hydra "compact" error, so
the sweeper records the job as failed and Hydra prints the message alone. ``HYDRA_FULL_ERROR=1`` shows
the full traceback instead. Ctrl-C outside the training loop exits with status 130, quietly.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

from hydra.errors import CompactHydraException


class JobError(CompactHydraException):
    """A project error of one job of a sweep (Hydra prints its message without a traceback)."""


def project_errors() -> tuple[type[BaseException], ...]:
    """The exception types whose message is the whole story (they name the key, file or URI)."""
    from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

    from dcc.engine.checkpoint import CheckpointError
    from dcc.distributed import RankError
    from dcc.config import ConfigError
    from dcc.data.files import DataError
    from dcc.method.models.weights import WeightsError
    from dcc.engine.preflight import PreflightError
    from dcc.engine.trainer import NonFiniteLossError
    from dcc.engine.tracking import StoreError, TrackingLost

    return (ConfigError, DataError, WeightsError, PreflightError, NonFiniteLossError, CheckpointError, RankError,
            StoreError, TrackingLost,
            InterpolationResolutionError, MissingMandatoryValue, FileNotFoundError)


def _multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode is RunMode.MULTIRUN
    except Exception:  # noqa: BLE001 - not under Hydra
        return False


def one_message(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, with project errors turned into one message (see the module's docstring)."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        return fn(*args)
    errors = project_errors()
    try:
        return fn(*args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except errors as exc:
        message = str(exc).strip() or type(exc).__name__
        if _multirun():
            raise JobError(message) from exc
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def stop_sweep(message: str) -> None:
    """End a sweep at its start with one message (``error: ...``, exit status 1). For Hydra callbacks, whose
    exceptions Hydra turns into warnings and goes on: ``SystemExit`` is not an ``Exception``, so it ends the sweep."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise JobError(message)
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(1)
