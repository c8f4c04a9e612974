"""SIGTERM / SIGUSR1 mid-run: checkpoint at the step boundary, exit, and resume with no gap in the metrics."""

from __future__ import annotations

import os
import signal

import pytest
from mlflow.tracking import MlflowClient

from dcc.engine import checkpoint
from dcc.engine.job import run, run_dir_for
from dcc.method.consistency import ConsistencyBranch
from dcc.engine.preemption import PreemptionGuard, requeued
from tests.conftest import compose_cfg


def test_guard_records_then_hands_on_to_the_previous_handler():
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    try:
        with PreemptionGuard() as guard:
            os.kill(os.getpid(), signal.SIGUSR1)
            assert guard.requested and seen == []  # only recorded: the loop decides when to stop
            with pytest.raises(SystemExit) as exit_:
                guard.hand_on()
        assert seen == [signal.SIGUSR1] and exit_.value.code == 128 + signal.SIGUSR1
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_requeued_reads_slurm_restart_count(monkeypatch):
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert not requeued()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert requeued()


def test_sigterm_mid_run_checkpoints_then_requeue_resumes_the_same_run(tiny_overrides, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = ConsistencyBranch.__call__

    def sigterm_at_step_4(self, model, batch):
        calls["n"] += 1
        if calls["n"] == 2:  # branch runs from step 3: this is step 4, between checkpoints (3 and 6)
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, model, batch)

    monkeypatch.setattr(ConsistencyBranch, "__call__", sigterm_at_step_4)
    cfg = compose_cfg(tiny_overrides + ["trainer.log_every=1"])
    with pytest.raises(SystemExit) as exit_:
        run(cfg, launch_dir=tmp_path)
    assert exit_.value.code == 128 + signal.SIGTERM
    state = checkpoint.load(run_dir_for(cfg, tmp_path) / "last.pt")
    assert state["step"] == 4 and not state["finished"]
    client = MlflowClient(tracking_uri=cfg.logger.tracking_uri)
    (killed,) = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert killed.info.status == "KILLED"

    monkeypatch.setattr(ConsistencyBranch, "__call__", original)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # what a requeued SLURM job sees: resumes without being told
    run(compose_cfg(tiny_overrides + ["trainer.log_every=1"]), launch_dir=tmp_path)
    (done,) = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert done.info.run_id == killed.info.run_id and done.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(done.info.run_id, "train/loss_ce")]
    assert steps == [1, 2, 3, 4, 5, 6]  # no gap, no duplicate


def test_fit_under_restart_refuses_the_checkpoint_it_would_overwrite(tiny_overrides, tmp_path):
    """A restart is the job's (dcc.engine.resume sets the old run aside first); a direct caller of fit() that leaves a
    last.pt in place gets one message, and the checkpoint is untouched."""
    import torch

    from dcc.data.build import build_data
    from dcc.engine.tracking import NullTracker
    from dcc.engine.trainer import fit

    cfg = compose_cfg(tiny_overrides + ["trainer.resume=restart", "trainer.max_steps=1"])
    state = tmp_path / "state"
    state.mkdir()
    (state / "last.pt").write_bytes(b"an earlier run")
    with pytest.raises(checkpoint.CheckpointError, match=r"trainer.resume=restart with .*last.pt present"):
        fit(cfg, build_data(cfg), torch.device("cpu"), NullTracker(), state)
    assert (state / "last.pt").read_bytes() == b"an earlier run"
