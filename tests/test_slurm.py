"""Sweeps through a real SLURM cluster (scripts/local_slurm.sh): jobs go through sbatch, SIGTERM requeues.

Skipped, saying why, where SLURM cannot run here (packages not installed, not root).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra.experimental.callback import Callback
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT
from tests.test_sweep_parent import sweep_overrides, tracking_uri

SCRIPT = ROOT / "scripts" / "local_slurm.sh"
# One cluster per module: under pytest-xdist these tests all run in one worker, one after another.
pytestmark = pytest.mark.xdist_group("slurm")

LAUNCH = ["hydra/launcher=slurm", "cluster@hydra.launcher=local_slurm", "hydra/callbacks=mlflow_parent"]


def why_no_slurm() -> str | None:
    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel") if shutil.which(b) is None]
    if missing:
        return (f"SLURM is not installed ({', '.join(missing)} not found); "
                "to run these tests: apt-get install -y slurm-wlm munge")
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (slurmd runs as root); run the tests as root"
    return None


def _free_port_pair() -> int:
    for _ in range(50):
        port = random.randint(20000, 40000)
        try:
            for p in (port, port + 1):
                with socket.socket() as s:
                    s.bind(("", p))
            return port
        except OSError:
            continue
    raise RuntimeError("no free pair of ports")


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory):
    why = why_no_slurm()
    if why:
        pytest.skip(why)
    env = {**os.environ, "DCC_SLURM_DIR": str(tmp_path_factory.mktemp("slurm")), "DCC_SLURM_PORT": str(_free_port_pair())}
    # started as a user who exported OMP_NUM_THREADS=1 would (nproc alone then reports 1 core)
    proc = subprocess.run(["bash", str(SCRIPT), "start"], env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, f"scripts/local_slurm.sh start failed:\n{proc.stderr[-3000:]}"
    conf = proc.stdout.strip().splitlines()[-1].split("=", 1)[1]
    yield {**env, "SLURM_CONF": conf, "PYTHONPATH": str(ROOT)}
    subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=120)


def _run(args, cwd, env, timeout=900):
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _children(over):
    client = MlflowClient(tracking_uri=tracking_uri(over))
    exp = client.get_experiment_by_name("digits")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`dcc.sweep` = 'true'")
    return client, parent, client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")


def test_the_cluster_offers_every_core_whatever_omp_num_threads_says(slurm_env):
    conf = Path(slurm_env["SLURM_CONF"]).read_text()
    assert f" CPUs={len(os.sched_getaffinity(0))} " in conf, conf


@pytest.mark.slow
def test_two_job_sweep_runs_through_sbatch(slurm_env, tiny_overrides, tmp_path):
    over = sweep_overrides(tiny_overrides)
    proc = _run(["-m", *LAUNCH, "hydra.job.name=ablation_slurm", "loss=suponly,ablation_viii", "split=1_8", *over],
                tmp_path, slurm_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, parent, children = _children(over)
    assert parent.data.tags["dcc.launcher"] == "SlurmLauncher" and parent.info.status == "FINISHED"
    assert sorted((r.data.tags["loss"], r.info.status) for r in children) == [
        ("ablation_viii", "FINISHED"), ("suponly", "FINISHED")]
    # the two jobs were the two tasks of one job array submitted with sbatch
    (script,) = tmp_path.glob("multirun/*/*/.submitit/*/*_submission.sh")
    assert "#SBATCH --array=0-1" in script.read_text() and "#SBATCH --job-name=ablation_slurm" in script.read_text()
    logs = sorted(tmp_path.glob("multirun/*/*/.submitit/*_*/*_log.out"))
    assert len(logs) == 2 and all("Job completed successfully" in f.read_text() for f in logs)


@pytest.mark.slow
def test_two_task_job_trains_one_model_with_both_ranks(slurm_env, tiny_overrides, tmp_path):
    """trainer.devices=2: one sbatch job with 2 tasks; each joins the process group from SLURM's variables
    (gloo on CPU), and the pair trains one model: one MLflow run, written by rank 0."""
    over = sweep_overrides(tiny_overrides) + ["trainer.devices=2", "trainer.device=cpu", "trainer.num_workers=0"]
    proc = _run(["-m", *LAUNCH, "hydra.job.name=ddp_slurm", "loss=ablation_viii", "split=1_8", *over], tmp_path, slurm_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, parent, children = _children(over)
    (run,) = children
    assert run.info.status == "FINISHED" and run.data.params["trainer/devices"] == "2"
    (script,) = tmp_path.glob("multirun/*/*/.submitit/*/*_submission.sh")
    assert "#SBATCH --ntasks-per-node=2" in script.read_text()
    logs = sorted(tmp_path.glob("multirun/*/*/.submitit/*/*_log.out"))
    assert len(logs) == 2
    texts = [f.read_text() for f in logs]
    for rank, text in enumerate(texts):
        assert f"rank {rank} of 2 (gloo, cpu)" in text and "Job completed successfully" in text, text[-2000:]
    assert "val mIoU" in texts[0] and "val mIoU" not in texts[1]  # only rank 0 reports


class SlowCheckpoints(Callback):
    """Test helper, run by Hydra inside the SLURM job: every checkpoint takes a second longer, which
    leaves time to signal the job between two of them."""

    def on_job_start(self, config, **kwargs) -> None:
        from dcc.engine import checkpoint

        save = checkpoint.save_atomic

        def slow_save(*args, **kw):
            save(*args, **kw)
            time.sleep(1.0)

        checkpoint.save_atomic = slow_save


@pytest.mark.slow
def test_sigterm_requeues_the_job_which_finishes_its_mlflow_run_without_gaps(slurm_env, tiny_overrides, tmp_path):
    over = sweep_overrides(tiny_overrides) + ["trainer.max_steps=12", "trainer.eval_every=3", "trainer.checkpoint_every=3"]
    args = ["-m", *LAUNCH, "hydra.job.name=requeue", "loss=suponly", "split=1_8", *over,
            "+hydra.callbacks.slow._target_=tests.test_slurm.SlowCheckpoints"]
    sweep = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args], cwd=tmp_path, env=slurm_env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and sweep.poll() is None and not list(tmp_path.glob("runs/digits/*/last.pt")):
            time.sleep(0.2)
        assert sweep.poll() is None, "the sweep ended before the job could be signalled"
        jobs = subprocess.run(["squeue", "-h", "-o", "%i"], env=slurm_env, capture_output=True, text=True).stdout.split()
        assert len(jobs) == 1, jobs
        # what SLURM does on preemption (and `scancel --signal=TERM` by hand): SIGTERM to the job's processes
        subprocess.run(["scancel", "--signal=TERM", jobs[0]], env=slurm_env, check=True)
        # SLURM holds a requeued job for about two minutes (Reason=BeginTime); the test does not wait for that
        while time.time() < deadline and sweep.poll() is None:
            reason = subprocess.run(["squeue", "-h", "-j", jobs[0], "-o", "%r"], env=slurm_env, capture_output=True,
                                    text=True).stdout.strip()
            if reason == "BeginTime":
                subprocess.run(["scontrol", "update", f"JobId={jobs[0]}", "StartTime=now"], env=slurm_env, check=True)
                break
            time.sleep(0.5)
        out, _ = sweep.communicate(timeout=600)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == 0, out[-3000:]
    client, parent, children = _children(over)
    (run,) = children  # the requeued job continued the same MLflow run
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/miou")]
    assert sorted(set(steps)) == [3, 6, 9, 12], steps  # no gap
    (log,) = tmp_path.glob("multirun/*/*/.submitit/*/*_log.out")
    text = log.read_text()
    assert "SIGTERM" in text and text.count("Starting with JobEnvironment") == 2, text[-3000:]


@pytest.mark.parametrize("state, requeued", [("RUNNING", True), ("COMPLETING", False), (None, True)])
def test_sigterm_requeues_a_running_job_but_not_a_cancelled_one(state, requeued):
    """``scancel`` sends SIGTERM too, after slurmctld has marked the job COMPLETING: that one must not
    requeue (else a job could not be cancelled); preemption's SIGTERM finds the job RUNNING."""
    from dcc.sweeps.launcher import requeue_handler

    calls = []
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR2)}
    try:
        handler = requeue_handler(lambda signum, frame: calls.append(signum), "7_1", signal.SIGUSR2,
                                  state=lambda job_id: state)
        if requeued:
            handler(signal.SIGTERM, None)
        else:
            with pytest.raises(SystemExit):
                handler(signal.SIGTERM, None)
        assert calls == ([signal.SIGTERM] if requeued else [])
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN  # the requeue's own SIGTERM is ignored
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


