"""``hydra/launcher=slurm`` and ``hydra/launcher=local``: hydra-submitit-launcher's launchers with the steps of
:mod:`dcc.sweeps.launcher` (SIGTERM requeues a SLURM job; local jobs take turns over ``visible_gpus``).

Hydra instantiates a launcher only from a class defined under ``hydra_plugins``: hence these two shims.
"""

from __future__ import annotations

from typing import Any

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher as _SubmititLocal
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _SubmititSlurm

from dcc.sweeps.launcher import (gpu_pool, job_state, launch_pooled, max_parallel, prepare_local_job,  # noqa: F401
                                 requeue_handler, requeue_on_sigterm)


class SlurmLauncher(_SubmititSlurm):
    concurrent_launches = True  # the Optuna sweeper may launch one trial per thread (each its own SLURM job)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        requeue_on_sigterm()
        return super().__call__(*args, **kwargs)


class LocalLauncher(_SubmititLocal):
    def __init__(self, **params: Any) -> None:
        self.max_parallel = max_parallel(params)
        self.gpu_pool = gpu_pool(params)
        super().__init__(**params)

    @property
    def concurrent_launches(self) -> bool:
        """Whether the Optuna sweeper may launch one trial per thread: not with ``visible_gpus`` (GPUs are handed
        out by job number, which asynchronous trials would give to a busy GPU)."""
        return not self.gpu_pool

    def launch(self, job_overrides: Any, initial_job_idx: int) -> Any:
        return launch_pooled(super().launch, job_overrides, initial_job_idx, self.max_parallel)

    def __call__(self, sweep_overrides: Any, job_dir_key: str, job_num: int, *args: Any, **kwargs: Any) -> Any:
        prepare_local_job(self.params, self.gpu_pool, job_num)
        return super().__call__(sweep_overrides, job_dir_key, job_num, *args, **kwargs)
