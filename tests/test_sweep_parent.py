"""A sweep is one MLflow parent run with its jobs as child runs, and ends with its report."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT

# A few steps are enough: the consistency branch runs from step 3 (TINY's loss.start_step=2).
SHORT = ["trainer.max_steps=3", "trainer.eval_every=3", "trainer.checkpoint_every=3"]


def run_py(args: list[str], cwd: Path, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python run.py ARGS`` in ``cwd`` (the launch directory), as a user would type it."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def sweep_overrides(tiny_overrides: list[str]) -> list[str]:
    return [o for o in tiny_overrides if not o.startswith(("split=", "trainer.max_steps="))] + SHORT


def tracking_uri(overrides: list[str]) -> str:
    return next(o.split("=", 1)[1] for o in overrides if o.startswith("logger.tracking_uri="))


@pytest.mark.slow
def test_sweep_is_one_parent_run_with_children_and_a_report(tiny_overrides, tmp_path):
    over = sweep_overrides(tiny_overrides)
    proc = run_py(["-m", "hydra/callbacks=mlflow_parent", "hydra.job.name=mini", "loss=suponly,ablation_viii",
                   "loss.weight=0.1,0.3", "split=1_8", *over], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(tracking_uri=tracking_uri(over))
    exp = client.get_experiment_by_name("digits")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`dcc.sweep` = 'true'")
    assert parent.info.status == "FINISHED" and parent.data.tags["dcc.sweep_name"] == "mini"
    assert parent.data.params["override/loss.weight"] == "0.1,0.3"
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted((r.data.tags["loss"], r.data.params["loss/weight"], r.info.status) for r in children) == [
        ("ablation_viii", "0.1", "FINISHED"), ("ablation_viii", "0.3", "FINISHED"),
        ("suponly", "0.1", "FINISHED"), ("suponly", "0.3", "FINISHED")]
    assert parent.data.tags["dcc.jobs_finished"] == "4"
    assert "| suponly |" in parent.data.tags["mlflow.note.content"]  # the UI's description of the sweep: its table
    assert "mIoU in % everywhere" in parent.data.tags["mlflow.note.content"]  # the unit: said
    assert parent.data.tags["dcc.unit"] == "percent"
    # the table: presets x swept lambda, printed, written to the sweep dir and logged to the parent
    assert "| suponly |" in proc.stdout and "weight=0.3" in proc.stdout
    assert "n=1 replicate" in proc.stdout and "not separable" in proc.stdout  # one seed: nothing ranked as better
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "report")} == {
        "report/table.md", "report/table.csv", "report/chart.png"}
    assert len(list(tmp_path.glob("multirun/*/*/report/table.csv"))) == 1
    # readable: run names carry the backbone and the swept value; the parent holds the table's figures
    assert sorted(r.info.run_name for r in children) == [
        "ablation_viii-1_8-resnet18-s42-weight=0.1", "ablation_viii-1_8-resnet18-s42-weight=0.3",
        "suponly-1_8-resnet18-s42-weight=0.1", "suponly-1_8-resnet18-s42-weight=0.3"]
    final = {r.data.tags["loss"] + r.data.params["loss/weight"]: r.data.metrics["val/final_miou"] for r in children}
    metrics = client.get_run(parent.info.run_id).data.metrics
    assert metrics["mean_final_miou/suponly/weight_0.3"] == pytest.approx(final["suponly0.3"])
    assert metrics["finished_runs"] == 4 and metrics["best_mean_final_miou"] == pytest.approx(max(final.values()))

    # the same sweep again: nothing is trained again, and the new parent groups the four finished runs
    again = run_py(["-m", "hydra/callbacks=mlflow_parent", "hydra.job.name=mini", "loss=suponly,ablation_viii",
                    "loss.weight=0.1,0.3", "split=1_8", *over], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("already finished: ") == 4 and "final val mIoU:" not in again.stdout  # no training
    (new,) = [p for p in client.search_runs([exp.experiment_id], "tags.`dcc.sweep` = 'true'")
              if p.info.run_id != parent.info.run_id]
    adopted = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{new.info.run_id}'")
    assert sorted(r.info.run_id for r in adopted) == sorted(r.info.run_id for r in children)
    assert new.info.status == "FINISHED" and new.data.metrics["finished_runs"] == 4


@pytest.mark.slow
def test_a_failing_job_leaves_the_parent_failed_with_the_other_jobs_reported(tiny_overrides, tmp_path):
    over = sweep_overrides(tiny_overrides)
    # gamma = 1.5 is rejected when the job starts (ConfigError): one of the two jobs fails
    proc = run_py(["-m", "hydra/callbacks=mlflow_parent", "loss=suponly", "loss.pos_threshold=0.5,1.5", *over],
                  tmp_path)
    assert proc.returncode != 0 and "pos_threshold" in proc.stderr
    client = MlflowClient(tracking_uri=tracking_uri(over))
    exp = client.get_experiment_by_name("digits")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`dcc.sweep` = 'true'")
    assert parent.info.status == "FAILED" and parent.data.tags["dcc.sweep_name"] == "sweep"
    (child,) = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert child.info.status == "FINISHED" and child.data.params["loss/pos_threshold"] == "0.5"
    assert "report/table.md" in {a.path for a in client.list_artifacts(parent.info.run_id, "report")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(params=["sqlite", "server"])
def mlflow_store(request, tmp_path):
    """One store for many concurrent jobs: a SQLite file, or ``mlflow server`` on a free port over SQLite."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'shared.db'}"
        return
    # pyproject.toml pins SQLAlchemy 2, which `mlflow server` (MLflow 3) needs: a server that does not come up is a
    # failure of this environment, reported with the server's log, not a skip.
    port = _free_port()
    log = open(tmp_path / "mlflow-server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination",
         str(tmp_path / "artifacts")],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.time() > deadline:
                text = (tmp_path / "mlflow-server.log").read_text()
                import sqlalchemy

                why = "exited" if server.poll() is not None else "not healthy after 300 s"
                hint = (f"\nmlflow server needs SQLAlchemy 2 (pyproject.toml pins it); this environment has "
                        f"{sqlalchemy.__version__}" if "has no attribute 'Engine'" in text else "")
                pytest.fail(f"`mlflow server` on {uri} did not start ({why}; log {tmp_path / 'mlflow-server.log'})"
                            f":{hint}\n{text[-3000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


@pytest.mark.slow
def test_four_concurrent_jobs_log_four_complete_runs_to_one_store(tiny_overrides, tmp_path, mlflow_store):
    mlflow_server = mlflow_store
    over = [o for o in sweep_overrides(tiny_overrides) if not o.startswith("logger.tracking_uri=")]
    over += [f"logger.tracking_uri={mlflow_server}", "trainer.threads=1"]
    # hydra/launcher=local: the four jobs run at the same time, each in its own process
    proc = run_py(["-m", "hydra/launcher=local", "hydra/callbacks=mlflow_parent", "hydra.job.name=concurrent",
                   "loss=ablation_viii", "loss.weight=0.1,0.2,0.3,0.4", *over], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("digits")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`dcc.sweep` = 'true'")
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.data.params["loss/weight"] for r in children) == ["0.1", "0.2", "0.3", "0.4"]
    for r in children:
        assert r.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(r.info.run_id, "val/miou")] == [3]
        assert {"val/final_miou", "val/best_miou", "train/loss"} <= set(r.data.metrics)
        assert "config.yaml" in {a.path for a in client.list_artifacts(r.info.run_id)}
    # the jobs really overlapped: each started before another one ended
    spans = sorted((r.info.start_time, r.info.end_time) for r in children)
    assert all(spans[i + 1][0] < spans[i][1] for i in range(len(spans) - 1))


