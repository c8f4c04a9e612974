"""MLflow tracking of one job: params (the flattened config), tags, metrics and artifacts.

Uses ``MlflowClient`` with explicit run ids, so that several jobs of one process (a Hydra multirun)
and a resumed job never depend on a global "active run".
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from dcc.config import LoggerConfig, LoggerName, choice
from dcc.locks import file_lock

log = logging.getLogger(__name__)

# Set by a sweep's launcher callback to the MLflow run id that groups the sweep's jobs.
PARENT_RUN_ENV = "DCC_MLFLOW_PARENT_RUN"
# Set by the same callback to the comma-separated override keys the sweep varies (they go into run names).
SWEPT_KEYS_ENV = "DCC_SWEPT_KEYS"

# Tags: the sweep callback puts the first three on a sweep's parent run, MLflow groups child runs by the last;
# the report finds sweeps and their jobs by them.
SWEEP_TAG = "dcc.sweep"
SWEEP_NAME_TAG = "dcc.sweep_name"
SWEEP_KEY_TAG = "dcc.sweep_key"
PARENT_TAG = "mlflow.parentRunId"
# MLflow 3's UI opens an experiment on the view of its kind: the training kind shows the runs table (not the
# GenAI overview); the note tag is a run's description, rendered as Markdown.
EXPERIMENT_KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
UI_TRAINING_VIEW = "workflowType=machine_learning"  # the URL query that opens MLflow 3's UI on runs, not GenAI
NOTE_TAG = "mlflow.note.content"
# Shares (mIoU, IoU, pixel accuracy) are logged in % on every run that carries this tag; runs of a store written
# before it (2026-12-06) logged fractions of 1 and have no such tag: the reports read them as fractions.
UNIT_TAG, PERCENT = "dcc.unit", "percent"


class StoreError(RuntimeError):
    """An MLflow store that cannot be used as it is; the message names it and says what to do."""


class TrackingLost(RuntimeError):
    """The MLflow store stopped answering during a run (after MLflow's own retries)."""


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else None."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def _half_created(path: Path) -> tuple[list[str], int] | None:
    """``(leftover tables, number of runs)`` when the SQLite store at ``path`` holds the temporary tables of an
    interrupted schema creation or migration (``_alembic_tmp_*``), else None."""
    import sqlite3

    if not path.is_file() or path.stat().st_size == 0:
        return None
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        leftovers = [t for t in tables if t.startswith("_alembic_tmp_")]
        if not leftovers:
            return None
        runs = db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] if "runs" in tables else 0
    return leftovers, int(runs)


def _repair(path: Path) -> None:
    """A store left half-created (Ctrl-C in the first second of a first run) that holds no run is moved aside
    (kept, never deleted) so that a new one is created; one that holds runs is named, with what to do."""
    found = _half_created(path)
    if found is None:
        return
    leftovers, runs = found
    if runs:
        raise StoreError(
            f"the MLflow store {path} was left half-migrated (table {leftovers[0]} of an interrupted schema "
            f"upgrade) and holds {runs} runs: back it up, then run `mlflow db upgrade sqlite:///{path}`, or "
            "log elsewhere (logger.tracking_uri=...)")
    aside = path.with_name(f"{path.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}")
    path.rename(aside)
    log.warning("the MLflow store %s was left half-created by an interrupted first run (no runs in it): moved "
                "it to %s and creating a new one", path, aside)


def open_client(uri: str) -> Any:
    """An ``MlflowClient`` on ``uri``. A local SQLite store is created (or its schema upgraded) by one process at a
    time, under a lock file beside it (``mlflow.lock``): parallel jobs, two sweeps started together and a sweep's
    parent run all race otherwise (``duplicate column name``). A store left half-created is repaired first."""
    from mlflow.tracking import MlflowClient

    path = sqlite_path(uri)
    if path is None:
        return MlflowClient(tracking_uri=uri)
    with file_lock(path.with_suffix(".lock")):
        _repair(path)
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)  # creates or upgrades the schema now, under the lock
    return client


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a/b": 1}``; lists are kept as values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "/"))
        else:
            out[name] = value
    return out


