"""A Hydra callback that makes each sweep one MLflow parent run, its jobs the child runs.

Registered by ``conf/hydra/callbacks/mlflow_parent.yaml``. At multirun start it creates the parent run
(tagged ``dcc.sweep=true``, named after ``hydra.job.name``: the sweeps/ scripts set it to the sweep's
name) and exports its id in ``DCC_MLFLOW_PARENT_RUN`` (:data:`dcc.engine.tracking.PARENT_RUN_ENV`); every job
started from this process, in-process, by submitit locally or through ``sbatch`` (which exports the
environment), tags its run with ``mlflow.parentRunId``, so the MLflow UI shows the sweep as one group.
At multirun end it prints the sweep's tables (:mod:`dcc.report`: per cell n, mean, std and 95% interval, and
the paired differences of every arm from SupOnly), logs them, their numbers (as metrics) and the Optuna
results to the parent and closes the parent; if the sweep
dies, the parent is closed as FAILED at exit. It also exports the keys the sweep varies
(``DCC_SWEPT_KEYS``), which the jobs put in their run names, and fails the sweep at once, in one
message, when the MLflow store cannot be reached.

An Optuna search with a persistent study (``hydra.sweeper.storage`` and ``study_name`` set) reuses the
parent run of that study, so a continued search stays one group.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from dcc.engine.tracking import (PERCENT, UNIT_TAG, open_client, PARENT_RUN_ENV, PARENT_TAG, SWEEP_KEY_TAG, SWEEP_NAME_TAG, SWEEP_TAG, SWEPT_KEYS_ENV,
                          default_tracking_uri, experiment_id)

log = logging.getLogger(__name__)
# the parent run's description is the report; it, its metrics and its jobs' are all in % (tag dcc.unit)
UNITS_NOTE = ("\n\nUnits: mIoU in % everywhere: the tables, this run's metrics and its jobs' (val/miou, "
              "test/miou, test/mean_miou/..., test/diff_vs_... in points).")

DEFAULT_JOB_NAME = "run"  # hydra.job.name of run.py when not overridden


def _get(cfg: DictConfig, key: str, default: Any = None) -> Any:
    try:
        value = OmegaConf.select(cfg, key, default=default, throw_on_missing=False)
    except Exception:  # noqa: BLE001 - an interpolation that cannot resolve here
        return default
    return default if value is None else value


def swept_keys(cfg: DictConfig) -> list[str]:
    """Override keys the sweep varies: command-line sweeps (``a,b``, ``range(...)``, ...) and the sweeper's params."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys: list[str] = []
    try:
        for o in OverridesParser.create().parse_overrides([str(x) for x in _get(cfg, "hydra.overrides.task", []) or []]):
            if o.is_sweep_override():
                keys.append(o.get_key_element().lstrip("+~"))
    except Exception as exc:  # noqa: BLE001 - names only
        log.debug("cannot parse the sweep's overrides (%s)", exc)
    keys += [str(k) for k in (_get(cfg, "hydra.sweeper.params", {}) or {})]
    return list(dict.fromkeys(keys))


def sweep_key(cfg: DictConfig) -> str | None:
    """A persistent Optuna study is one group in MLflow however many times its command is run."""
    storage, study = _get(cfg, "hydra.sweeper.storage"), _get(cfg, "hydra.sweeper.study_name")
    if storage and study:
        return f"optuna:{study}@{storage}"
    return None


def slurm_problem() -> str | None:
    """Why SLURM jobs cannot be submitted from here (no ``sbatch``, no controller answering), or None."""
    import shutil
    import subprocess

    if shutil.which("sbatch") is None:
        return ("no sbatch on this machine: run the sweep on a SLURM login node, or start the one-node cluster "
                "(bash scripts/local_slurm.sh start) and export the SLURM_CONF it prints")
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"the SLURM controller does not answer (scontrol ping: {exc})"
    if ping.returncode != 0 or "DOWN" in ping.stdout:
        said = (ping.stdout + ping.stderr).strip().splitlines()
        return (f"the SLURM controller does not answer (scontrol ping: {said[-1] if said else ping.returncode}); "
                "check SLURM_CONF, or start the local cluster (bash scripts/local_slurm.sh start)")
    return None


