"""The Optuna sweeper of ``hparams_search=...``: a persistent study that survives failed trials and restarts.

Configured like hydra-optuna-sweeper (``hydra.sweeper``: ``sampler``, ``direction``, ``storage``,
``study_name``, ``n_trials``, ``n_jobs``, ``params`` in Hydra's sweep syntax: ``choice(...)``,
``range(...)``, ``interval(...)``, ``tag(log, interval(...))``) and launching trials through whichever
``hydra/launcher`` is selected, ``n_jobs`` at a time, but independent of that plugin (which pins
Optuna 2): it uses Optuna's ``create_study`` / ``ask`` / ``suggest_*`` / ``tell`` API (Optuna 3.6 to 5.x,
``pyproject.toml``), any storage URL Optuna takes (``sqlite:///optuna.db``, ``postgresql://...``).

* ``n_trials`` is the size of the whole study: running the same command again continues the study in
  its storage and runs only the trials still missing (raise ``n_trials`` to search further).
* A trial whose job raises (out of memory, a non-finite loss, a rejected config) or returns a value
  that is not finite is recorded as FAIL with the error in its user attributes (``error``,
  ``traceback``); the search goes on. So does a batch whose launcher fails outright.
* ``enqueue``: parameter sets to try first (``study.enqueue_trial``; one already in the study is not tried
  again), e.g. the preset's own values, so that the study measures the baseline it has to beat.
* With a launcher that can launch from several threads at once (``concurrent_launches``: the local and
  SLURM launchers) ``n_jobs`` trials run at a time and a new one is asked for as soon as any ends
  (asynchronous, as ``study.optimize(n_jobs=...)``); with others (``basic``) trials run in batches of
  ``n_jobs``, each waiting for its slowest trial.
* Trials left RUNNING by a search that was interrupted (Ctrl-C, a killed login shell) are run again
  with the same parameters when the command is repeated, so an interrupted study ends with exactly
  ``n_trials`` trials. A RUNNING trial whose sweeper process is still alive on this machine is left
  alone (two commands may share a study).

At the end the best trial is printed (with the overrides that reproduce it) and saved, with the failed
trials and their errors, to ``<sweep dir>/optimization_results.yaml``.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import socket
import threading
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Sequence

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Transformer
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

log = logging.getLogger(__name__)

OWNER_ATTR = "dcc.sweeper"  # host:pid of the sweeper process that launched a trial
FINISHED = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)


@dataclass
class Param:
    """One searched key: categorical ``choices``, or an int / float range (``step``, ``log``)."""

    kind: str  # categorical | int | float
    choices: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 0.0
    step: float | None = None
    log: bool = False

    def suggest(self, trial: optuna.Trial, name: str) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)

    def contains(self, value: Any) -> bool:
        if self.kind == "categorical":
            return value in self.choices
        return isinstance(value, (int, float)) and not isinstance(value, bool) and self.low <= value <= self.high

    def grid(self) -> list[Any]:
        if self.kind == "categorical":
            return list(self.choices)
        if self.step is None or self.log:
            raise ValueError("a grid needs choice(...) or range(...), not interval(...)")
        n = int(round((self.high - self.low) / self.step)) + 1
        values = [self.low + i * self.step for i in range(n)]
        return [int(v) for v in values] if self.kind == "int" else values


def parse_search_space(overrides: Sequence[str]) -> tuple[dict[str, Param], dict[str, str]]:
    """Hydra sweep overrides -> (searched keys, fixed ``key=value`` overrides)."""
    space: dict[str, Param] = {}
    fixed: dict[str, str] = {}
    for ov in OverridesParser.create().parse_overrides(list(overrides)):
        name = ov.get_key_element()
        if not ov.is_sweep_override():
            fixed[name] = ov.get_value_element_as_str()
        elif ov.is_choice_sweep():
            space[name] = Param("categorical", choices=tuple(ov.sweep_iterator(transformer=Transformer.encode)))
        elif ov.is_range_sweep():
            value = ov.value()
            if value.shuffle:
                space[name] = Param("categorical", choices=tuple(ov.sweep_iterator(transformer=Transformer.encode)))
                continue
            points = list(value.range())
            if not points:
                raise ValueError(f"{name}: empty range")
            is_int = all(isinstance(x, int) for x in (value.start, value.stop, value.step))
            space[name] = Param("int" if is_int else "float", low=points[0], high=points[-1], step=value.step)
        elif ov.is_interval_sweep():
            value = ov.value()
            is_int = isinstance(value.start, int) and isinstance(value.end, int)
            space[name] = Param("int" if is_int else "float", low=value.start, high=value.end, log="log" in value.tags)
        else:
            raise ValueError(f"{name}: unsupported sweep {ov.input_line!r}")
    for name in fixed:  # a command-line value replaces the configured search of that key
        space.pop(name, None)
    return space, fixed


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive_elsewhere(owner: str | None) -> bool:
    """True when ``owner`` is another live process on this machine."""
    if not owner or ":" not in owner:
        return False
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _plain(value: Any) -> Any:
    """A config value as Optuna stores it (an OmegaConf node or a numpy number: its Python value)."""
    return value.item() if hasattr(value, "item") else value


def _override(name: str, value: Any) -> str:
    """``key=value`` for Hydra's override parser (split names like 1_8 would otherwise read as 18)."""
    if isinstance(value, str) and re.fullmatch(r"\d+_\d+", value):
        value = f"'{value}'"
    return f"{name}={value}"