def default_tracking_uri(launch_dir: Path | None = None) -> str:
    """``$MLFLOW_TRACKING_URI``, else ``mlflow.db`` in the launch directory (default: the current directory)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{((launch_dir or Path()) / 'mlflow.db').resolve()}"


def tracking_uri(logger: LoggerConfig, launch_dir: Path | None = None) -> str:
    """The MLflow store of the ``logger`` group: ``logger.tracking_uri``, else :func:`default_tracking_uri`."""
    return logger.tracking_uri or default_tracking_uri(launch_dir)


def logging_off(logger: LoggerConfig) -> bool:
    """``logger=none``."""
    return choice(logger.name, LoggerName) is LoggerName.none


def experiment_id(client: Any, name: str) -> str:
    """The id of MLflow experiment ``name``, created when missing (another job may create it at the same time)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.tags.get(EXPERIMENT_KIND_TAG) != TRAINING_KIND:  # made elsewhere, or before the kind was set
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
        return exp.experiment_id
    try:
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: TRAINING_KIND})
    except Exception:  # noqa: BLE001 - another job created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def git_commit(cwd: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class NullTracker:
    """``logger=none``: logs nothing."""

    run_id: str | None = None

    def start(self, **_: Any) -> None:
        return None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def describe_result(self, text: str) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass

    def describe(self) -> str:
        return "MLflow logging is off (logger=none)"


class MLflowTracker:
    def __init__(self, tracking_uri: str, experiment: str) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.client = open_client(tracking_uri)

    def start(
        self, *, run_id: str | None, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str],
        config_yaml: str,
    ) -> str:
        """Resume ``run_id`` when given (and present), else create a run and log params, tags and the config."""
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        self.experiment_id = experiment_id(self.client, self.experiment)
        parent = os.environ.get(PARENT_RUN_ENV)
        if run_id is not None:
            try:
                self.client.update_run(run_id, status="RUNNING")
                self.client.set_tag(run_id, UNIT_TAG, PERCENT)  # its final metrics are logged in % from now on
                if parent:  # continued by a re-run sweep: it joins that sweep's group
                    self.client.set_tag(run_id, PARENT_TAG, parent)
                self.run_id = run_id
                return run_id
            except Exception as exc:  # noqa: BLE001
                log.warning("cannot resume MLflow run %s (%s): starting a new run", run_id, exc)
        tags = dict(tags) | {UNIT_TAG: PERCENT}
        if parent:  # a sweep's parent run (created by the multirun callback): the UI groups the jobs under it
            tags[PARENT_TAG] = parent
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        items = [Param(k, str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + MAX_PARAMS_TAGS_PER_BATCH])
        self.client.log_text(self.run_id, config_yaml, "config.yaml")
        return self.run_id

    lost: bool = False  # the store stopped answering: nothing more is sent to it

    @contextlib.contextmanager
    def _call(self, what: str) -> Iterator[None]:
        """A call to the store; its failure (MLflow has retried already) becomes :class:`TrackingLost`."""
        if self.lost:
            raise TrackingLost(f"the MLflow store {self.tracking_uri} is not answering")
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - whatever the client raised: HTTP, database, timeout
            self.lost = True
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise TrackingLost(f"lost the MLflow store {self.tracking_uri} while logging {what} ({reason})") from exc

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        with self._call(f"the metrics of step {step}"):
            for i in range(0, len(items), 1000):
                self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        with self._call(f"the artifact {Path(path).name}"):
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def describe_result(self, text: str) -> None:
        """The run's description in the UI (Markdown): its result at a glance."""
        with self._call("the run's description"):
            self.client.set_tag(self.run_id, NOTE_TAG, text)

    def finish(self, status: str = "FINISHED") -> None:
        if self.run_id is not None and not self.lost:  # a store that is gone is not called again
            self.client.set_terminated(self.run_id, status=status)

    def describe(self) -> str:
        uri = self.tracking_uri
        # MLflow 3's UI opens an experiment in its GenAI view unless the link asks for the training one (its
        # experimentKind tag is not enough in 3.17, checked in headless Chromium); the run page then sits under Runs
        page = f"#/experiments/{self.experiment_id}/runs/{self.run_id}?{UI_TRAINING_VIEW}"
        url = f"http://127.0.0.1:5000/{page}"
        if uri.startswith(("http://", "https://")):
            return f"MLflow run {self.run_id}: {uri.rstrip('/')}/{page}"
        return f"MLflow run {self.run_id}\nOpen it with: mlflow ui --backend-store-uri {uri}   then {url}"


def make_tracker(cfg: Any, launch_dir: Path) -> NullTracker | MLflowTracker:
    if logging_off(cfg.logger):
        return NullTracker()
    return MLflowTracker(tracking_uri(cfg.logger, launch_dir), cfg.logger.experiment)
