"""``hydra/sweeper: dcc_optuna``: the persistent Optuna study sweeper of :mod:`dcc.sweeps.optuna_sweeper`."""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class OptunaStudySweeperConf:
    _target_: str = "hydra_plugins.dcc_plugins.sweeper.OptunaStudySweeper"
    # the sweeper builds sampler and pruner itself, so that a wrong one fails in one line naming the key
    _recursive_: bool = False
    # an Optuna sampler to instantiate, e.g. {_target_: optuna.samplers.TPESampler, seed: 1}; a grid:
    # {_target_: optuna.samplers.GridSampler, _partial_: true} (the grid comes from params)
    sampler: Any = field(default_factory=lambda: {"_target_": "optuna.samplers.TPESampler", "seed": None})
    direction: Any = "minimize"  # minimize | maximize, or a list of them
    storage: Optional[str] = None  # e.g. sqlite:///optuna.db; None: in memory, lost at exit
    study_name: Optional[str] = None
    n_trials: int = 20  # trials of the whole study (a repeated command continues it up to this number)
    n_jobs: int = 1  # trials launched at a time
    params: Optional[Dict[str, str]] = None  # key: Hydra sweep, e.g. loss.weight: tag(log, interval(0.01, 1))
    # parameter sets tried first (skipped when already in the study), e.g. [{loss.weight: 0.1, ...}]
    enqueue: Optional[List[Dict[str, Any]]] = None
    # any Optuna pruner, e.g. {_target_: optuna.pruners.MedianPruner, n_startup_trials: 4, n_warmup_steps: 300};
    # None: no pruning. Needs hydra/launcher=local or slurm (trials run asynchronously).
    pruner: Any = None
    replicates: int = 1  # jobs per trial, differing only by replicate_key; the trial's value is their mean
    replicate_key: str = "trainer.seed"
    replicate_values: Optional[List[Any]] = None  # None: 1 .. replicates
    poll_interval: float = 2.0  # seconds between two reads of the running trials' intermediate values


ConfigStore.instance().store(group="hydra/sweeper", name="dcc_optuna", node=OptunaStudySweeperConf, provider="dcc")


class OptunaStudySweeper(Sweeper):
    def __init__(self, **kwargs: Any) -> None:
        from dcc.engine.errors import stop_sweep
        from dcc.sweeps.optuna_sweeper import StudySweeper, SweeperConfigError

        try:
            self.sweeper = StudySweeper(**kwargs)
        except SweeperConfigError as exc:  # one line, no traceback
            stop_sweep(str(exc))

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        from dcc.engine.errors import stop_sweep
        from dcc.sweeps.optuna_sweeper import SweeperConfigError

        try:
            return self.sweeper.sweep(arguments)
        except SweeperConfigError as exc:
            stop_sweep(str(exc))
