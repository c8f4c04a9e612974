"""Runs that never lose work, fail fast in one message, and don't fill the disk (issue 12)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

import dcc.engine.trainer
from dcc.engine import checkpoint
from dcc.sweeps import report
from dcc.engine.job import run, run_dir_for
from dcc.method.consistency import ConsistencyBranch
from dcc.data.cache import read_npz
from dcc.engine.preflight import PreflightError
from dcc.engine.visualize import prediction_grid
from tests.conftest import ROOT, compose_cfg


def _runs(cfg):
    client = MlflowClient(tracking_uri=cfg.logger.tracking_uri)
    return client, client.search_runs([client.get_experiment_by_name("digits").experiment_id])


def run_py(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None) if "HYDRA_FULL_ERROR" not in (env or {}) else None
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


class _Killed(Exception):
    pass


def _die_at_step_5(monkeypatch):
    calls = {"n": 0}
    original = ConsistencyBranch.__call__

    def dies(self, model, batch):
        calls["n"] += 1
        if calls["n"] == 3:  # the branch runs from step 3 (start_step=2): this is step 5, after the checkpoint of step 3
            raise _Killed()
        return original(self, model, batch)

    monkeypatch.setattr(ConsistencyBranch, "__call__", dies)
    return original


# ------------------------------------------------------------------------------------- resume decision
def test_rerun_of_an_unfinished_run_continues_it_and_removes_stale_tmp_files(tiny_overrides, tmp_path, monkeypatch,
                                                                             capsys):
    cfg = compose_cfg(tiny_overrides)
    original = _die_at_step_5(monkeypatch)
    with pytest.raises(_Killed):
        run(cfg, launch_dir=tmp_path)
    run_dir = run_dir_for(cfg, tmp_path)
    assert checkpoint.load(run_dir / "last.pt")["step"] == 3
    stale = run_dir / "last.pt.k1ll3d.tmp"  # what kill -9 during a checkpoint write leaves
    stale.write_bytes(b"\0" * 1000)
    monkeypatch.setattr(ConsistencyBranch, "__call__", original)
    capsys.readouterr()

    run(compose_cfg(tiny_overrides), launch_dir=tmp_path)  # the same command, no trainer.resume
    out = capsys.readouterr().out
    assert f"resuming {run_dir} from step 3" in out
    assert not stale.exists()
    client, (r,) = _runs(cfg)  # the same MLflow run went on
    assert r.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(r.info.run_id, "val/miou")] == [3, 6]


def test_rerun_of_a_finished_run_reports_it_without_training(tiny_overrides, tmp_path, monkeypatch, capsys):
    cfg = compose_cfg(tiny_overrides)
    first = run(cfg, launch_dir=tmp_path)
    run_dir = run_dir_for(cfg, tmp_path)
    before = (run_dir / "last.pt").stat().st_mtime_ns
    capsys.readouterr()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(dcc.engine.trainer, "fit", no_training)
    again = run(compose_cfg(tiny_overrides), launch_dir=tmp_path)
    out = capsys.readouterr().out
    assert again == first and f"already finished: {run_dir} (final val mIoU {first:.2f}%" in out
    assert (run_dir / "last.pt").stat().st_mtime_ns == before
    _, runs = _runs(cfg)
    assert len(runs) == 1


def test_a_finished_run_met_by_an_optuna_trial_gives_the_sweeper_its_curve(tiny_overrides, tmp_path, monkeypatch):
    # a trial whose run has finished (e.g. the baseline, trained by an earlier sweep) takes part in the pruner's rungs
    import json

    from dcc.engine.trial_link import DIR_ENV, REPLICATE_ENV

    cfg = compose_cfg(tiny_overrides)
    run(cfg, launch_dir=tmp_path)
    run_dir = run_dir_for(cfg, tmp_path)
    result = json.loads((run_dir / "result.json").read_text())
    curve = [[3, pytest.approx(100 * result["history"][0][1])], [6, pytest.approx(100 * result["final_miou"])]]
    assert [s for s, _ in result["history"]] == [3, 6]
    for kept in (True, False):  # result.json with the curve; one written before it kept it: read from last.pt
        if not kept:
            del result["history"]
            (run_dir / "result.json").write_text(json.dumps(result))
        trial_dir = tmp_path / f"trial-{kept}"
        monkeypatch.setenv(DIR_ENV, str(trial_dir))
        monkeypatch.setenv(REPLICATE_ENV, "2")
        run(compose_cfg(tiny_overrides), launch_dir=tmp_path)
        report = json.loads((trial_dir / "replicate-2.json").read_text())
        assert report["history"] == curve and report["step"] == 6 and report["pruned"] is False


def test_restart_moves_the_previous_run_aside_and_says_where(tiny_overrides, tmp_path, capsys):
    over = tiny_overrides + ["trainer.max_steps=3"]
    cfg = compose_cfg(over)
    run(cfg, launch_dir=tmp_path)
    run_dir = run_dir_for(cfg, tmp_path)
    old_state = checkpoint.load(run_dir / "last.pt")
    capsys.readouterr()
    run(compose_cfg(over + ["trainer.resume=restart"]), launch_dir=tmp_path)
    out = capsys.readouterr().out
    (aside,) = run_dir.parent.glob(run_dir.name + ".replaced-*")
    assert f"moved the previous run (checkpoint at step 3) to {aside}" in out
    kept = checkpoint.load(aside / "last.pt")  # nothing deleted
    assert all(torch.equal(v, kept["model"][k]) for k, v in old_state["model"].items())
    assert checkpoint.load(run_dir / "last.pt")["finished"]
    _, runs = _runs(cfg)
    assert len(runs) == 2  # a new MLflow run; the old one is kept


def test_a_second_job_on_a_run_directory_in_training_fails_naming_the_holder(tiny_overrides, tmp_path):
    from dcc.engine import resume

    cfg = compose_cfg(tiny_overrides + ["trainer.max_steps=2"])
    run_dir = run_dir_for(cfg, tmp_path)
    with resume.hold(run_dir):  # as the job that trains it (a separate open file: flock conflicts in-process too)
        with pytest.raises(PreflightError, match=f"{run_dir} is being trained by process {os.getpid()} on "):
            run(cfg, launch_dir=tmp_path)
        assert not run_dir.exists()  # nothing written by the refused job
        exp = MlflowClient(tracking_uri=cfg.logger.tracking_uri).get_experiment_by_name("digits")
        assert exp is None or _runs(cfg)[1] == []
    assert run(compose_cfg(tiny_overrides + ["trainer.max_steps=2"]), launch_dir=tmp_path) >= 0  # released: it trains
    assert (run_dir / "result.json").exists()


def test_resume_true_without_checkpoint_says_so(tiny_overrides, tmp_path, capsys):
    cfg = compose_cfg(tiny_overrides + ["trainer.max_steps=3", "trainer.resume=true", "logger=none"])
    run(cfg, launch_dir=tmp_path)
    assert f"no checkpoint in {run_dir_for(cfg, tmp_path)}, starting from step 0" in capsys.readouterr().out


def test_resume_rejects_unknown_values(tiny_overrides):
    from dcc.config import ConfigError, validate

    with pytest.raises(ConfigError, match=r"trainer.resume must be one of auto, true, restart"):
        validate(compose_cfg(tiny_overrides + ["trainer.resume=yes"]))


# ------------------------------------------------------------------------------------------- SIGINT
def test_ctrl_c_checkpoints_at_the_step_boundary_and_prints_the_command_that_continues(
        tiny_overrides, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    original = ConsistencyBranch.__call__

    def sigint_at_step_4(self, model, batch):
        calls["n"] += 1
        if calls["n"] == 2:  # step 4, between the checkpoints of steps 3 and 6
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, model, batch)

    monkeypatch.setattr(ConsistencyBranch, "__call__", sigint_at_step_4)
    monkeypatch.setattr(sys, "argv", ["run.py", "loss=ablation_viii", "trainer.resume=restart"])
    cfg = compose_cfg(tiny_overrides + ["trainer.log_every=1"])
    with pytest.raises(SystemExit) as exit_:
        run(cfg, launch_dir=tmp_path)
    assert exit_.value.code == 128 + signal.SIGINT
    assert checkpoint.load(run_dir_for(cfg, tmp_path) / "last.pt")["step"] == 4
    out = capsys.readouterr().out
    assert "SIGINT: checkpoint written at step 4" in out
    assert "continue with: python run.py loss=ablation_viii\n" in out  # restart dropped: the default continues
    client, (killed,) = _runs(cfg)
    assert killed.info.status == "KILLED"

    monkeypatch.setattr(ConsistencyBranch, "__call__", original)
    run(compose_cfg(tiny_overrides + ["trainer.log_every=1"]), launch_dir=tmp_path)
    _, (done,) = _runs(cfg)
    assert done.info.run_id == killed.info.run_id and done.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(done.info.run_id, "train/loss_ce")] == [1, 2, 3, 4, 5, 6]


# ------------------------------------------------------------------------------------------- fail fast
def test_unreachable_tracking_server_fails_in_one_line_within_30_s(tmp_path):
    start = time.monotonic()
    proc = run_py([f"dataset.root={tmp_path / 'data'}"], tmp_path, env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})
    elapsed = time.monotonic() - start
    assert proc.returncode != 0 and elapsed < 30, (elapsed, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "http://127.0.0.1:9" in lines[0] and "MLFLOW_TRACKING_URI" in lines[0], proc.stderr
    assert not (tmp_path / "runs").exists()


def test_config_error_is_one_message_without_traceback_unless_asked(tmp_path):
    proc = run_py(["task=summary", "loss.pos_threshold=1.5"], tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: loss.pos_threshold (gamma) must be in [0, 1), got 1.5"
    full = run_py(["task=summary", "loss.pos_threshold=1.5"], tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert full.returncode != 0 and "Traceback" in full.stderr and "ConfigError" in full.stderr


def test_summary_needs_no_weights(tiny_overrides, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DCC_RESNET50_WEIGHTS", raising=False)
    run(compose_cfg(["task=summary", "experiment=voc_deeplabv3plus_r50"]), launch_dir=tmp_path)
    assert capsys.readouterr().out.startswith("params: total=")


@pytest.mark.new_store
def test_missing_weights_and_data_fail_before_any_run_exists(tiny_overrides, tmp_path, monkeypatch):
    monkeypatch.delenv("DCC_RESNET50_WEIGHTS", raising=False)
    with pytest.raises(PreflightError, match="backbone.weights: environment variable DCC_RESNET50_WEIGHTS is not set"):
        run(compose_cfg(tiny_overrides + ["experiment=voc_deeplabv3plus_r50"]), launch_dir=tmp_path)
    with pytest.raises(PreflightError, match=f"backbone.weights: no such file {tmp_path}/none.pth"):
        run(compose_cfg(tiny_overrides + [f"backbone.weights={tmp_path}/none.pth"]), launch_dir=tmp_path)
    from dcc.data.files import LayoutError

    with pytest.raises(LayoutError, match="voc: missing"):
        run(compose_cfg(tiny_overrides + ["experiment=none", "dataset=voc", f"dataset.root={tmp_path / 'novoc'}"]), launch_dir=tmp_path)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_help_starts_with_the_project_header(tmp_path):
    out = run_py(["--help"], tmp_path).stdout
    assert out.startswith("dcc: semi-supervised semantic segmentation")
    head = out.split("== Configuration groups ==")[0]
    for word in ("task=train", "task=summary", "task=predict", "dataset", "split", "segnet", "backbone", "loss"):
        assert word in head, word


# ------------------------------------------------------------------------------------------------- disk
def test_mlflow_gets_the_model_weights_only_by_default(tiny_overrides, tmp_path):
    cfg = compose_cfg(tiny_overrides + ["trainer.max_steps=3"])
    run(cfg, launch_dir=tmp_path)
    client, (r,) = _runs(cfg)
    assert [a.path for a in client.list_artifacts(r.info.run_id, "checkpoint")] == ["checkpoint/model.pt"]
    local = client.download_artifacts(r.info.run_id, "checkpoint/model.pt", str(tmp_path / "dl"))
    state = torch.load(local, weights_only=True)
    assert set(state) == {"model"}
    full = checkpoint.load(run_dir_for(cfg, tmp_path) / "last.pt")
    assert all(torch.equal(v, full["model"][k]) for k, v in state["model"].items())
    assert not list(run_dir_for(cfg, tmp_path).rglob("model.pt"))  # the run directory keeps one full checkpoint


def test_mlflow_checkpoint_switch(tiny_overrides, tmp_path):
    cfg = compose_cfg(tiny_overrides + ["trainer.max_steps=3", "logger.log_checkpoint=off"])
    run(cfg, launch_dir=tmp_path)
    client, (r,) = _runs(cfg)
    assert "checkpoint" not in {a.path for a in client.list_artifacts(r.info.run_id)}
    cfg = compose_cfg(tiny_overrides + ["trainer.max_steps=3", "logger.log_checkpoint=full", "trainer.seed=1"])
    run(cfg, launch_dir=tmp_path)
    (full,) = [x for x in _runs(cfg)[1] if x.data.tags["seed"] == "1"]
    assert [a.path for a in client.list_artifacts(full.info.run_id, "checkpoint")] == ["checkpoint/last.pt"]


def test_stale_tmp_files_are_removed(tmp_path):
    last = tmp_path / "last.pt"
    checkpoint.save_atomic({"step": 2}, last)
    stale = [tmp_path / "last.pt.abc123.tmp", tmp_path / "last.pt.zz.tmp"]
    for p in stale:
        p.write_bytes(b"partial")
    other = tmp_path / "notes.tmp"
    other.write_text("keep")
    assert checkpoint.remove_stale_tmp(last) == sorted(stale)
    assert last.exists() and other.exists() and not any(p.exists() for p in stale)
    assert checkpoint.peek(last) == {"step": 2, "finished": False, "best_miou": None}


def test_corrupt_dataset_cache_is_named_and_regenerated(tiny_overrides, tmp_path, capsys):
    from dcc.data.build import load_sources

    cfg = compose_cfg(tiny_overrides[:-3] + [f"dataset.root={tmp_path}"])
    train, _ = load_sources(cfg.dataset)
    (cache,) = (tmp_path / "digits").glob("*.npz")
    cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])  # a truncated write
    capsys.readouterr()
    again, _ = load_sources(cfg.dataset)
    assert f"cache file {cache} is damaged" in capsys.readouterr().out
    assert all(np.array_equal(train.load(i)[0], again.load(i)[0]) for i in range(len(train)))
    assert read_npz(cache) is not None  # rewritten whole


# -------------------------------------------------------------------------------------- readable runs
def test_prediction_grid_has_a_legend_with_class_names():
    target = torch.tensor([[0, 1], [255, 1]])
    pred = torch.tensor([[0, 2], [2, 1]])
    fig = prediction_grid([(torch.zeros(3, 2, 2), target, pred)], [0.0] * 3, [1.0] * 3,
                          class_names=["background", "aeroplane", "bicycle"])
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["background", "aeroplane", "bicycle", "ignore"]


def test_run_name_carries_backbone_and_swept_values(tiny_overrides, monkeypatch):
    import dcc.engine.job

    cfg = compose_cfg(tiny_overrides + ["loss.weight=0.3"])
    assert dcc.engine.job.run_name(cfg) == "ablation_viii-1_4-resnet18-s42"
    monkeypatch.setattr(dcc.engine.naming, "swept_values", lambda c: [("loss.weight", "0.3"), ("segnet", "pspnet")])
    assert dcc.engine.job.run_name(cfg) == "ablation_viii-1_4-resnet18-s42-weight=0.3-pspnet"


def _record(row, seed, best, **params):
    return report.Record(run_id=f"{row}{seed}", row=row, col=(("split", "1_8"),), seed=str(seed), best=best,
                         last=best - 0.01, dataset="digits", segnet="deeplabv3plus", backbone="resnet18", split="1_8",
                         start_time=0, switches=report.switches_label(row, params))


def test_ablation_chart_labels_rows_by_switches_and_has_no_error_bar_for_one_seed():
    from matplotlib.container import ErrorbarContainer

    def build(records):
        cells = [report.Cell(row=r.row, col=r.col, values=[100 * r.last], replicates=[(r.seed, r.seed)],
                             best=[100 * r.best], last=[100 * r.last]) for r in records]
        return report.Report(title="t", by=["split"], cells=cells, rows=[r.row for r in records],
                             cols=[records[0].col], switches={r.row: r.switches for r in records})

    on = {f"loss/{k}": "True" for k, _ in report.SWITCHES}
    rep = build([_record("suponly", 1, 0.3, **{k: "False" for k in on}, **{"loss/method": "suponly"}),
                 _record("ablation_iv", 1, 0.4, **on | {"loss/pf": "False"}), _record("ablation_vii", 1, 0.5)])
    ax = report.chart(rep).axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["suponly\nsupervised only", "ablation_iv\nProj+Context+CL+Dir+NS",
                      "ablation_vii\nContext+CL+Dir+NS+PF"]
    assert not [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    rep.cells[0].values.append(32.0)  # two replicates: an interval bar
    rep.cells[0].replicates.append(("2", "2"))
    ax = report.chart(rep).axes[0]
    assert len([c for c in ax.containers if isinstance(c, ErrorbarContainer)]) == 1


def test_summary_metrics_for_the_sweep_parent():
    cells = [report.Cell(row="suponly", col=(("loss/weight", "0.1"),), values=[38.0, 40.0], replicates=[("1", "1"), ("2", "2")],
                         best=[40.0, 42.0], last=[38.0, 40.0]),
             report.Cell(row="suponly", col=(("loss/weight", "0.3"),), values=[45.0], replicates=[("1", "1")], best=[50.0],
                         last=[45.0])]
    rep = report.Report(title="t", by=["loss/weight"], cells=cells, rows=["suponly"], cols=[c.col for c in cells])
    m = report.summary_metrics(rep)
    assert m["mean_final_miou/suponly/weight_0.1"] == pytest.approx(39.0)  # in %, like the cells
    assert m["mean_best_miou/suponly/weight_0.3"] == pytest.approx(50.0)
    assert m["best_mean_final_miou"] == pytest.approx(45.0) and m["finished_runs"] == 3
