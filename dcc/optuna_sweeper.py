"""The Optuna sweeper of ``hparams_search=...``: a persistent study that survives failed trials and restarts.

It is hydra-optuna-sweeper's sweeper (same config keys, same search-space syntax, trials launched by
whichever ``hydra/launcher`` is selected, ``n_jobs`` at a time) with three changes:

* ``n_trials`` is the size of the whole study: running the same command again continues the study in
  its storage and runs only the trials still missing (raise ``n_trials`` to search further);
* a trial whose job raises (out of memory, a non-finite loss, a rejected config) or returns a value
  that is not finite is recorded as FAIL with the error in its user attributes (``error``,
  ``traceback``); the search goes on;
* trials left RUNNING by a search that was interrupted (Ctrl-C, a killed login shell) are run again
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
import traceback
from typing import Any, Sequence

import optuna
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from omegaconf import OmegaConf
from optuna.trial import TrialState

log = logging.getLogger(__name__)

OWNER_ATTR = "dcc.sweeper"  # host:pid of the sweeper process that launched a trial
FINISHED = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)


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


def _override(name: str, value: Any) -> str:
    """``key=value`` for Hydra's override parser (split names like 1_8 would otherwise read as 18)."""
    if isinstance(value, str) and re.fullmatch(r"\d+_\d+", value):
        value = f"'{value}'"
    return f"{name}={value}"


class StudySweeper(OptunaSweeperImpl):
    """See the module docstring; configured like ``hydra/sweeper=optuna`` (through :class:`hydra_plugins.dcc_plugins.sweeper.OptunaStudySweeper`)."""

    def sweep(self, arguments: list[str]) -> None:
        assert self.config is not None and self.launcher is not None
        self._process_searchspace_config()
        space, fixed = create_params_from_overrides(self._parse_sweeper_params_config() + list(arguments))
        for name in fixed:
            space.pop(name, None)
        n_total = self.n_trials
        if isinstance(self.sampler, functools.partial) and self.sampler.func is optuna.samplers.GridSampler:
            grid = {name: self._to_grid_sampler_choices(d) for name, d in space.items()}
            self.sampler = self.sampler(grid)
            n_total = min(n_total, math.prod(len(v) for v in grid.values()))
        directions = self._get_directions()
        study = optuna.create_study(study_name=self.study_name, storage=self.storage, sampler=self.sampler,
                                    directions=directions, load_if_exists=True)

        trials = study.get_trials(deepcopy=False)
        finished = sum(t.state in FINISHED for t in trials)
        running = [t for t in trials if t.state == TrialState.RUNNING]
        live = [t for t in running if _alive_elsewhere(t.user_attrs.get(OWNER_ATTR))]
        orphans = [t for t in running if t not in live]
        to_ask = max(0, n_total - finished - len(running))
        log.info("Optuna study %r in %s: %d trials finished, %d interrupted to run again, %d running elsewhere, "
                 "%d new to reach n_trials=%d", study.study_name, self.storage or "memory", finished, len(orphans),
                 len(live), to_ask, n_total)

        while orphans or to_ask > 0:
            batch: list[tuple[int, int, dict[str, Any]]] = []  # (number, trial id, params)
            while orphans and len(batch) < self.n_jobs:
                t = orphans.pop(0)
                optuna.trial.Trial(study, t._trial_id).set_user_attr(OWNER_ATTR, _owner())
                batch.append((t.number, t._trial_id, dict(t.params)))
            while to_ask > 0 and len(batch) < self.n_jobs:
                trial = study.ask()
                for name, dist in space.items():
                    trial._suggest(name, dist)
                if self.custom_search_space_extender:
                    self.custom_search_space_extender(self.config, trial)
                trial.set_user_attr(OWNER_ATTR, _owner())
                batch.append((trial.number, trial._trial_id, dict(trial.params)))
                to_ask -= 1
            overrides = [tuple(_override(k, v) for k, v in {**params, **fixed}.items()) for _, _, params in batch]
            try:
                returns: Sequence[Any] = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
            except Exception as exc:  # noqa: BLE001 - e.g. a SLURM job killed outright: fail its batch, go on
                log.error("launching trials %s failed: %s", [n for n, _, _ in batch], exc)
                returns = [exc] * len(batch)
            self.job_idx += len(batch)
            for (number, trial_id, _), ret in zip(batch, returns):
                self._record(study, number, trial_id, ret, len(directions))

        self._save_results(study, fixed)

    def _record(self, study: optuna.Study, number: int, trial_id: int, ret: Any, n_objectives: int) -> None:
        try:
            if isinstance(ret, BaseException):
                raise ret
            raw = ret.return_value  # raises the job's exception when the job failed
            values = [float(raw)] if n_objectives == 1 else [float(v) for v in raw]
            if len(values) != n_objectives or not all(math.isfinite(v) for v in values):
                raise ValueError(f"the job returned {raw!r}, not {n_objectives} finite value(s)")
        except Exception as exc:  # noqa: BLE001
            error = f"{type(exc).__name__}: {exc}"
            trial = optuna.trial.Trial(study, trial_id)
            trial.set_user_attr("error", error[:2000])
            trial.set_user_attr("traceback", "".join(traceback.format_exception(exc))[-4000:])
            self._tell(study, number, None, TrialState.FAIL)
            log.warning("trial %d failed (recorded as FAIL, the search goes on): %s", number, error)
            return
        self._tell(study, number, values, TrialState.COMPLETE)
        log.info("trial %d: %s", number, values if n_objectives > 1 else values[0])

    @staticmethod
    def _tell(study: optuna.Study, number: int, values: list[float] | None, state: TrialState) -> None:
        try:
            study.tell(number, values=values, state=state)
        except RuntimeError as exc:  # GridSampler stops the study when the grid is exhausted
            if "Study.stop" not in str(exc):
                raise

    def _save_results(self, study: optuna.Study, fixed: dict[str, Any]) -> None:
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
        path = f"{self.config.hydra.sweep.dir}/optimization_results.yaml"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        OmegaConf.save(OmegaConf.create(results), path)
        print(f"Optuna results: {path}", flush=True)