@pytest.mark.slow
def test_a_pool_of_two_runs_three_jobs_never_more_than_two_at_once(tiny_overrides, tmp_path):
    over = [*sweep_overrides(tiny_overrides), "trainer.threads=1"]
    proc = run_py(["-m", "hydra/launcher=local", "hydra/callbacks=mlflow_parent", "hydra.job.name=pool",
                   "hydra.sweeper.max_batch_size=null", "hydra.launcher.max_parallel=2",
                   "loss=suponly", "loss.weight=0.1,0.2,0.3", *over], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(tracking_uri=tracking_uri(over))
    exp = client.get_experiment_by_name("digits")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`dcc.sweep` = 'true'")
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.data.params["loss/weight"] for r in children) == ["0.1", "0.2", "0.3"]
    assert all(r.info.status == "FINISHED" for r in children)
    # at most two at a time: the third started only after one of the first two had ended
    spans = sorted((r.info.start_time, r.info.end_time) for r in children)
    assert spans[2][0] >= min(spans[0][1], spans[1][1])


@pytest.mark.parametrize("bad, culprit", [
    (["hydra/launcher=local", "hydra.launcher.max_parallel=0"], "hydra.launcher.max_parallel=0"),
    (["logger.tracking_uri=http://127.0.0.1:9"], "logger.tracking_uri=http://127.0.0.1:9"),
])
def test_a_sweep_with_a_bad_launcher_or_store_stops_at_start_in_one_line_writing_nothing(tmp_path, bad, culprit):
    proc = run_py(["-m", "loss=suponly,st", "trainer.max_steps=1", *bad], tmp_path, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith(f"error: {culprit}"), proc.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []  # no sweep directory, no MLflow store, no run
