"""hparams_search=lambda_gamma_tau: a persistent Optuna study that survives a failed trial and a restart."""

from __future__ import annotations

import os
import signal
import time

import optuna
import pytest
import yaml
from hydra.experimental.callback import Callback
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from tests.conftest import ROOT
from tests.test_sweep_parent import run_py, sweep_overrides, tracking_uri

# `hparams_search=...` once the entry config lists the group (`- hparams_search: null`), `+...` before
_LISTED = "hparams_search:" in (ROOT / "conf" / "config.yaml").read_text()
SEARCH = ("" if _LISTED else "+") + "hparams_search=lambda_gamma_tau"


def _study(tmp_path, name):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'optuna.db'}")


def _states(study):
    return sorted(t.state.name for t in study.get_trials(deepcopy=False))


class CtrlCAtJob(Callback):
    """Test helper, loaded by Hydra in the sweep's process: Ctrl-C as job ``job_num`` starts."""

    def __init__(self, job_num: int) -> None:
        self.job_num = job_num

    def on_job_start(self, config, **kwargs) -> None:
        if config.hydra.job.num == self.job_num:
            if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started from a background job (`cmd &`, nohup):
                signal.signal(signal.SIGINT, signal.default_int_handler)  # the shell left Ctrl-C ignored; a terminal has it
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the KeyboardInterrupt arrives here


@pytest.mark.slow
def test_search_interrupted_after_two_trials_continues_to_four(tiny_overrides, tmp_path):
    over = sweep_overrides(tiny_overrides)
    args = ["-m", SEARCH, "hydra/callbacks=mlflow_parent", "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=1",
            "hydra.sweeper.study_name=s", *over, "trainer.max_steps=2"]
    ctrl_c = ["+hydra.callbacks.ctrl_c._target_=tests.test_optuna.CtrlCAtJob", "+hydra.callbacks.ctrl_c.job_num=2"]
    first = run_py(args + ctrl_c, tmp_path)
    assert first.returncode != 0 and "KeyboardInterrupt" in first.stderr, first.stderr[-3000:]
    # two trials done, the third was asked and left RUNNING by the interrupted search
    assert _states(_study(tmp_path, "s")) == ["COMPLETE", "COMPLETE", "RUNNING"]

    again = run_py(args, tmp_path)  # the same command again
    assert again.returncode == 0, again.stderr[-3000:]
    study = _study(tmp_path, "s")
    assert _states(study) == ["COMPLETE"] * 4
    params = [t.params for t in study.trials]
    assert all(set(p) == {"loss.weight", "loss.pos_threshold", "loss.temperature"} for p in params)
    assert all(0.5 <= p["loss.pos_threshold"] <= 0.95 for p in params)
    results = yaml.safe_load(sorted(tmp_path.glob("multirun/*/*/optimization_results.yaml"))[-1].read_text())
    assert results["n_trials"] == 4 and results["best_trial"] == study.best_trial.number
    assert results["best_params"] == study.best_params
    assert "Best trial" in again.stdout and "reproduce: python run.py loss." in again.stdout

    # both commands are one sweep in MLflow: one parent run, four finished trials as its children
    client = MlflowClient(tracking_uri=tracking_uri(over))
    exp = client.get_experiment_by_name("digits")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`dcc.sweep` = 'true'")
    assert parent.info.status == "FINISHED" and parent.data.tags["dcc.sweep_name"] == "lambda_gamma_tau"
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.info.status for r in children) == ["FINISHED"] * 4
    assert "optuna/optimization_results.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id, "optuna")}



