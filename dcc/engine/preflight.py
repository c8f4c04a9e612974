"""Checks made before a run directory or an MLflow run exists, each failing with one message naming the culprit.

:func:`check` covers what can be checked without loading data: every interpolation of the config resolves
(an experiment preset's ``${oc.env:DCC_RESNET50_WEIGHTS}``), the weights file exists, the MLflow store is
reachable (an HTTP server answers within a few seconds) and the run directory can be written. The dataset
layout is checked by building the data, which ``dcc.engine.job`` does before creating anything.
"""

from __future__ import annotations

import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

HTTP_TIMEOUT_S = 5.0


class PreflightError(RuntimeError):
    """Something a run needs is missing or unreachable; the message names the key, file or URI."""


def check_resolves(cfg: Any) -> None:
    """Every ``${...}`` of the config resolves (environment variables of the experiment presets, ...)."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except (InterpolationResolutionError, MissingMandatoryValue) as exc:
        key = getattr(exc, "full_key", None) or "?"
        msg = str(getattr(exc, "msg", exc)).splitlines()[0]
        env = re.search(r"Environment variable '([^']+)' not found", msg)
        if env:
            msg = (f"environment variable {env[1]} is not set (the config reads {key} from it): export it, "
                   f"or set {key}=... on the command line")
        raise PreflightError(f"{key}: {msg}") from exc


def check_weights(cfg: Any) -> None:
    weights = cfg.backbone.weights
    if weights and not Path(str(weights)).expanduser().is_file():
        raise PreflightError(f"backbone.weights: no such file {weights}")


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: Path, what: str) -> None:
    """``path`` (or, when it does not exist yet, its nearest existing ancestor) is a writable directory."""
    base = _nearest_existing(path)
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise PreflightError(f"{what}: cannot write {path} ({base} is not a writable directory)")


DATABASE_SCHEMES = ("postgresql", "mysql", "mssql", "databricks")  # MLflow stores passed on as they are


def check_tracking(uri: str, source: str) -> None:
    """The MLflow store at ``uri`` can be used: an HTTP server answers within :data:`HTTP_TIMEOUT_S`; a SQLite
    store's directory exists and is writable and the store is not left half-migrated with runs in it; anything
    else (a typo in the scheme, MLflow's deprecated file store) is refused naming what works. ``source`` names
    where the URI came from (for the message)."""
    from dcc.engine.tracking import _half_created, sqlite_path

    scheme = urllib.parse.urlparse(uri).scheme.split("+", 1)[0].lower()
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=HTTP_TIMEOUT_S):
                pass
        except urllib.error.HTTPError:
            pass  # it answered (a proxy, an older server without /health): reachable
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise PreflightError(
                f"{source}={uri}: cannot reach the MLflow tracking server ({reason}; {HTTP_TIMEOUT_S:.0f} s timeout). "
                "Start it (mlflow server ...), point to a reachable one, or use logger=none"
            ) from exc
    elif (path := sqlite_path(uri)) is not None:
        if not path.parent.is_dir():
            raise PreflightError(f"{source}={uri}: the directory {path.parent} does not exist (MLflow would create "
                                 f"it silently); create it (mkdir -p {path.parent}) or fix the path")
        check_writable(path.parent, f"{source}={uri}")
        found = _half_created(path)
        if found is not None and found[1]:
            raise PreflightError(
                f"{source}={uri}: the store was left half-migrated (table {found[0][0]} of an interrupted schema "
                f"upgrade) and holds {found[1]} runs: back it up, then run `mlflow db upgrade {uri}`, or log elsewhere")
    elif scheme in DATABASE_SCHEMES:
        return
    elif scheme in ("", "file") or (len(scheme) == 1 and uri[1:2] == ":"):
        where = urllib.parse.urlparse(uri).path if scheme == "file" else uri
        raise PreflightError(
            f"{source}={uri}: a directory is MLflow's deprecated file store; use a SQLite store in it: "
            f"sqlite:///{Path(where).expanduser().resolve() / 'mlflow.db'}")
    else:
        raise PreflightError(
            f"{source}={uri}: unknown scheme {scheme + '://'!r}; use http(s)://host:port (a tracking server), "
            f"sqlite:///path/mlflow.db, or one of {', '.join(s + '://' for s in DATABASE_SCHEMES)}")


def tracking_source(cfg: Any, launch_dir: Path) -> tuple[str, str] | None:
    """``(uri, where it was set)`` of the MLflow store a run would log to, or None with ``logger=none``."""
    from dcc.engine.tracking import default_tracking_uri, logging_off

    if logging_off(cfg.logger):
        return None
    if cfg.logger.tracking_uri:
        return str(cfg.logger.tracking_uri), "logger.tracking_uri"
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"], "MLFLOW_TRACKING_URI"
    return default_tracking_uri(launch_dir), "the default store"


def check_device(cfg: Any) -> None:
    """``trainer.device`` names a device this machine has (a CUDA device asked for on a machine without one)."""
    import torch

    name = str(cfg.trainer.device)
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise PreflightError(f"trainer.device={name}: no CUDA device is visible on this machine; use "
                                 "trainer.device=cpu (or auto), or run on a GPU node (hydra/launcher=slurm)")
        index = int(name.split(":", 1)[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise PreflightError(f"trainer.device={name}: this machine has {torch.cuda.device_count()} CUDA devices")


def check(cfg: Any, launch_dir: Path, run_dir: Path | None = None) -> None:
    """Everything a training run needs that can be checked before data is loaded."""
    check_resolves(cfg)
    check_device(cfg)
    check_weights(cfg)
    found = tracking_source(cfg, launch_dir)
    if found is not None:
        check_tracking(*found)
    if run_dir is not None:
        check_writable(run_dir, "trainer.runs_root")