class StudySweeper(Sweeper):
    def __init__(self, sampler: Any = None, direction: Any = "minimize", storage: str | None = None,
                 study_name: str | None = None, n_trials: int = 20, n_jobs: int = 1,
                 params: DictConfig | dict | None = None, enqueue: Sequence[Any] | None = None,
                 **unused: Any) -> None:
        if unused:
            log.warning("optuna sweeper: ignoring %s", sorted(unused))
        self.sampler = sampler
        self.direction = direction
        self.storage = storage
        self.study_name = study_name
        self.n_trials = int(n_trials)
        self.n_jobs = max(1, int(n_jobs))
        self.params = dict(params or {})
        self.enqueue = [dict(p) for p in (enqueue or [])]
        self.config: DictConfig | None = None
        self.launcher: Any = None
        self.job_idx = 0

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.job_idx = 0
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def _directions(self) -> list[str]:
        d = self.direction
        items = list(d) if isinstance(d, (list, tuple)) or OmegaConf.is_list(d) else [d]
        return [str(getattr(x, "name", x)) for x in items]

    def sweep(self, arguments: list[str]) -> None:
        assert self.config is not None and self.launcher is not None
        space, fixed = parse_search_space([f"{k}={v}" for k, v in self.params.items()] + list(arguments))
        sampler, n_total = self.sampler, self.n_trials
        if isinstance(sampler, functools.partial) and sampler.func is optuna.samplers.GridSampler:
            grid = {name: p.grid() for name, p in space.items()}
            sampler = sampler(grid)
            n_total = min(n_total, math.prod(len(v) for v in grid.values()))
        directions = self._directions()
        study = optuna.create_study(study_name=self.study_name, storage=self.storage, sampler=sampler,
                                    directions=directions, load_if_exists=True)

        trials = study.get_trials(deepcopy=False)
        if trials and hasattr(study.sampler, "reseed_rng"):
            # A continued study: a sampler with a fixed seed would start its random draws over and ask for the
            # parameters of trial 0 again (the same job, which the run directory then reports as finished).
            study.sampler.reseed_rng()
        for params in self.enqueue:
            self._enqueue(study, space, fixed, params)
        finished = sum(t.state in FINISHED for t in trials)
        running = [t for t in trials if t.state == TrialState.RUNNING]
        live = [t for t in running if _alive_elsewhere(t.user_attrs.get(OWNER_ATTR))]
        orphans = [t for t in running if t not in live]
        to_ask = max(0, n_total - finished - len(running))
        log.info("Optuna study %r in %s: %d trials finished, %d interrupted to run again, %d running elsewhere, "
                 "%d new to reach n_trials=%d", study.study_name, self.storage or "memory", finished, len(orphans),
                 len(live), to_ask, n_total)
        pending = [*(("orphan", t) for t in orphans), *(("new", None) for _ in range(to_ask))]
        n_obj = len(directions)
        if self.n_jobs > 1 and getattr(self.launcher, "concurrent_launches", False):
            self._run_async(study, space, fixed, pending, n_obj)
        else:
            self._run_batches(study, space, fixed, pending, n_obj)

        self._save_results(study, fixed)

    @staticmethod
    def _enqueue(study: optuna.Study, space: dict[str, Param], fixed: dict[str, str], params: dict[str, Any]) -> None:
        """Enqueue one ``hydra.sweeper.enqueue`` entry: keys the command line fixes are left out; an entry with a
        value outside the searched space is skipped (with a warning); a key neither searched nor fixed is refused."""
        unknown = sorted(set(params) - set(space) - set(fixed))
        if unknown:
            raise ValueError(f"hydra.sweeper.enqueue: {unknown} not searched (the searched keys: {sorted(space)})")
        values = {k: _plain(v) for k, v in params.items() if k in space}
        outside = {k: v for k, v in values.items() if not space[k].contains(v)}
        if outside:
            log.warning("hydra.sweeper.enqueue: %s outside the searched space: not tried", outside)
        elif values:
            study.enqueue_trial(values, skip_if_exists=True)

    def _take(self, study: optuna.Study, space: dict[str, Param], item: tuple[str, Any]) -> tuple[optuna.Trial, dict]:
        """The next trial to run: an interrupted one taken over with its parameters, or a new one asked for."""
        kind, old = item
        if kind == "orphan":
            trial, values = optuna.Trial(study, old._trial_id), dict(old.params)
        else:
            trial = study.ask()
            values = {name: p.suggest(trial, name) for name, p in space.items()}
        trial.set_user_attr(OWNER_ATTR, _owner())
        return trial, values

    def _launch(self, batch: list[tuple[optuna.Trial, dict[str, Any]]], fixed: dict[str, str],
                first: int) -> Sequence[Any]:
        """Launch a batch of trials as jobs ``first``, ``first + 1``, ...; a launcher that fails fails the batch."""
        overrides = [tuple(_override(k, v) for k, v in {**params, **fixed}.items()) for _, params in batch]
        try:
            return self.launcher.launch(overrides, initial_job_idx=first)
        except Exception as exc:  # noqa: BLE001 - e.g. a SLURM job killed outright: fail its batch, go on
            log.error("launching trials %s failed: %s", [t.number for t, _ in batch], exc)
            return [exc] * len(batch)

    def _run_batches(self, study: optuna.Study, space: dict[str, Param], fixed: dict[str, str],
                     pending: list[tuple[str, Any]], n_obj: int) -> None:
        while pending:
            batch = [self._take(study, space, item) for item in pending[:self.n_jobs]]
            del pending[:self.n_jobs]
            first, self.job_idx = self.job_idx, self.job_idx + len(batch)
            for (trial, _), ret in zip(batch, self._launch(batch, fixed, first)):
                self._record(study, trial, ret, n_obj)

    def _run_async(self, study: optuna.Study, space: dict[str, Param], fixed: dict[str, str],
                   pending: list[tuple[str, Any]], n_obj: int) -> None:
        """``n_jobs`` trials at a time, one launch per trial; the next trial is asked for (with every result so far
        told to the sampler) as soon as a slot frees."""
        lock = threading.Lock()  # the study (ask / tell) and the job numbers, from the main and worker threads

        def launch(batch: list[tuple[optuna.Trial, dict[str, Any]]], first: int) -> None:
            (ret,) = self._launch(batch, fixed, first)
            with lock:
                self._record(study, batch[0][0], ret, n_obj)

        running: set[Future] = set()
        with ThreadPoolExecutor(max_workers=self.n_jobs) as pool:
            try:
                while pending:
                    if len(running) >= self.n_jobs:
                        done, running = wait(running, return_when=FIRST_COMPLETED)
                        for future in done:
                            future.result()
                    with lock:
                        batch = [self._take(study, space, pending.pop(0))]
                        first, self.job_idx = self.job_idx, self.job_idx + 1
                    running.add(pool.submit(launch, batch, first))
                for future in wait(running).done:
                    future.result()
            except BaseException:
                for future in running:
                    future.cancel()
                raise

    def _record(self, study: optuna.Study, trial: optuna.Trial, ret: Any, n_objectives: int) -> None:
        try:
            if isinstance(ret, BaseException):
                raise ret
            raw = ret.return_value  # raises the job's exception when the job failed
            values = [float(raw)] if n_objectives == 1 else [float(v) for v in raw]
            if len(values) != n_objectives or not all(math.isfinite(v) for v in values):
                raise ValueError(f"the job returned {raw!r}, not {n_objectives} finite value(s)")
        except Exception as exc:  # noqa: BLE001
            error = f"{type(exc).__name__}: {exc}"
            trial.set_user_attr("error", error[:2000])
            trial.set_user_attr("traceback", "".join(traceback.format_exception(exc))[-4000:])
            self._tell(study, trial, None, TrialState.FAIL)
            log.warning("trial %d failed (recorded as FAIL, the search goes on): %s", trial.number, error)
            return
        self._tell(study, trial, values, TrialState.COMPLETE)
        log.info("trial %d: %s", trial.number, values if n_objectives > 1 else values[0])

    @staticmethod
    def _tell(study: optuna.Study, trial: optuna.Trial, values: list[float] | None, state: TrialState) -> None:
        try:
            study.tell(trial, values=values, state=state)
        except RuntimeError as exc:
            # GridSampler.after_trial calls study.stop() once the grid is covered, which raises outside
            # study.optimize (Optuna 3.6-5.x); the trial's state and values are stored before that.
            if "Study.stop" not in str(exc):
                raise

    def _save_results(self, study: optuna.Study, fixed: dict[str, str]) -> None:
        assert self.config is not None
        trials = study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        failed = [t for t in trials if t.state == TrialState.FAIL]
        results: dict[str, Any] = {
            "name": "optuna", "study_name": study.study_name, "storage": str(self.storage),
            "n_trials": len(trials), "n_complete": len(complete), "n_failed": len(failed),
            "failed": [{"number": t.number, "params": dict(t.params), "error": t.user_attrs.get("error", "")}
                       for t in failed],
        }
        if not complete:
            log.warning("no trial of study %r completed: no best parameters", study.study_name)
        elif len(study.directions) == 1:
            best = study.best_trial
            task = {k: v for k, v in fixed.items() if not k.lstrip("+~").startswith(("hydra", "hparams_search"))}
            overrides = " ".join(_override(k, v) for k, v in {**best.params, **task}.items())
            results.update(best_params=dict(best.params), best_value=best.value, best_trial=best.number,
                           best_overrides=overrides)
            print(f"Best trial {best.number} of study {study.study_name!r}: value {best.value:.4f}\n"
                  f"  params: {dict(best.params)}\n  reproduce: python run.py {overrides}", flush=True)
        else:
            results["solutions"] = [{"number": t.number, "params": dict(t.params), "values": list(t.values)}
                                    for t in study.best_trials]
            print(f"{len(study.best_trials)} Pareto-optimal trials of study {study.study_name!r}", flush=True)
        path = os.path.join(str(self.config.hydra.sweep.dir), "optimization_results.yaml")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        OmegaConf.save(OmegaConf.create(results), path)
        print(f"Optuna results: {path}", flush=True)