class MLflowSweepParent(Callback):
    def __init__(self, report: bool = True) -> None:
        self.report = report
        self.client: Any = None
        self.run_id: str | None = None
        self.sweep_dir: Path | None = None
        self._previous_env: str | None = None
        self._previous_keys: str | None = None
        self._open = False
        self.key: str | None = None

    # ----------------------------------------------------------------------------------------------
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from dcc.engine.errors import stop_sweep
        from dcc.sweeps.launcher import max_parallel

        try:  # the launcher's own keys, checked before anything is written (Hydra builds the launcher later)
            gpus = _get(config, "hydra.launcher.visible_gpus")
            max_parallel({"max_parallel": _get(config, "hydra.launcher.max_parallel"),
                          "visible_gpus": list(gpus) if gpus is not None else None})
        except ValueError as exc:
            stop_sweep(str(exc))
        if str(_get(config, "hydra.launcher._target_", "")).endswith("SlurmLauncher"):
            problem = slurm_problem()
            if problem:
                stop_sweep(f"hydra/launcher=slurm: {problem}")
        try:  # the Optuna sweeper's pruner, replicates and launcher, likewise
            from dcc.sweeps.optuna_sweeper import check_hydra_config

            check_hydra_config(config)
        except ValueError as exc:
            stop_sweep(str(exc))
        self._previous_keys = os.environ.get(SWEPT_KEYS_ENV)
        os.environ[SWEPT_KEYS_ENV] = ",".join(swept_keys(config))  # the jobs name their runs after these values
        if str(_get(config, "logger.name", "mlflow")) == "none":
            return
        from dcc.engine.preflight import PreflightError, check_tracking

        cwd = Path(_get(config, "hydra.runtime.cwd", os.getcwd()))
        uri = _get(config, "logger.tracking_uri") or default_tracking_uri(cwd)
        try:  # an unreachable store fails the sweep at once, in one message (not every job after minutes of retries)
            check_tracking(uri, "logger.tracking_uri" if _get(config, "logger.tracking_uri") else "MLflow store")
        except PreflightError as exc:
            stop_sweep(str(exc))
        try:
            self._start(config)
        except Exception as exc:  # noqa: BLE001 - never stop a sweep for its grouping
            log.warning("could not create the sweep's MLflow parent run (%s): jobs are logged ungrouped", exc)

    def _start(self, config: DictConfig) -> None:
        cwd = Path(_get(config, "hydra.runtime.cwd", os.getcwd()))
        uri = _get(config, "logger.tracking_uri") or default_tracking_uri(cwd)
        experiment = str(_get(config, "logger.experiment", "Default"))
        job_name = str(_get(config, "hydra.job.name", DEFAULT_JOB_NAME))
        name = job_name if job_name != DEFAULT_JOB_NAME else "sweep"
        self.sweep_dir = Path(str(_get(config, "hydra.sweep.dir", "multirun")))
        if not self.sweep_dir.is_absolute():
            self.sweep_dir = cwd / self.sweep_dir
        self.client = open_client(uri)  # under the store's lock: two sweeps may create it at once
        exp_id = experiment_id(self.client, experiment)

        key = self.key = sweep_key(config)
        found: list[Any] = []
        if key is not None:
            found = self.client.search_runs([exp_id], filter_string=f"tags.`{SWEEP_KEY_TAG}` = '{key}'",
                                            max_results=1, order_by=["attributes.start_time DESC"])
            if found:
                self.run_id = found[0].info.run_id
                self.client.update_run(self.run_id, status="RUNNING")
                self.client.set_tag(self.run_id, UNIT_TAG, PERCENT)  # its metrics are rewritten in %
                log.info("continuing the sweep's MLflow parent run %s (%s)", self.run_id, key)
        if self.run_id is None:
            tags = {
                SWEEP_TAG: "true", SWEEP_NAME_TAG: name, UNIT_TAG: PERCENT, "dcc.sweep_dir": str(self.sweep_dir),
                "dcc.sweeper": str(_get(config, "hydra.sweeper._target_", "")).rsplit(".", 1)[-1],
                "dcc.launcher": str(_get(config, "hydra.launcher._target_", "")).rsplit(".", 1)[-1],
                "dcc.command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])[:5000],
                "mlflow.note.content": f"Sweep `{name}`: its jobs are the child runs. "
                                       f"Table: `python -m dcc.report {name}`.",
            }
            if key is not None:
                tags[SWEEP_KEY_TAG] = key
            run = self.client.create_run(exp_id, run_name=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}", tags=tags)
            self.run_id = run.info.run_id
        self._previous_env = os.environ.get(PARENT_RUN_ENV)
        os.environ[PARENT_RUN_ENV] = self.run_id
        self._open = True
        atexit.register(self._close_if_open)
        if key is None or not found:
            try:
                self._log_sweep_params(config)
            except Exception as exc:  # noqa: BLE001
                log.warning("could not log the sweep's overrides to its MLflow run (%s)", exc)
        print(f"MLflow sweep run {self.run_id} ({name}) in experiment {experiment!r} at {uri}", flush=True)

    def _log_sweep_params(self, config: DictConfig) -> None:
        """The command-line overrides (swept keys as ``a,b,c``) and the sweeper's search space."""
        from mlflow.entities import Param

        params: dict[str, str] = {}
        for override in _get(config, "hydra.overrides.task", []) or []:
            k, _, v = str(override).partition("=")
            params[f"override/{k.lstrip('+~')}"] = v
        for k, v in (_get(config, "hydra.sweeper.params", {}) or {}).items():
            params[f"search/{k}"] = str(v)
        for k in ("n_trials", "n_jobs", "study_name", "storage", "direction", "replicates", "pruner._target_"):
            v = _get(config, f"hydra.sweeper.{k}")
            if v is not None:
                params[f"sweeper/{k}"] = str(v)
        # MLflow keys: alphanumerics and _ - . space : / only (cluster@hydra.launcher -> cluster_hydra.launcher)
        items = [Param(re.sub(r"[^\w\-. :/]", "_", k), v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    # ----------------------------------------------------------------------------------------------
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._previous_keys is None:
            os.environ.pop(SWEPT_KEYS_ENV, None)
        else:
            os.environ[SWEPT_KEYS_ENV] = self._previous_keys
        if self._open:
            self._finish("FINISHED")

    def _close_if_open(self) -> None:
        if self._open:  # the sweep raised: keep what finished, mark the parent failed
            self._finish("FAILED")

    def _finish(self, status: str) -> None:
        self._open = False
        if self._previous_env is None:
            os.environ.pop(PARENT_RUN_ENV, None)
        else:
            os.environ[PARENT_RUN_ENV] = self._previous_env
        try:
            self._summarise()
        except Exception as exc:  # noqa: BLE001
            log.warning("could not write the sweep's report (%s)", exc)
        try:
            self.client.set_terminated(self.run_id, status=status)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not close the sweep's MLflow parent run %s (%s)", self.run_id, exc)

    def _summarise(self) -> None:
        from dcc.sweeps import report as rep

        children = rep.search_all(self.client, [e.experiment_id for e in self.client.search_experiments()],
                                  f"tags.`{PARENT_TAG}` = '{self.run_id}'")
        counts: dict[str, int] = {}
        for r in children:
            counts[r.info.status] = counts.get(r.info.status, 0) + 1
        for status, n in counts.items():
            self.client.set_tag(self.run_id, f"dcc.jobs_{status.lower()}", str(n))
        results = self.sweep_dir / "optimization_results.yaml" if self.sweep_dir else None
        if results is not None and results.exists():
            self.client.log_artifact(self.run_id, str(results), "optuna")
        if self.report and self.key and self.key.startswith("optuna:"):  # an Optuna sweep: its study's report
            from dcc.sweeps import study_report

            name, _, storage = self.key[len("optuna:"):].rpartition("@")
            text, files, _ = study_report.report(name, storage, (self.sweep_dir or Path("multirun")) / "study_report",
                                                 self.client, self.run_id)
            print("\n" + text + f"report: {', '.join(str(f) for f in files)} (also in the MLflow parent run "
                  f"{self.run_id}, artifacts/study_report)", flush=True)
        elif self.report and counts.get("FINISHED"):
            out = (self.sweep_dir or Path("multirun")) / "report"
            report, files = rep.report_for_parent(self.client, self.run_id, out_dir=out)
            self._log_figures(report)
            table = rep.to_markdown(report)
            note = table + UNITS_NOTE
            self.client.set_tag(self.run_id, "mlflow.note.content", note[:50000])  # the UI's description: the table
            print("\n" + table, flush=True)
            print(f"report: {', '.join(str(f) for f in files.values())} (also in the MLflow parent run "
                  f"{self.run_id}, artifacts/report)", flush=True)

    def _log_figures(self, report: Any) -> None:
        """The table's numbers as the parent's metrics, so that the MLflow runs table shows the sweep's result,
        and what they are as tags: the evaluation split, the budget, the replicates and the baseline arm."""
        from mlflow.entities import Metric, RunTag

        from dcc.sweeps import report as rep

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, 0) for k, v in rep.summary_metrics(report).items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])
        tags = {"dcc.report_split": report.split, "dcc.report_steps": report.budget_label,
                "dcc.report_replicates": report.n_label, "dcc.report_subset": report.subset,
                "dcc.report_title": report.heading()[:5000]}
        if report.baseline:
            tags["dcc.report_baseline"] = report.baseline
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