@pytest.mark.slow
def test_a_failing_trial_is_recorded_with_its_error_and_the_search_goes_on(tiny_overrides, tmp_path):
    # gamma = 1.0 is rejected when the job starts (ConfigError); the sampler's fixed seed picks both values
    args = ["-m", SEARCH, "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=2", "hydra.sweeper.study_name=f",
            "hydra.sweeper.params={loss.pos_threshold:'choice(0.5,1.0)'}",
            *sweep_overrides(tiny_overrides), "trainer.max_steps=2", "logger=none"]
    proc = run_py(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = _study(tmp_path, "f").trials
    assert len(trials) == 3 and {t.params["loss.pos_threshold"] for t in trials} == {0.5, 1.0}
    for t in trials:
        if t.params["loss.pos_threshold"] == 0.5:
            assert t.state == TrialState.COMPLETE
        else:
            assert t.state == TrialState.FAIL and "pos_threshold" in t.user_attrs["error"]
            assert "ConfigError" in t.user_attrs["traceback"]
    results = yaml.safe_load(next(tmp_path.glob("multirun/*/*/optimization_results.yaml")).read_text())
    assert results["best_params"]["loss.pos_threshold"] == 0.5  # the other two keys are still searched
    assert results["n_failed"] == sum(t.state == TrialState.FAIL for t in trials)
    assert "failed (recorded as FAIL, the search goes on)" in proc.stdout + proc.stderr


# The sweeper itself, with a launcher that calls a function in-process: seconds, no training.


class _Ret:
    def __init__(self, fn, overrides):
        self.fn, self.overrides = fn, overrides

    @property
    def return_value(self):  # like hydra's JobReturn: raises the job's exception
        return self.fn(dict(o.split("=", 1) for o in self.overrides))


class _Launcher:
    def __init__(self, fn):
        self.fn, self.launched = fn, []

    def launch(self, overrides, initial_job_idx):
        self.launched += [dict(o.split("=", 1) for o in ov) for ov in overrides]
        return [_Ret(self.fn, ov) for ov in overrides]


def _sweeper(tmp_path, fn, **kwargs):
    from omegaconf import OmegaConf

    from dcc.sweeps.optuna_sweeper import StudySweeper

    sweeper = StudySweeper(storage=f"sqlite:///{tmp_path / 'optuna.db'}", **kwargs)
    sweeper.config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "sweep")}}})
    sweeper.launcher = _Launcher(fn)
    return sweeper


def test_grid_study_stops_at_the_grid_and_records_a_failing_job(tmp_path):
    import functools

    def job(ov):
        if ov["a"] == "2" and ov["b"] == "1":
            raise ValueError("bad cell")
        return float(ov["a"]) + float(ov["b"])

    sweeper = _sweeper(tmp_path, job, sampler=functools.partial(optuna.samplers.GridSampler), direction="maximize",
                       study_name="g", n_trials=10, n_jobs=4, params={"a": "choice(1,2,3)", "b": "range(0,2)"})
    sweeper.sweep(["x=7"])
    trials = _study(tmp_path, "g").trials
    assert sorted((t.params["a"], t.params["b"]) for t in trials) == [(a, b) for a in (1, 2, 3) for b in (0, 1)]
    (failed,) = [t for t in trials if t.state == TrialState.FAIL]
    assert failed.params == {"a": 2, "b": 1} and "bad cell" in failed.user_attrs["error"]
    assert all(ov["x"] == "7" for ov in sweeper.launcher.launched)
    results = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert results["best_params"] == {"a": 3, "b": 1} and results["n_failed"] == 1 and results["n_trials"] == 6


def test_interrupted_study_reruns_its_running_trial_with_the_same_params(tmp_path):
    def interrupted(ov):
        if len(sweeper.launcher.launched) > 2:
            raise KeyboardInterrupt
        return float(ov["w"])

    params = {"w": "tag(log, interval(0.01, 10.0))", "n": "range(1, 5)"}
    sweeper = _sweeper(tmp_path, interrupted, sampler=optuna.samplers.TPESampler(seed=0), study_name="i",
                       n_trials=5, n_jobs=2, params=params)
    with pytest.raises(KeyboardInterrupt):
        sweeper.sweep([])
    study = _study(tmp_path, "i")
    assert _states(study) == ["COMPLETE", "COMPLETE", "RUNNING", "RUNNING"]
    running = {t.number: t.params for t in study.trials if t.state == TrialState.RUNNING}

    again = _sweeper(tmp_path, lambda ov: float(ov["w"]), sampler=optuna.samplers.TPESampler(seed=0),
                     study_name="i", n_trials=5, n_jobs=2, params=params)
    again.sweep([])
    study = _study(tmp_path, "i")
    assert _states(study) == ["COMPLETE"] * 5
    assert all(study.trials[n].params == p for n, p in running.items())
    assert all(0.01 <= t.params["w"] <= 10 and t.params["n"] in (1, 2, 3, 4) for t in study.trials)


class _ConcurrentLauncher:
    """Like the local launcher: runs each job inside ``launch`` (blocking) and may be called from several threads."""

    concurrent_launches = True

    def __init__(self, seconds):
        import threading

        self.seconds, self.lock = seconds, threading.Lock()
        self.events, self.now, self.peak = [], 0, 0

    def launch(self, overrides, initial_job_idx):
        (ov,) = overrides
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
            self.events.append(("start", initial_job_idx))
        time.sleep(self.seconds(initial_job_idx))
        with self.lock:
            self.now -= 1
            self.events.append(("end", initial_job_idx))
        return [_Ret(lambda v: float(v["w"]), ov)]


