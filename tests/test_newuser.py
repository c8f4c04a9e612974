"""What a new user hit (issue 26): another dataset's result reported as theirs, a damaged checkpoint as a dead end,
backbones that crash on the default preset, store races, long tracebacks."""

from __future__ import annotations

import pytest

from dcc.engine import checkpoint
from dcc.engine.job import run, run_dir_for
from tests.conftest import ROOT, TINY, compose_cfg
from tests.test_robust import _die_at_step_5, _Killed


# ------------------------------------------------------------------------------ a damaged checkpoint (item 2)
def _damaged_run(tiny_overrides, tmp_path, monkeypatch):
    cfg = compose_cfg(tiny_overrides)
    original = _die_at_step_5(monkeypatch)
    with pytest.raises(_Killed):
        run(cfg, launch_dir=tmp_path)
    monkeypatch.setattr("dcc.method.consistency.ConsistencyBranch.__call__", original)
    run_dir = run_dir_for(cfg, tmp_path)
    last = run_dir / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 3])  # a copy cut short, a disk that filled
    return run_dir, last


def test_a_damaged_checkpoint_says_how_to_start_over(tiny_overrides, tmp_path, monkeypatch):
    run_dir, last = _damaged_run(tiny_overrides, tmp_path, monkeypatch)
    with pytest.raises(checkpoint.CheckpointError) as err:
        run(compose_cfg(tiny_overrides), launch_dir=tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert f"the checkpoint {last} is damaged" in message
    assert "trainer.resume=restart" in message and ".replaced-" in message
    assert last.exists()  # nothing moved or deleted without being asked


def test_restart_works_on_a_damaged_checkpoint_and_keeps_it(tiny_overrides, tmp_path, monkeypatch, capsys):
    run_dir, last = _damaged_run(tiny_overrides, tmp_path, monkeypatch)
    damaged_bytes = last.read_bytes()
    capsys.readouterr()
    assert run(compose_cfg(tiny_overrides + ["trainer.resume=restart"]), launch_dir=tmp_path) > 0
    out = capsys.readouterr().out
    (aside,) = run_dir.parent.glob(run_dir.name + ".replaced-*")
    assert f"moved the previous run (damaged checkpoint last.pt) to {aside}" in out
    assert (aside / "last.pt").read_bytes() == damaged_bytes  # kept as it was
    assert checkpoint.load(last)["finished"]


# ------------------------------------------------------------- another folder dataset is another run (item 1)
def _folder_cfg(root, tmp_path, *extra):
    from tests.realdata import TINY_REAL

    overrides = [o for o in TINY_REAL if not o.startswith("logger")] + [
        f"logger.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", f"trainer.runs_root={tmp_path / 'runs'}",
        "split='1_4'"]
    return compose_cfg(["experiment=none", "dataset=folder", f"dataset.root={root}", *overrides, *extra])


def test_the_folder_data_keys_the_run_directory_and_names_the_experiment(tmp_path):
    from tests.realdata import make_folder

    a, b = make_folder(tmp_path / "set_a"), make_folder(tmp_path / "set_b")
    dir_a, dir_b = (run_dir_for(_folder_cfg(r, tmp_path), tmp_path) for r in (a, b))
    assert dir_a != dir_b  # identical files, another root: another dataset
    assert dir_a.parent.name == "folder-set_a" and dir_b.parent.name == "folder-set_b"
    assert _folder_cfg(a, tmp_path).logger.experiment == "folder-set_a"
    assert run_dir_for(_folder_cfg(a, tmp_path), tmp_path) == dir_a  # the same data: the same run (it resumes)
    (b / "images/train/extra.png").write_bytes((b / "images/val").iterdir().__next__().read_bytes())
    assert run_dir_for(_folder_cfg(b, tmp_path), tmp_path) != dir_b  # an image added: not the same data
    assert _folder_cfg(a, tmp_path, "logger.experiment=mine").logger.experiment == "mine"  # the user's name wins


@pytest.mark.slow
def test_a_finished_run_on_one_folder_is_not_reported_for_another(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from tests.realdata import make_folder

    a, b = make_folder(tmp_path / "set_a"), make_folder(tmp_path / "set_b")
    run(_folder_cfg(a, tmp_path), launch_dir=tmp_path)
    capsys.readouterr()
    run(_folder_cfg(b, tmp_path), launch_dir=tmp_path)
    out = capsys.readouterr().out
    assert "already finished" not in out and "final val mIoU" in out
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    for name in ("folder-set_a", "folder-set_b"):
        assert len(client.search_runs([client.get_experiment_by_name(name).experiment_id])) == 1


# --------------------------------------------- every backbone option trains on the default preset (item 3)
BACKBONES = sorted(p.stem for p in (ROOT / "conf" / "backbone").glob("*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_backbone_option_trains_on_the_default_preset_with_its_digit_pretraining(backbone, tmp_path, capsys):
    """The run a user starts with ``python run.py backbone=<option>``: the digits preset, whose backbone is first
    pretrained on digit classification (a few steps here), then loaded into the segmentation model."""
    over = [o for o in TINY if not o.startswith(("backbone=", "dataset.scenes.pretrain.steps"))] + [
        f"backbone={backbone}", "dataset.scenes.pretrain.steps=2", "dataset.scenes.pretrain.num_images=16",
        "dataset.scenes.pretrain.batch_size=4",  # 64 by default: most of VGG-16's time went to its 4096-wide head
        "trainer.max_steps=2", "trainer.eval_every=2", "trainer.checkpoint_every=2",
        f"dataset.root={tmp_path / 'data'}", f"trainer.runs_root={tmp_path / 'runs'}", "logger=none"]
    miou = run(compose_cfg(over), launch_dir=tmp_path)
    err = capsys.readouterr().err
    assert 0.0 <= miou <= 100.0  # in %
    assert "pretrained backbone: held-out digit accuracy" in err
    assert list((tmp_path / "data" / "digits").glob("pretrained_backbone_*.pt"))


# ------------------------------------------------------------- the MLflow store under concurrency (item 4)
def test_processes_creating_a_new_store_at_once_all_succeed(tmp_path):
    import multiprocessing as mp
    import time

    from tests.store_race import open_and_log  # a light module: the spawned processes import only it

    ctx = mp.get_context("spawn")
    for attempt in range(2):
        uri = f"sqlite:///{tmp_path / f'mlflow{attempt}.db'}"
        out = ctx.Queue()
        start_at = time.time() + 4.0
        procs = [ctx.Process(target=open_and_log, args=(uri, start_at, out)) for _ in range(3)]
        for p in procs:
            p.start()
        results = [out.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        assert [r[0] for r in results] == ["ok"] * 3, results


def _interrupted_store(path):
    """What Ctrl-C during a first run's store creation leaves: some tables, and a migration's temporary one."""
    import sqlite3

    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        db.execute("CREATE TABLE experiments (experiment_id INTEGER, name VARCHAR(256))")
        db.execute("CREATE TABLE _alembic_tmp_experiments (experiment_id INTEGER)")


def test_a_store_left_half_created_is_moved_aside_and_recreated(tmp_path):
    from dcc.engine.tracking import experiment_id, open_client

    path = tmp_path / "mlflow.db"
    _interrupted_store(path)
    client = open_client(f"sqlite:///{path}")
    client.create_run(experiment_id(client, "digits"))
    (aside,) = tmp_path.glob("mlflow.db.broken-*")  # kept, not deleted
    assert aside.stat().st_size > 0


def test_a_half_migrated_store_with_runs_is_named_in_one_line_at_start(tmp_path):
    import sqlite3

    from dcc.engine.preflight import PreflightError, check_tracking
    from dcc.engine.tracking import experiment_id, open_client

    path = tmp_path / "mlflow.db"
    client = open_client(f"sqlite:///{path}")
    client.create_run(experiment_id(client, "digits"))
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE _alembic_tmp_runs (run_uuid TEXT)")
    with pytest.raises(PreflightError, match=r"half-migrated .*_alembic_tmp_runs.* holds 1 runs.*mlflow db upgrade"):
        check_tracking(f"sqlite:///{path}", "logger.tracking_uri")


def test_two_sweeps_started_in_the_same_second_get_their_own_directories():
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", return_hydra_config=True)
    import re

    # resolved once per sweep (Hydra caches `now`), to the microsecond
    assert re.fullmatch(r"multirun/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d-\d{6}", cfg.hydra.sweep.dir)


# ------------------------------------------------------------------- tracking URIs checked at start (item 5)
@pytest.mark.parametrize("uri, says", [
    ("htp://localhost:5000", "unknown scheme 'htp://'; use http(s)://host:port"),
    ("{tmp}/mlruns", "a directory is MLflow's deprecated file store; use a SQLite store in it: sqlite:///"),
    ("file://{tmp}/mlruns", "deprecated file store"),
    ("sqlite:///{tmp}/nonexistent/dir/mlflow.db", "the directory {tmp}/nonexistent/dir does not exist"),
])
def test_a_bad_tracking_uri_is_one_line_at_start_and_creates_nothing(uri, says, tmp_path):
    from tests.test_robust import run_py

    uri, says = uri.format(tmp=tmp_path), says.format(tmp=tmp_path)
    proc = run_py([f"logger.tracking_uri={uri}", f"dataset.root={tmp_path / 'data'}",
                   f"trainer.runs_root={tmp_path / 'runs'}"], cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: logger.tracking_uri=")
    assert says in proc.stderr
    assert not (tmp_path / "nonexistent").exists() and not (tmp_path / "data").exists()
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlruns").exists()


# ---------------------------------------- failures outside the project's checks, in one line (item 5)
def test_a_full_disk_during_a_checkpoint_write_says_so_and_keeps_the_previous_one(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    import torch

    path = tmp_path / "last.pt"
    checkpoint.save_atomic({"step": 3}, path)

    def full_disk(state, fh):
        fh.write(b"\0" * 4096)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 4000")

    monkeypatch.setattr(torch, "save", full_disk)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10 << 30, 10 << 30, 0))
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.save_atomic({"step": 6}, path)
    message = str(err.value)
    assert "\n" not in message and f"cannot write the checkpoint {path}: no space left on the device" in message
    assert f"0 MiB free in {tmp_path}" in message and "the previous checkpoint" in message and "is intact" in message
    monkeypatch.undo()
    assert checkpoint.load(path)["step"] == 3 and not list(tmp_path.glob("*.tmp"))


def test_a_tracking_outage_checkpoints_then_stops_in_one_line(tiny_overrides, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from dcc.engine.tracking import TrackingLost

    calls = {"log": 0, "terminated": 0}
    log_batch, set_terminated = MlflowClient.log_batch, MlflowClient.set_terminated

    def flaky(self, run_id, metrics=(), params=(), tags=()):
        if metrics:
            calls["log"] += 1
            if calls["log"] >= 4:  # steps 2, 3 (losses, validation) logged; the server went away before step 4
                raise ConnectionError("API request to http://tracker/api/2.0/mlflow/runs/log-batch failed: Max retries")
        return log_batch(self, run_id, metrics=metrics, params=params, tags=tags)

    def counted(self, *args, **kwargs):
        calls["terminated"] += 1
        return set_terminated(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", flaky)
    monkeypatch.setattr(MlflowClient, "set_terminated", counted)
    cfg = compose_cfg(tiny_overrides)
    with pytest.raises(TrackingLost) as err:
        run(cfg, launch_dir=tmp_path)
    message = str(err.value)
    last = run_dir_for(cfg, tmp_path) / "last.pt"
    assert "\n" not in message and "lost the MLflow store" in message and "Max retries" in message
    assert f"checkpoint of step 4 written to {last}" in message and "continue with:" in message
    assert checkpoint.load(last)["step"] == 4  # the steps since the last periodic checkpoint (3) are kept
    assert calls["terminated"] == 0  # the failure handler does not call the dead server again


# ------------------------------------------------ the digit pretraining: announced, resumable, before MLflow (item 7)
def _pretrain_params(tmp_path):
    from dcc.data.digits_pretrain import pretrain_params

    over = [o for o in TINY if not o.startswith("dataset.scenes.pretrain.steps")]
    cfg = compose_cfg(over + ["dataset.scenes.pretrain.steps=5", "dataset.scenes.pretrain.num_images=16",
                              "dataset.scenes.pretrain.batch_size=4", f"dataset.root={tmp_path}"])
    return pretrain_params(cfg.dataset, cfg.backbone)


def test_a_killed_pretraining_continues_to_the_same_weights(tmp_path, monkeypatch, capsys):
    import torch

    from dcc.data import digits_pretrain

    monkeypatch.setattr(digits_pretrain, "_PARTIAL_EVERY", 2)
    p = _pretrain_params(tmp_path)
    whole, _ = digits_pretrain.pretrain(p, tmp_path / "whole.partial")
    partial = tmp_path / "killed.partial"
    calls = {"n": 0}
    loss = digits_pretrain.F.cross_entropy

    def killed_at_step_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return loss(*args, **kwargs)

    monkeypatch.setattr(digits_pretrain.F, "cross_entropy", killed_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        digits_pretrain.pretrain(p, partial)
    monkeypatch.setattr(digits_pretrain.F, "cross_entropy", loss)
    assert torch.load(partial, weights_only=False)["step"] == 4
    capsys.readouterr()
    continued, _ = digits_pretrain.pretrain(p, partial)
    assert "pretraining: continuing from step 4 of 5" in capsys.readouterr().err
    assert all(torch.equal(v, continued[k]) for k, v in whole.items())


@pytest.mark.new_store
def test_a_run_killed_during_the_pretraining_leaves_no_mlflow_run_running(tiny_overrides, tmp_path, monkeypatch, capsys):
    from dcc.data import digits_pretrain

    def killed(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(digits_pretrain, "pretrain", killed)
    over = [o for o in tiny_overrides if not o.startswith(("dataset.scenes.pretrain.steps", "dataset.root"))]
    with pytest.raises(KeyboardInterrupt):
        run(compose_cfg(over + ["dataset.scenes.pretrain.steps=3", f"dataset.root={tmp_path / 'data'}"]),
            launch_dir=tmp_path)
    err = capsys.readouterr().err
    assert "once for this backbone" in err and "dataset.scenes.pretrain.steps=0" in err and "backbone.weights=PATH" in err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


# ------------------------------------------------------------- late failures made one line at start (item 7)
def test_a_cuda_device_without_a_gpu_is_one_line_at_start(tmp_path, monkeypatch):
    import torch

    from tests.test_robust import run_py

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = run_py(["trainer.device=cuda", f"dataset.root={tmp_path / 'data'}", f"trainer.runs_root={tmp_path / 'runs'}"],
                  cwd=tmp_path)
    assert proc.returncode == 1 and proc.stderr.strip() == (
        "error: trainer.device=cuda: no CUDA device is visible on this machine; use trainer.device=cpu (or auto), "
        "or run on a GPU node (hydra/launcher=slurm)")
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()


def test_the_slurm_launcher_without_a_cluster_is_one_line_at_start(tmp_path):
    from tests.test_robust import run_py

    proc = run_py(["-m", "hydra/launcher=slurm", "trainer.max_steps=2", f"dataset.root={tmp_path / 'data'}"],
                  cwd=tmp_path, env={"SLURM_CONF": str(tmp_path / "no-cluster.conf")})  # no sbatch, or no controller
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: hydra/launcher=slurm: ")
    assert not (tmp_path / "multirun").exists() and not (tmp_path / "mlflow.db").exists()


# ----------------------------------------------------------- bad folder data found at start (item 6)
@pytest.mark.parametrize("damage", ["mask_size", "label_value", "unreadable_image"])
def test_bad_folder_files_fail_the_start_naming_the_file(damage, tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from dcc.data.build import build_data
    from dcc.data.files import DataError
    from tests.realdata import FOLDER_LABELED, FOLDER_UNLABELED, folder_label, make_folder

    monkeypatch.setenv("DCC_CACHE", str(tmp_path / "cache"))
    root = make_folder(tmp_path / "mine")
    cfg = _folder_cfg(root, tmp_path)
    build_data(cfg)  # clean: passes (and is remembered)
    if damage == "mask_size":
        bad, says = root / "masks/train" / f"{FOLDER_LABELED[1]}.png", "label is 24x20 but its image"
        Image.fromarray(np.zeros((20, 24), np.uint8)).save(bad)
    elif damage == "label_value":
        bad, says = root / "masks/train" / f"{FOLDER_LABELED[0]}.png", "label values outside the class range"
        label = folder_label(0)
        label[0, :3] = 9
        Image.fromarray(label).save(bad)
    else:
        bad = next((root / "images/train").glob(f"{FOLDER_UNLABELED[0]}.*"))
        bad.write_bytes(b"not an image")
        says = "cannot read image"
    with pytest.raises(DataError) as err:
        build_data(_folder_cfg(root, tmp_path))
    assert str(err.value).startswith(f"1 broken files in the dataset, the first: {bad}: ") and says in str(err.value)


def test_images_far_larger_than_the_crop_are_warned_about_once(tmp_path, monkeypatch, caplog):
    import numpy as np
    from PIL import Image

    from dcc.data.build import build_data
    from tests.realdata import FOLDER_UNLABELED, make_folder

    monkeypatch.setenv("DCC_CACHE", str(tmp_path / "cache"))
    root = make_folder(tmp_path / "mine")
    huge = next((root / "images/train").glob(f"{FOLDER_UNLABELED[0]}.*"))
    Image.fromarray(np.zeros((900, 1200, 3), np.uint8)).save(huge)
    with caplog.at_level("WARNING"):
        build_data(_folder_cfg(root, tmp_path))
    (warning,) = [r.getMessage() for r in caplog.records if "far larger" in r.getMessage()]
    assert f"{huge}, is 1200 px" in warning and "longest side over 192 px" in warning


# ------------------------------------------------------------ the MLflow UI shows results at a glance (item 8)
def test_runs_carry_their_budget_result_and_the_experiment_opens_on_the_runs_table(tiny_overrides, tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = compose_cfg(tiny_overrides)
    miou = run(cfg, launch_dir=tmp_path)
    client = MlflowClient(tracking_uri=cfg.logger.tracking_uri)
    exp = client.get_experiment_by_name("digits")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    (r,) = client.search_runs([exp.experiment_id])
    assert r.data.tags["steps"] == "6"
    note = r.data.tags["mlflow.note.content"]
    assert note.startswith(f"**final val mIoU {miou:.2f}%**") and "after 6 of 6 steps" in note and "test mIoU" in note


def test_the_printed_ui_link_opens_the_training_view_not_genai():
    """MLflow 3.17's UI opened the experiment in its GenAI view despite the experimentKind tag (headless Chromium,
    2026-12-06); `?workflowType=machine_learning` opens it on the runs, in the "Model training" view."""
    from dcc.engine.tracking import MLflowTracker

    tracker = MLflowTracker.__new__(MLflowTracker)
    tracker.run_id, tracker.experiment_id = "abc", "1"
    tracker.tracking_uri = "sqlite:///mlflow.db"
    assert "#/experiments/1/runs/abc?workflowType=machine_learning" in tracker.describe()
    tracker.tracking_uri = "http://host:5000"
    assert tracker.describe().endswith("http://host:5000/#/experiments/1/runs/abc?workflowType=machine_learning")


def test_local_slurm_status_before_the_cluster_is_started_says_so_at_once(tmp_path):
    import subprocess
    import time

    start = time.monotonic()
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "local_slurm.sh"), "status"], capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin", "DCC_SLURM_DIR": str(tmp_path / "slurm")})
    assert time.monotonic() - start < 5
    assert proc.returncode == 1 and "the local cluster is not running" in proc.stderr and "start" in proc.stderr


@pytest.mark.slow
def test_a_finished_run_met_with_several_processes_says_the_process_count_is_not_its_identity(tiny_overrides, tmp_path,
                                                                                               capfd):
    over = tiny_overrides + ["trainer.max_steps=2", "trainer.eval_every=2", "trainer.checkpoint_every=2"]
    first = run(compose_cfg(over), launch_dir=tmp_path)
    capfd.readouterr()
    again = run(compose_cfg(over + ["trainer.devices=2", "trainer.device=cpu"]), launch_dir=tmp_path)
    out = capfd.readouterr().out
    assert again == pytest.approx(first)
    assert "already finished" in out and "does not depend on the number of processes: 2 processes" in out