@pytest.mark.slow
def test_a_pruned_optuna_trial_ends_its_sbatch_job_cleanly_with_its_checkpoint(slurm_env, tiny_overrides, tmp_path):
    """An Optuna study through sbatch with a pruner that stops every trial at step 6: the job notices the stop file
    after its next step, writes its checkpoint, ends its MLflow run as KILLED with pruned=true and exits 0
    (submitit: "Job completed successfully", not requeued); the trial is PRUNED."""
    import optuna
    from optuna.trial import TrialState

    from tests.test_optuna import SEARCH

    over = [o for o in sweep_overrides(tiny_overrides) if not o.startswith("trainer.")] + [
        o for o in tiny_overrides if o.startswith("trainer.") and "max_steps" not in o and "eval_every" not in o]
    proc = _run(["-m", *LAUNCH, SEARCH, "hydra.sweeper.n_trials=1", "hydra.sweeper.n_jobs=1",
                 "hydra.sweeper.study_name=sp", "hydra.sweeper.poll_interval=0.2",
                 "hydra.sweeper.pruner={_target_:optuna.pruners.ThresholdPruner,lower:99,n_warmup_steps:6}",
                 *over, "trainer.max_steps=60", "trainer.eval_every=3", "trainer.log_every=1"], tmp_path, slurm_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (trial,) = optuna.load_study(study_name="sp", storage=f"sqlite:///{tmp_path / 'optuna.db'}").trials
    assert trial.state == TrialState.PRUNED and trial.user_attrs["pruned_at_step"] == 6
    assert 6 < trial.user_attrs["steps"][0] < 60
    _, parent, (run,) = _children(over)
    assert run.info.status == "KILLED" and run.data.tags["pruned"] == "true" and run.data.tags["pruned_at_step"] == "6"
    (log,) = tmp_path.glob("multirun/*/*/.submitit/*/*_log.out")
    text = log.read_text()
    assert "pruned by the Optuna study at step 6" in text and "Job completed successfully" in text, text[-2000:]
    assert "Requeued" not in text and "requeue" not in text.lower()
    (run_dir,) = [p for p in (tmp_path / "runs" / "digits").iterdir() if p.is_dir()]
    assert (run_dir / "last.pt").exists() and not (run_dir / "result.json").exists()
