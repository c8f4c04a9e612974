"""Training end to end on a tiny digits setup: MLflow logging, resume equality, NaN stop, self-training, sweeps."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient

import dcc.method.losses
import dcc.engine.trainer
from dcc.engine import checkpoint
from dcc.engine.job import run, run_dir_for
from dcc.method.consistency import ConsistencyBranch
from tests.conftest import ROOT, compose_cfg


def _client(overrides: list[str]) -> MlflowClient:
    uri = next(o.split("=", 1)[1] for o in overrides if o.startswith("logger.tracking_uri="))
    return MlflowClient(tracking_uri=uri)


def test_few_step_run_logs_everything_to_mlflow(tiny_overrides, tmp_path):
    miou = run(compose_cfg(tiny_overrides), launch_dir=tmp_path)
    assert 0.0 <= miou <= 100.0  # in %
    client = _client(tiny_overrides)
    exp = client.get_experiment_by_name("digits")
    (r,) = client.search_runs([exp.experiment_id])
    assert r.info.status == "FINISHED"
    assert r.data.tags["loss"] == "ablation_viii" and r.data.tags["split"] == "1_4"
    assert r.data.tags["segnet"] == "deeplabv3plus" and r.data.tags["backbone"] == "resnet18"
    assert r.data.params["loss/temperature"] == "0.1" and r.data.params["trainer/max_steps"] == "6"
    assert r.data.metrics["val/final_miou"] == pytest.approx(miou)
    for name in ("train/loss", "train/loss_ce", "train/loss_u", "val/miou", "val/pixel_acc", "val/best_miou", "val/iou/background",
                 "diag/anchor_share_12", "diag/pf_pass_21", "diag/negatives_per_anchor_12", "diag/pos_cos_21",
                 "diag/pseudo_acc", "diag/anchor_target_acc_12"):
        assert name in r.data.metrics, name
    assert [m.step for m in client.get_metric_history(r.info.run_id, "val/miou")] == [3, 6]
    # flushed at every log (2), eval and checkpoint (3) step; the consistency loss exists from step start_step + 1 = 3
    assert [m.step for m in client.get_metric_history(r.info.run_id, "train/loss_ce")] == [2, 3, 4, 6]
    assert [m.step for m in client.get_metric_history(r.info.run_id, "train/loss_u")] == [3, 4, 6]
    assert [m.step for m in client.get_metric_history(r.info.run_id, "diag/anchor_share_12")] == [3, 4, 6]
    assert 0.0 <= r.data.metrics["diag/pseudo_acc"] <= 1.0
    assert r.data.params["split_manifest/num_labeled"] == "12" and len(r.data.params["split_manifest/sha256"]) == 64
    artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {"config.yaml", "checkpoint", "predictions", "split"} <= artifacts
    assert sorted(a.path for a in client.list_artifacts(r.info.run_id, "split")) == [
        "split/split_labeled.txt", "split/split_unlabeled.txt"]
    assert [a.path for a in client.list_artifacts(r.info.run_id, "predictions")] == ["predictions/predictions.png"]


class _Killed(Exception):
    pass


def test_killed_run_resumes_to_identical_metrics(tiny_overrides, tmp_path, monkeypatch):
    ref_over = tiny_overrides + [f"trainer.runs_root={tmp_path / 'ref'}", "logger=none"]
    ref = run(compose_cfg(ref_over), launch_dir=tmp_path)
    ref_state = checkpoint.load(run_dir_for(compose_cfg(ref_over), tmp_path) / "last.pt")

    calls = {"n": 0}
    original = ConsistencyBranch.__call__

    def dies_at_step_5(self, model, batch):
        calls["n"] += 1
        if calls["n"] == 3:  # the unsupervised branch runs from step 3 (start_step=2): this is step 5
            raise _Killed()
        return original(self, model, batch)

    monkeypatch.setattr(ConsistencyBranch, "__call__", dies_at_step_5)
    with pytest.raises(_Killed):
        run(compose_cfg(tiny_overrides), launch_dir=tmp_path)
    client = _client(tiny_overrides)
    (killed,) = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert killed.info.status == "FAILED"
    monkeypatch.setattr(ConsistencyBranch, "__call__", original)

    resumed = run(compose_cfg(tiny_overrides + ["trainer.resume=true"]), launch_dir=tmp_path)
    assert resumed == ref
    state = checkpoint.load(run_dir_for(compose_cfg(tiny_overrides), tmp_path) / "last.pt")
    for k, v in ref_state["model"].items():
        assert torch.equal(v, state["model"][k]), k
    (run_,) = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert run_.info.run_id == killed.info.run_id and run_.info.status == "FINISHED"  # the same MLflow run goes on
    assert [m.step for m in client.get_metric_history(run_.info.run_id, "val/miou")] == [3, 6]


def test_non_finite_loss_stops_naming_step_and_term_and_keeps_last_good_checkpoint(tiny_overrides, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = dcc.method.losses.F.cross_entropy

    def nan_at_step_5(*args, **kwargs):
        calls["n"] += 1
        out = original(*args, **kwargs)
        return out * float("nan") if calls["n"] == 5 else out

    monkeypatch.setattr(dcc.method.losses.F, "cross_entropy", nan_at_step_5)
    cfg = compose_cfg(tiny_overrides + ["logger=none"])
    with pytest.raises(dcc.engine.trainer.NonFiniteLossError, match=r"non-finite loss_ce .* at step 5"):
        run(cfg, launch_dir=tmp_path)
    state = checkpoint.load(run_dir_for(cfg, tmp_path) / "last.pt")
    assert state["step"] == 3 and all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_self_training_trains_teacher_then_student(tiny_overrides, tmp_path):
    cfg = compose_cfg(tiny_overrides + ["loss=st", "trainer.max_steps=3"])
    run(cfg, launch_dir=tmp_path)
    run_dir = run_dir_for(cfg, tmp_path)
    assert checkpoint.load(run_dir / "teacher" / "last.pt")["finished"]
    assert checkpoint.load(run_dir / "last.pt")["finished"]
    client = _client(tiny_overrides)
    (r,) = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert "teacher/val/miou" in r.data.metrics and "val/miou" in r.data.metrics


@pytest.mark.parametrize("preset", ["ablation_i", "ablation_ii", "ablation_v", "ablation_vi", "ablation_vii"])
def test_other_ablation_rows_train(tiny_overrides, tmp_path, preset):
    cfg = compose_cfg(tiny_overrides + [f"loss={preset}", "logger=none", "trainer.max_steps=3", "trainer.eval_every=3"])
    assert 0.0 <= run(cfg, launch_dir=tmp_path) <= 100.0  # in %


@pytest.mark.slow
def test_two_job_sweep_from_the_command_line(tiny_overrides, tmp_path):
    over = [o for o in tiny_overrides if not o.startswith("split=")]
    cmd = [sys.executable, str(ROOT / "run.py"), "-m", "loss=ablation_iv,ablation_viii", "split=1_8", *over]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = _client(tiny_overrides)
    runs = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]  # the sweep's parent run
    runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted((r.data.tags["loss"], r.data.tags["split"], r.info.status) for r in runs) == [
        ("ablation_iv", "1_8", "FINISHED"), ("ablation_viii", "1_8", "FINISHED")]
    assert proc.stdout.count("final val mIoU") == 2 and "mlflow ui --backend-store-uri" in proc.stdout


def test_suponly_and_cac_runs_are_identical_until_the_consistency_loss_starts(tiny_overrides, tmp_path):
    """A paired comparison: the CAC-only heads do not shift the RNG, so both runs see the same weights, batches and
    dropout masks up to loss.start_step (2 here), and differ after it."""
    def history(loss: str, sub: str) -> list[float]:
        over = [o.replace(str(tmp_path), str(tmp_path / sub)) for o in tiny_overrides] + [f"loss={loss}"]
        (tmp_path / sub).mkdir()  # the store's directory (a missing one is refused, not created)
        run(compose_cfg(over), launch_dir=tmp_path / sub)
        client = _client(over)
        (r,) = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
        return [m.value for m in client.get_metric_history(r.info.run_id, "train/loss_ce")]

    sup, cac = history("suponly", "a"), history("ablation_viii", "b")
    assert sup[0] == cac[0]  # logged at step 2: the mean CE of steps 1-2
    assert sup[1:] != cac[1:]
