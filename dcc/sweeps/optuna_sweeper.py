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
  alone (two commands may share a study). One the pruner had already stopped is recorded as PRUNED, not run again.
* ``pruner``: any Optuna pruner by ``_target_`` (default: none). Every job writes its validation mIoU at each
  evaluation to a file of its trial directory (:mod:`dcc.engine.trial_link`); this process, the only writer of
  the study, polls those files every ``poll_interval`` seconds, reports each step to the study as an intermediate
  value and asks ``should_prune``; a pruned trial gets a stop file, its jobs write a checkpoint and end cleanly at
  their next step, and the trial is recorded as PRUNED (user attribute ``pruned_at_step``) when they have ended.
  Needs a launcher that runs trials asynchronously (local, slurm).
* ``replicates: k``: a trial is k jobs that differ only by ``replicate_key`` (``trainer.seed``) = each of
  ``replicate_values`` (default 1..k), launched together; its value is their mean, and the intermediate value at
  a step is the mean over the replicates once all have reported that step. ``k = 1``: one job, no seed override.

At the end the best trial is printed (with the overrides that reproduce it) and saved, with the failed
trials and their errors, to ``<sweep dir>/optimization_results.yaml``.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import os
import socket
import threading
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Sequence

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Transformer
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from dcc.config import quote_split_value
from dcc.engine.tracking import PERCENT, UNIT_TAG as UNIT_ATTR
from dcc.engine.trial_link import DIR_ENV, REPLICATE_ENV, read_reports, request_stop

log = logging.getLogger(__name__)

OWNER_ATTR = "dcc.sweeper"  # host:pid of the sweeper process that launched a trial
FINISHED = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
PRUNED_AT = "pruned_at_step"  # user attribute: the step whose intermediate value made the pruner stop the trial


class SweeperConfigError(ValueError):
    """A ``hydra.sweeper`` value that cannot work: one line naming the key (the Hydra shim prints it and exits)."""


def _pruners() -> list[str]:
    return [n for n in getattr(optuna.pruners, "__all__", dir(optuna.pruners))
            if isinstance(getattr(optuna.pruners, n, None), type)
            and issubclass(getattr(optuna.pruners, n), optuna.pruners.BasePruner) and n != "BasePruner"]


def make_pruner(spec: Any) -> optuna.pruners.BasePruner | None:
    """``hydra.sweeper.pruner``: None, a pruner, or ``{_target_: optuna.pruners.MedianPruner, <its arguments>}``."""
    if spec is None or isinstance(spec, optuna.pruners.BasePruner):
        return spec
    if OmegaConf.is_config(spec):
        spec = OmegaConf.to_container(spec, resolve=True)
    if not isinstance(spec, dict) or "_target_" not in spec:
        raise SweeperConfigError(f"hydra.sweeper.pruner={spec!r}: null or {{_target_: optuna.pruners.MedianPruner, ...}}")
    kwargs = {k: v for k, v in spec.items() if not (k.startswith("_") and k.endswith("_"))}
    target = str(spec["_target_"])
    module, _, name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError, ValueError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, optuna.pruners.BasePruner)):
        raise SweeperConfigError(f"hydra.sweeper.pruner._target_={target}: not an Optuna pruner (Optuna's: "
                                 f"{', '.join('optuna.pruners.' + n for n in _pruners())})")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise SweeperConfigError(f"hydra.sweeper.pruner: {name}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) "
                                 f"refused: {exc}") from None


def make_sampler(spec: Any) -> Any:
    """``hydra.sweeper.sampler``: None, a sampler (or a partial GridSampler), or its config with ``_target_``."""
    if spec is None or not (OmegaConf.is_config(spec) or isinstance(spec, dict)):
        return spec
    from hydra.utils import instantiate

    try:
        return instantiate(spec)
    except Exception as exc:  # noqa: BLE001 - Hydra's message spans lines: its first one names the target
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SweeperConfigError(f"hydra.sweeper.sampler: {first}") from None