def test_with_a_concurrent_launcher_the_next_trial_starts_as_soon_as_any_ends(tmp_path):
    # job 0 is slow: in batches of two, job 2 would wait for it; asynchronously it runs beside it
    sweeper = _sweeper(tmp_path, None, sampler=optuna.samplers.TPESampler(seed=0), direction="maximize",
                       study_name="a", n_trials=4, n_jobs=2, params={"w": "interval(0, 1)"})
    sweeper.launcher = _ConcurrentLauncher(lambda job: 3.0 if job == 0 else 0.1)
    sweeper.sweep([])
    events = sweeper.launcher.events
    assert sweeper.launcher.peak == 2
    assert events.index(("start", 2)) < events.index(("end", 0))  # job 2 started while job 0 still ran
    assert sorted(j for e, j in events if e == "start") == [0, 1, 2, 3]  # each trial its own job number
    assert _states(_study(tmp_path, "a")) == ["COMPLETE"] * 4


def test_the_enqueued_baseline_is_trial_0_and_is_not_tried_again_when_the_study_continues(tmp_path):
    kwargs = dict(sampler=optuna.samplers.TPESampler(seed=0), direction="maximize", study_name="e", n_jobs=2,
                  params={"w": "tag(log, interval(0.01, 10.0))", "t": "interval(0.5, 0.95)"},
                  enqueue=[{"w": 0.1, "t": 0.75}])
    _sweeper(tmp_path, lambda ov: float(ov["w"]), n_trials=3, **kwargs).sweep([])
    again = _sweeper(tmp_path, lambda ov: float(ov["w"]), n_trials=5, **kwargs)
    again.sweep([])
    trials = _study(tmp_path, "e").trials
    assert trials[0].params == {"w": 0.1, "t": 0.75} and trials[0].value == 0.1
    assert [t.params for t in trials].count({"w": 0.1, "t": 0.75}) == 1
    assert _states(_study(tmp_path, "e")) == ["COMPLETE"] * 5


def test_an_enqueued_key_that_is_not_searched_is_refused_by_name(tmp_path):
    sweeper = _sweeper(tmp_path, lambda ov: 0.0, study_name="x", n_trials=2, params={"w": "interval(0, 1)"},
                       enqueue=[{"w": 0.5, "loss.temprature": 0.1}])
    with pytest.raises(ValueError, match="loss.temprature"):
        sweeper.sweep([])


def test_an_enqueued_value_outside_the_space_is_skipped_and_a_fixed_key_left_to_the_command_line(tmp_path):
    params = {"w": "interval(0, 1)", "t": "choice(0.5, 1.0)"}
    sweeper = _sweeper(tmp_path, lambda ov: float(ov["w"]), sampler=optuna.samplers.TPESampler(seed=0),
                       study_name="o", n_trials=2, params=params, enqueue=[{"w": 0.3, "t": 0.75}, {"w": 0.2, "t": 0.5}])
    sweeper.sweep(["t=0.9"])  # t fixed by the command line: both entries enqueue w only
    trials = _study(tmp_path, "o").trials
    assert [t.params for t in trials] == [{"w": 0.3}, {"w": 0.2}]
    skipped = _sweeper(tmp_path, lambda ov: 0.0, sampler=optuna.samplers.TPESampler(seed=0), study_name="p",
                       n_trials=1, params=params, enqueue=[{"w": 0.3, "t": 0.75}])
    skipped.sweep([])  # t=0.75 is not one of the choices: the entry is skipped, the study samples
    (trial,) = _study(tmp_path, "p").trials
    assert trial.params["t"] in (0.5, 1.0)


@pytest.mark.slow
def test_a_study_on_the_local_launcher_starts_from_the_preset_values(tiny_overrides, tmp_path):
    # the local launcher launches trials from threads (asynchronous); trial 0 is the preset's lambda, gamma, tau
    args = ["-m", SEARCH, "hydra/launcher=local", "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=2",
            "hydra.sweeper.study_name=l", *sweep_overrides(tiny_overrides), "trainer.max_steps=2", "logger=none"]
    proc = run_py(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = _study(tmp_path, "l")
    assert _states(study) == ["COMPLETE"] * 3
    cfg = yaml.safe_load(next(tmp_path.glob("multirun/*/*/0/.hydra/config.yaml")).read_text())
    assert study.trials[0].params == {"loss.weight": cfg["loss"]["weight"], "loss.pos_threshold": cfg["loss"][
        "pos_threshold"], "loss.temperature": cfg["loss"]["temperature"]}
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 3
