"""The sweep scripts' `bench` profile: what it runs, and that every job it would launch composes and validates."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dcc.config import validate
from tests.conftest import ROOT, compose_cfg


def _commands(script: str, *args: str) -> list[list[str]]:
    out = subprocess.run(["bash", str(ROOT / "sweeps" / script), *args], env={**os.environ, "PYTHON": "echo"},
                         capture_output=True, text=True, check=True).stdout
    return [line.split()[2:] for line in out.splitlines() if line.strip()]  # drop "run.py -m"


def _jobs(argv: list[str]) -> list[list[str]]:
    """Expand the sweep's comma lists into one override list per job (hydra/ keys dropped)."""
    jobs: list[list[str]] = [[]]
    for arg in argv:
        key, value = arg.split("=", 1)
        if key.startswith("hydra"):
            continue
        jobs = [job + [f"{key}={v}"] for job in jobs for v in value.split(",")]
    return jobs


def test_seeds_bench_runs_the_grid_over_three_seeds_and_the_ceiling():
    commands = _commands("seeds.sh", "bench")  # the ceiling starts in the background: either may print first
    (grid,) = [c for c in commands if "hydra.job.name=seeds" in c]
    (ceiling,) = [c for c in commands if "hydra.job.name=seeds_ceiling" in c]
    assert "profile=bench" in grid and "hydra.launcher.max_parallel=2" in grid  # profile: conf/profile/bench.yaml
    assert "hydra.sweeper.max_batch_size=null" in grid  # one batch, run as a pool of two
    assert "hydra.job.name=seeds" in grid and "hydra.job.name=seeds_ceiling" in ceiling
    jobs = _jobs(grid)
    assert len(jobs) == 6 and {j[-1] for j in jobs} == {"trainer.seed=1", "trainer.seed=2", "trainer.seed=3"}
    (top,) = _jobs(ceiling)
    assert "split=full" in top and "loss=suponly" in top and "trainer.seed=1" in top
    # its own sweep directory: the grid and the ceiling start in the same second
    assert any(a.startswith("hydra.sweep.dir=") and a.endswith("_ceiling") for a in ceiling)
    assert jobs[0][0] == "loss=ablation_viii"  # the long jobs first, so that batches pair like with like


@pytest.mark.parametrize("script", ["seeds.sh", "ablation.sh"])
def test_every_bench_job_composes_and_validates(script):
    for argv in _commands(script, "bench"):
        for job in _jobs(argv)[:3]:
            cfg = compose_cfg([o.replace("split=1_8", "split='1_8'") for o in job])
            validate(cfg)
            assert cfg.dataset.name.name == "digits" and cfg.trainer.max_steps == 1500 and cfg.trainer.channels_last
            assert cfg.loss.start_step == 300 and cfg.dataset.scenes.pretrain.steps > 0


def test_the_optuna_bench_runs_two_jobs_at_a_time_searches_the_start_step_and_starts(tmp_path):
    (argv,) = _commands("optuna.sh", "bench")
    # one trial of two replicates at a time: two jobs; no max_batch_size (Optuna's sweeper has none)
    assert "hydra.sweeper.n_jobs=1" in argv and "hydra.sweeper.replicates=2" in argv
    assert not any("max_batch_size" in a for a in argv)
    assert not any(a.startswith("loss.start_step=") for a in argv)  # searched, not fixed by the profile
    assert 'loss.start_step:"choice(0,' in " ".join(argv)  # in ++hydra.sweeper.params (echo splits it at its spaces)
    assert any("SuccessiveHalvingPruner" in a for a in argv if a.startswith("hydra.sweeper.pruner="))
    # the real command composes with Optuna's sweeper and opens its study
    proc = subprocess.run(["bash", str(ROOT / "sweeps" / "optuna.sh"), "bench", "hydra.sweeper.n_trials=0"],
                          cwd=tmp_path, env={**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import optuna

    (name,) = optuna.get_all_study_names(f"sqlite:///{tmp_path / 'optuna.db'}")
    assert name == "lambda_gamma_tau-bench22-1500steps-2rep-r600"  # budget and replicates name the study
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    (baseline,) = study.get_trials(deepcopy=False)  # enqueued, not run: the preset (start step 300)
    assert baseline.user_attrs == {"enqueued": 0} and study.user_attrs["dcc.replicates"]["values"] == [1, 2]
    assert any("loss.start_step:300" in a for a in argv if a.startswith("hydra.sweeper.enqueue="))
    assert "hydra.sweeper.n_trials=12" in argv and "hydra.sweeper.sampler.n_startup_trials=4" in argv