def replicate_list(replicates: Any, values: Any) -> list[Any]:
    """The replicate values of every trial (``[]``: one job per trial, nothing overridden)."""
    if isinstance(replicates, bool) or not isinstance(replicates, int) or replicates < 1:
        raise SweeperConfigError(f"hydra.sweeper.replicates={replicates!r}: the number of runs per trial, 1 or more")
    if values is None:
        return list(range(1, replicates + 1)) if replicates > 1 else []
    values = [_plain(v) for v in values]
    if len(values) != replicates and replicates != 1:
        raise SweeperConfigError(f"hydra.sweeper.replicate_values={values}: {len(values)} values for "
                                 f"hydra.sweeper.replicates={replicates}")
    if len(set(map(str, values))) != len(values):
        raise SweeperConfigError(f"hydra.sweeper.replicate_values={values}: the values must differ")
    return values


def check_hydra_config(config: DictConfig) -> None:
    """The checks of :class:`StudySweeper` on a composed config, before Hydra builds sweeper and launcher (the sweep
    callback calls it, so that nothing is written before a bad value is refused)."""
    sweeper = OmegaConf.select(config, "hydra.sweeper", default=None)
    if sweeper is None or not str(sweeper.get("_target_", "")).endswith("OptunaStudySweeper"):
        return
    make_pruner(sweeper.get("pruner"))
    replicate_list(sweeper.get("replicates", 1), sweeper.get("replicate_values"))
    if sweeper.get("pruner") is not None:
        launcher = OmegaConf.select(config, "hydra.launcher", default=None) or {}
        target = str(launcher.get("_target_", ""))
        concurrent = target.endswith("SlurmLauncher") or (target.endswith("dcc_plugins.launcher.LocalLauncher")
                                                          and not launcher.get("visible_gpus"))
        if not concurrent:
            raise SweeperConfigError(
                f"hydra.sweeper.pruner with {target.rsplit('.', 1)[-1] or 'this launcher'}: pruning needs a launcher "
                "that runs trials asynchronously (hydra/launcher=local without visible_gpus, or hydra/launcher=slurm), "
                "or hydra.sweeper.pruner=null")


@dataclass
class _Run:
    """One trial being run: its jobs (one per replicate) share ``dir``, where they report."""

    trial: optuna.Trial
    params: dict[str, Any]
    dir: str
    reported: set[int] = field(default_factory=set)  # steps already reported to the study
    prune_step: int | None = None  # the pruner stopped it at this step


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


def _rebuildable(exc: BaseException) -> bool:
    """Whether ``type(exc)(message)`` rebuilds the exception (to prefix its replicate)."""
    try:
        type(exc)("x")
    except Exception:  # noqa: BLE001
        return False
    return True


def _plain(value: Any) -> Any:
    """A config value as Optuna stores it (an OmegaConf node or a numpy number: its Python value)."""
    return value.item() if hasattr(value, "item") else value


def _override(name: str, value: Any) -> str:
    """``key=value`` for Hydra's override parser (split names like 1_8 would otherwise read as 18)."""
    return f"{name}={quote_split_value(value) if isinstance(value, str) else value}"


class StudySweeper(Sweeper):
    def __init__(self, sampler: Any = None, direction: Any = "minimize", storage: str | None = None,
                 study_name: str | None = None, n_trials: int = 20, n_jobs: int = 1,
                 params: DictConfig | dict | None = None, enqueue: Sequence[Any] | None = None,
                 pruner: Any = None, replicates: int = 1, replicate_key: str = "trainer.seed",
                 replicate_values: Sequence[Any] | None = None, poll_interval: float = 2.0,
                 **unused: Any) -> None:
        if unused:
            log.warning("optuna sweeper: ignoring %s", sorted(unused))
        self.sampler = make_sampler(sampler)
        self.pruner = make_pruner(pruner)
        self.replicate_key = str(replicate_key)
        self.replicates = replicate_list(replicates, replicate_values)
        self.poll_interval = float(poll_interval)
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
        self.check(space, fixed)
        sampler, n_total = self.sampler, self.n_trials
        if isinstance(sampler, functools.partial) and sampler.func is optuna.samplers.GridSampler:
            grid = {name: p.grid() for name, p in space.items()}
            sampler = sampler(grid)
            n_total = min(n_total, math.prod(len(v) for v in grid.values()))
        directions = self._directions()
        study = optuna.create_study(study_name=self.study_name, storage=self.storage, sampler=sampler,
                                    pruner=self.pruner, directions=directions, load_if_exists=True)
        self._check_unit(study)
        self._describe(study, fixed)

        trials = study.get_trials(deepcopy=False)
        if trials and hasattr(study.sampler, "reseed_rng"):
            # A continued study: a sampler with a fixed seed would start its random draws over and ask for the
            # parameters of trial 0 again (the same job, which the run directory then reports as finished).
            study.sampler.reseed_rng()
        for i, params in enumerate(self.enqueue):
            self._enqueue(study, space, fixed, params, i)
        finished = sum(t.state in FINISHED for t in trials)
        running = [t for t in trials if t.state == TrialState.RUNNING]
        live = [t for t in running if _alive_elsewhere(t.user_attrs.get(OWNER_ATTR))]
        orphans = [t for t in running if t not in live]
        for t in [t for t in orphans if PRUNED_AT in t.user_attrs]:  # pruned before the sweeper was killed
            self._tell(study, t.number, None, TrialState.PRUNED)
            log.info("trial %d: pruned at step %s by the interrupted search: not run again", t.number, t.user_attrs[PRUNED_AT])
            orphans.remove(t)
        to_ask = max(0, n_total - finished - len(running))
        log.info("Optuna study %r in %s: %d trials finished, %d interrupted to run again, %d running elsewhere, "
                 "%d new to reach n_trials=%d", study.study_name, self.storage or "memory", finished, len(orphans),
                 len(live), to_ask, n_total)
        pending = [*(("orphan", t) for t in orphans), *(("new", None) for _ in range(to_ask))]
        n_obj = len(directions)
        if getattr(self.launcher, "concurrent_launches", False):
            self._run_async(study, space, fixed, pending, n_obj)
        else:
            self._run_batches(study, space, fixed, pending, n_obj)

        self._save_results(study, fixed)

    @staticmethod
    def _enqueue(study: optuna.Study, space: dict[str, Param], fixed: dict[str, str], params: dict[str, Any],
                 index: int = 0) -> None:
        """Enqueue one ``hydra.sweeper.enqueue`` entry: keys the command line fixes are left out; an entry with a
        value outside the searched space is skipped (with a warning); a key neither searched nor fixed is refused."""
        unknown = sorted(set(params) - set(space) - set(fixed))
        if unknown:
            raise SweeperConfigError(f"hydra.sweeper.enqueue: {unknown} not searched (the searched keys: {sorted(space)})")
        values = {k: _plain(v) for k, v in params.items() if k in space}
        outside = {k: v for k, v in values.items() if not space[k].contains(v)}
        if outside:
            log.warning("hydra.sweeper.enqueue: %s outside the searched space: not tried", outside)
        elif values:
            # the first entry is the study's baseline (the study report marks it)
            study.enqueue_trial(values, user_attrs={"enqueued": index}, skip_if_exists=True)

    def check(self, space: dict[str, Param], fixed: dict[str, str]) -> None:
        """What cannot work, refused before the study is opened (one line each)."""
        if self.pruner is not None and not getattr(self.launcher, "concurrent_launches", False):
            name = type(self.launcher).__name__
            raise SweeperConfigError(
                f"hydra.sweeper.pruner with {name}: pruning needs a launcher that runs trials asynchronously "
                "(hydra/launcher=local without visible_gpus, or hydra/launcher=slurm), or hydra.sweeper.pruner=null")
        if self.pruner is not None and len(self._directions()) > 1:
            raise SweeperConfigError(f"hydra.sweeper.pruner with {len(self._directions())} directions: Optuna prunes "
                                     "single-objective studies only (hydra.sweeper.pruner=null)")
        if self.replicates and (self.replicate_key in fixed or self.replicate_key in space):
            where = "searched" if self.replicate_key in space else f"fixed to {fixed[self.replicate_key]}"
            raise SweeperConfigError(
                f"{self.replicate_key} is {where}, but hydra.sweeper.replicates={len(self.replicates)} sets it to "
                f"{self.replicates} (choose them with hydra.sweeper.replicate_values)")

    @staticmethod
    def _check_unit(study: optuna.Study) -> None:
        """Jobs return the validation mIoU in %; a study whose trials hold fractions of 1 (dcc before 2026-12-06)
        would mix the two scales: refused, in one line."""
        n = len(study.get_trials(deepcopy=False))
        if n and study.user_attrs.get(UNIT_ATTR) != PERCENT:
            raise SweeperConfigError(
                f"hydra.sweeper.study_name={study.study_name}: its {n} trials hold the validation mIoU as fractions "
                "of 1 (made before dcc logged it in %); values in % would mix with them: choose a new study_name "
                "(python -m dcc.report still reads the old study)")
        study.set_user_attr(UNIT_ATTR, PERCENT)

    def _describe(self, study: optuna.Study, fixed: dict[str, str]) -> None:
        """What the study report needs besides the trials: the fixed overrides, the replicates, the step budget."""
        task = {k: v for k, v in fixed.items() if not k.lstrip("+~").startswith(("hydra", "hparams_search"))}
        max_steps = OmegaConf.select(self.config, "trainer.max_steps", default=None) if self.config is not None else None
        study.set_user_attr("dcc.overrides", " ".join(_override(k, v) for k, v in task.items()))
        study.set_user_attr("dcc.replicates", {"key": self.replicate_key, "values": list(self.replicates)})
        if max_steps is not None:
            study.set_user_attr("dcc.max_steps", int(max_steps))

    def _trial_dir(self, number: int) -> str:
        sweep_dir = str(self.config.hydra.sweep.dir) if self.config is not None else "multirun"
        return os.path.abspath(os.path.join(sweep_dir, "trials", str(number)))

    def _take(self, study: optuna.Study, space: dict[str, Param], item: tuple[str, Any]) -> _Run:
        """The next trial to run: an interrupted one taken over with its parameters, or a new one asked for."""
        kind, old = item
        reported: set[int] = set()
        if kind == "orphan":
            # Optuna has no public call that hands back a RUNNING trial of an earlier process; FrozenTrial's
            # _trial_id (stable from Optuna 3.0 to 4.x) is the id its own Trial takes. Failing the trial and
            # enqueueing its parameters instead would leave a FAIL trial and a second number for one setting.
            # tests/test_optuna.py (an interrupted study reruns its running trial) breaks if this stops working.
            trial, values = optuna.Trial(study, old._trial_id), dict(old.params)
            reported = set(old.intermediate_values)
        else:
            trial = study.ask()
            values = {name: p.suggest(trial, name) for name, p in space.items()}
        trial.set_user_attr(OWNER_ATTR, _owner())
        if self.replicates:
            trial.set_user_attr("replicates", list(self.replicates))
        return _Run(trial, values, self._trial_dir(trial.number), reported)

    def _job_overrides(self, run: _Run, fixed: dict[str, str]) -> list[tuple[str, ...]]:
        """One job per replicate: the trial's values, the fixed overrides, the replicate, and where to report."""
        base = [_override(k, v) for k, v in {**run.params, **fixed}.items()]
        link = f"++hydra.job.env_set.{DIR_ENV}='{run.dir}'"
        if not self.replicates:
            return [(*base, link, f"++hydra.job.env_set.{REPLICATE_ENV}=0")]
        return [(*base, _override(self.replicate_key, r), link, f"++hydra.job.env_set.{REPLICATE_ENV}={r}")
                for r in self.replicates]

    def _launch(self, runs: list[_Run], fixed: dict[str, str], first: int) -> list[list[Any]]:
        """Launch the jobs of ``runs`` as jobs ``first``, ``first + 1``, ...; a launcher that fails fails them all.
        Returns each run's job results."""
        per_run = [self._job_overrides(run, fixed) for run in runs]
        flat = [ov for jobs in per_run for ov in jobs]
        try:
            rets = list(self.launcher.launch(flat, initial_job_idx=first))
        except Exception as exc:  # noqa: BLE001 - e.g. a SLURM job killed outright: fail its batch, go on
            log.error("launching trials %s failed: %s", [r.trial.number for r in runs], exc)
            rets = [exc] * len(flat)
        out, i = [], 0
        for jobs in per_run:
            out.append(rets[i:i + len(jobs)])
            i += len(jobs)
        return out

    def _n_jobs_per_trial(self) -> int:
        return max(1, len(self.replicates))

    def _run_batches(self, study: optuna.Study, space: dict[str, Param], fixed: dict[str, str],
                     pending: list[tuple[str, Any]], n_obj: int) -> None:
        while pending:
            batch = [self._take(study, space, item) for item in pending[:self.n_jobs]]
            del pending[:self.n_jobs]
            first, self.job_idx = self.job_idx, self.job_idx + len(batch) * self._n_jobs_per_trial()
            for run, rets in zip(batch, self._launch(batch, fixed, first)):
                self._record(study, run, rets, n_obj)

    def _run_async(self, study: optuna.Study, space: dict[str, Param], fixed: dict[str, str],
                   pending: list[tuple[str, Any]], n_obj: int) -> None:
        """``n_jobs`` trials at a time, one launch per trial (its replicates side by side); the next trial is asked
        for (with every result so far told to the sampler) as soon as a slot frees. Between, every
        ``poll_interval`` seconds, the running trials' reports go to the study and the pruner."""
        lock = threading.Lock()  # the study (ask / report / tell) and the job numbers, from the main and worker threads

        def launch(run: _Run, first: int) -> None:
            (rets,) = self._launch([run], fixed, first)
            with lock:
                self._record(study, run, rets, n_obj)

        active: dict[Future, _Run] = {}
        with ThreadPoolExecutor(max_workers=self.n_jobs) as pool:
            try:
                while pending or active:
                    while pending and len(active) < self.n_jobs:
                        with lock:
                            run = self._take(study, space, pending.pop(0))
                            first, self.job_idx = self.job_idx, self.job_idx + self._n_jobs_per_trial()
                        active[pool.submit(launch, run, first)] = run
                    done, _ = wait(list(active), timeout=self.poll_interval, return_when=FIRST_COMPLETED)
                    for future in done:
                        active.pop(future)
                        future.result()
                    if n_obj == 1:
                        with lock:
                            for run in active.values():
                                self._poll(run)
            except BaseException:
                for future in active:
                    future.cancel()
                raise

    def _poll(self, run: _Run, final: bool = False) -> None:
        """Report the steps every replicate of ``run`` has reached (the mean over them) and ask the pruner.
        ``final``: the jobs have ended; report what they left (the mean of those that reached a step), no pruning."""
        if run.prune_step is not None:
            return
        reports = read_reports(run.dir)
        # jobs that have all trained to the end (e.g. finished runs met again, which report their whole curve at once)
        # have nothing left to save: their values go to the rungs, the trial is not pruned (nor after they ended)
        done = len(reports) >= self._n_jobs_per_trial() and all(
            r.get("max_steps") and int(r.get("step", 0)) >= int(r["max_steps"]) for r in reports.values())
        by_step: dict[int, list[float]] = {}
        for rep in reports.values():
            for step, value in rep.get("history", []):
                by_step.setdefault(int(step), []).append(float(value))
        for step in sorted(by_step):
            if step in run.reported:
                continue
            values = by_step[step]
            if not final and len(values) < self._n_jobs_per_trial():
                break  # a replicate has not reached this step yet
            run.trial.report(sum(values) / len(values), step)
            run.reported.add(step)
            # asked even when the answer is not acted on: a rung pruner records the trial's value at its rungs then
            if self.pruner is not None and run.trial.should_prune() and not final and not done:
                run.prune_step = step
                run.trial.set_user_attr(PRUNED_AT, step)  # before the stop file: a killed sweeper does not rerun it
                request_stop(run.dir, step)
                log.info("trial %d pruned at step %d (value %.2f): its jobs stop at their next step",
                         run.trial.number, step, sum(values) / len(values))
                return

    def _steps(self, run: _Run, complete: bool) -> tuple[list[int | None], int | None]:
        """Steps each job trained (None: unknown) and the jobs' ``trainer.max_steps``."""
        reports = read_reports(run.dir)
        keys = [str(r) for r in self.replicates] or ["0"]
        max_steps = next((int(r["max_steps"]) for r in reports.values() if r.get("max_steps")), None)
        if max_steps is None and self.config is not None:
            max_steps = OmegaConf.select(self.config, "trainer.max_steps", default=None)
        steps = [int(reports[k]["step"]) if k in reports else (max_steps if complete else None) for k in keys]
        return steps, max_steps

    def _record(self, study: optuna.Study, run: _Run, rets: Sequence[Any], n_objectives: int) -> None:
        trial = run.trial
        if n_objectives == 1:
            self._poll(run, final=True)  # the last evaluations of jobs that ended between two polls
        if run.prune_step is not None:
            steps, max_steps = self._steps(run, complete=False)
            trial.set_user_attr("steps", steps)
            trial.set_user_attr("max_steps", max_steps)
            self._tell(study, trial, None, TrialState.PRUNED)
            log.info("trial %d: PRUNED at step %d (its jobs stopped at steps %s of %s)", trial.number, run.prune_step,
                     steps, max_steps)
            return
        names = [f"{self.replicate_key}={r}" for r in self.replicates] or [""]
        per_job: list[list[float]] = []
        try:
            for name, ret in zip(names, rets):
                try:
                    if isinstance(ret, BaseException):
                        raise ret
                    raw = ret.return_value  # raises the job's exception when the job failed
                    values = [float(raw)] if n_objectives == 1 else [float(v) for v in raw]
                    if len(values) != n_objectives or not all(math.isfinite(v) for v in values):
                        raise ValueError(f"the job returned {raw!r}, not {n_objectives} finite value(s)")
                except Exception as exc:  # noqa: BLE001
                    if name:
                        raise type(exc)(f"replicate {name}: {exc}") if _rebuildable(exc) else exc
                    raise
                per_job.append(values)
        except Exception as exc:  # noqa: BLE001
            error = f"{type(exc).__name__}: {exc}"
            trial.set_user_attr("error", error[:2000])
            trial.set_user_attr("traceback", "".join(traceback.format_exception(exc))[-4000:])
            self._tell(study, trial, None, TrialState.FAIL)
            log.warning("trial %d failed (recorded as FAIL, the search goes on): %s", trial.number, error)
            return
        values = [sum(v[i] for v in per_job) / len(per_job) for i in range(n_objectives)]
        if self.replicates:
            trial.set_user_attr("replicate_values", {str(r): v if n_objectives > 1 else v[0]
                                                     for r, v in zip(self.replicates, per_job)})
        steps, max_steps = self._steps(run, complete=True)
        trial.set_user_attr("steps", steps)
        trial.set_user_attr("max_steps", max_steps)
        self._tell(study, trial, values, TrialState.COMPLETE)
        log.info("trial %d: %s%s", trial.number, values if n_objectives > 1 else values[0],
                 f" (mean of {len(per_job)} replicates)" if self.replicates else "")

    @staticmethod
    def _tell(study: optuna.Study, trial: optuna.Trial | int, values: list[float] | None, state: TrialState) -> None:
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
        pruned = [t for t in trials if t.state == TrialState.PRUNED]
        results: dict[str, Any] = {
            "name": "optuna", "study_name": study.study_name, "storage": str(self.storage),
            "n_trials": len(trials), "n_complete": len(complete), "n_failed": len(failed), "n_pruned": len(pruned),
            "pruned": [{"number": t.number, "params": dict(t.params), "pruned_at_step": t.user_attrs.get(PRUNED_AT)}
                       for t in pruned],
            "failed": [{"number": t.number, "params": dict(t.params), "error": t.user_attrs.get("error", "")}
                       for t in failed],
        }
        if not complete:
            log.warning("no trial of study %r completed: no best parameters", study.study_name)
        elif len(study.directions) == 1:
            best = study.best_trial
            task = {k: v for k, v in fixed.items() if not k.lstrip("+~").startswith(("hydra", "hparams_search"))}
            overrides = " ".join(_override(k, v) for k, v in {**best.params, **task}.items())
            if self.replicates:  # every replicate of the trial: a sweep over them
                overrides = f"-m {overrides} {self.replicate_key}={','.join(str(r) for r in self.replicates)}"
            results.update(best_params=dict(best.params), best_value=best.value, best_trial=best.number,
                           best_overrides=overrides)
            mean = f" (mean of {len(self.replicates)} replicates)" if self.replicates else ""
            print(f"Best trial {best.number} of study {study.study_name!r}: value {best.value:.2f}{mean}\n"
                  f"  params: {dict(best.params)}\n  reproduce: python run.py {overrides}", flush=True)
        else:
            results["solutions"] = [{"number": t.number, "params": dict(t.params), "values": list(t.values)}
                                    for t in study.best_trials]
            print(f"{len(study.best_trials)} Pareto-optimal trials of study {study.study_name!r}", flush=True)
        path = os.path.join(str(self.config.hydra.sweep.dir), "optimization_results.yaml")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        OmegaConf.save(OmegaConf.create(results), path)
        print(f"Optuna results: {path}", flush=True)
