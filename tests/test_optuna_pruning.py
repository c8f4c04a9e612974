"""Pruning and replicated objectives of the Optuna sweeper, with fake jobs whose validation curves are known.

The fake jobs talk to the sweeper exactly as training jobs do (``dcc.engine.trial_link``: a report file per job,
a stop file per trial); the sweeper is the real one. Seconds, no training.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from dcc.engine.trial_link import DIR_ENV, REPLICATE_ENV, TrialLink

ROOT = Path(__file__).resolve().parents[1]
DIR_KEY, REP_KEY = f"++hydra.job.env_set.{DIR_ENV}", f"++hydra.job.env_set.{REPLICATE_ENV}"


class _Ret:
    def __init__(self, value):
        self.value = value

    @property
    def return_value(self):
        if isinstance(self.value, BaseException):
            raise self.value
        return self.value


class CurveLauncher:
    """Runs each job of a launch in its own thread (side by side, like the local launcher) and returns when all
    have ended. A job trains ``max_steps`` steps of ``step_s`` seconds, evaluates every ``eval_every`` steps
    (value ``curve(overrides, step)``) and reports it; after every step it stops when its trial was pruned."""

    concurrent_launches = True

    def __init__(self, curve, max_steps=60, eval_every=10, step_s=0.01, stop_delay_s=0.0):
        self.curve, self.max_steps, self.eval_every, self.step_s = curve, max_steps, eval_every, step_s
        self.stop_delay_s = stop_delay_s
        self.lock = threading.Lock()
        self.jobs: list[dict] = []  # one per job: overrides, trial, replicate, start, end, last step, pruned
        self.launches: list[list[dict]] = []

    def launch(self, overrides, initial_job_idx):
        jobs = [dict(o.split("=", 1) for o in ov) for ov in overrides]
        with self.lock:
            self.launches.append(jobs)
        results = [None] * len(jobs)

        def run(i):
            results[i] = self._job(jobs[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return [_Ret(r) for r in results]

    def _job(self, ov):
        trial_dir = ov[DIR_KEY].strip("'")
        link = TrialLink(trial_dir, ov[REP_KEY])
        record = {"overrides": ov, "trial": int(Path(trial_dir).name), "replicate": ov[REP_KEY],
                  "start": time.monotonic(), "pruned": False}
        with self.lock:
            self.jobs.append(record)
        history, step = [], 0
        while step < self.max_steps:
            time.sleep(self.step_s)
            step += 1
            if step % self.eval_every == 0:
                history.append((step, self.curve(ov, step)))
                link.report(step, history, self.max_steps)
            if link.stop_requested() and step < self.max_steps:  # what Trainer.after_step does
                time.sleep(self.stop_delay_s)  # writing the checkpoint
                link.report(step, history, self.max_steps, pruned=True)
                record["pruned"] = True
                break
        record.update(end=time.monotonic(), step=step)
        return history[-1][1] if history else 0.0


def _sweeper(tmp_path, launcher, **kwargs):
    from omegaconf import OmegaConf

    from dcc.sweeps.optuna_sweeper import StudySweeper

    kwargs.setdefault("poll_interval", 0.01)
    sweeper = StudySweeper(storage=f"sqlite:///{tmp_path / 'optuna.db'}", direction="maximize", **kwargs)
    sweeper.config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "sweep")}}})
    sweeper.launcher = launcher
    return sweeper


def _load(tmp_path, name):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'optuna.db'}")


def _level(ov, step):
    """A flat curve at the trial's ``w`` (plus 0.01 x the seed of a replicate)."""
    return float(ov["w"]) + 0.01 * float(ov.get("trainer.seed", 0))


def test_the_pruner_stops_the_trials_below_it_at_the_step_it_should_and_their_slots_go_to_the_next(tmp_path):
    # ThresholdPruner(lower=0.5, n_warmup_steps=20): a trial below 0.5 is pruned at step 20 (its second
    # evaluation) whatever the order in which trials end; the others run to step 60.
    levels = [0.9, 0.1, 0.2, 0.8, 0.3, 0.7]
    launcher = CurveLauncher(_level, max_steps=60, eval_every=10, step_s=0.03)
    sweeper = _sweeper(tmp_path, launcher, study_name="t", n_trials=6, n_jobs=2, params={"w": "interval(0, 1)"},
                       enqueue=[{"w": w} for w in levels],
                       pruner={"_target_": "optuna.pruners.ThresholdPruner", "lower": 0.5, "n_warmup_steps": 20})
    sweeper.sweep([])
    trials = _load(tmp_path, "t").trials
    assert [t.params["w"] for t in trials] == levels
    pruned = {t.number for t in trials if t.state == TrialState.PRUNED}
    assert pruned == {1, 2, 4}
    assert all(t.state == TrialState.COMPLETE for t in trials if t.number not in pruned)
    for t in trials:
        if t.number in pruned:
            assert t.user_attrs["pruned_at_step"] == 20 and t.last_step == 20 and t.value == pytest.approx(levels[t.number])
            assert sorted(t.intermediate_values) == [10, 20]
        else:
            assert sorted(t.intermediate_values) == list(range(10, 61, 10))
    # which jobs ran to the end: exactly the unpruned ones; a pruned job stopped within one evaluation interval
    jobs = {j["trial"]: j for j in launcher.jobs}
    assert {n for n, j in jobs.items() if j["step"] == 60} == {0, 3, 5}
    assert all(20 <= jobs[n]["step"] < 30 and jobs[n]["pruned"] for n in pruned)
    assert all(t.user_attrs["steps"] == [jobs[t.number]["step"]] for t in trials)
    # the slot of pruned trial 1 went to trial 2 at once: trial 2 started while trial 0 was still running
    assert jobs[2]["start"] < jobs[0]["end"]
    # without pruning 6 x 60 steps; here 3 x 60 + 3 x ~20
    assert sum(j["step"] for j in launcher.jobs) < 0.7 * 6 * 60
    # the jobs were not given a seed: one replicate changes nothing
    assert all("trainer.seed" not in j["overrides"] for j in launcher.jobs)


def test_a_median_pruner_by_target_prunes_a_trial_below_the_median_of_the_completed_ones(tmp_path):
    # one trial at a time: trial 1 (0.2) and 2 (0.4) are below the median of the completed trials at their first
    # evaluation; trial 3 (0.95) is above it
    launcher = CurveLauncher(_level, max_steps=40, eval_every=10, step_s=0.01)
    sweeper = _sweeper(tmp_path, launcher, study_name="m", n_trials=4, n_jobs=1, params={"w": "interval(0, 1)"},
                       enqueue=[{"w": w} for w in (0.9, 0.2, 0.4, 0.95)],
                       pruner={"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 1, "n_warmup_steps": 0})
    sweeper.sweep([])
    states = [t.state for t in _load(tmp_path, "m").trials]
    assert states == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.PRUNED, TrialState.COMPLETE]
    assert [t.user_attrs.get("pruned_at_step") for t in _load(tmp_path, "m").trials] == [None, 10, 10, None]


class MetLauncher(CurveLauncher):
    """Jobs of trials whose ``w`` is in ``met`` meet finished runs: they report their whole curve at once and end
    without training (what :func:`dcc.engine.job._report_to_trial` does for a run finished by an earlier sweep)."""

    def __init__(self, met, **kwargs):
        super().__init__(_level, **kwargs)
        self.met = met

    def _job(self, ov):
        if float(ov["w"]) not in self.met:
            return super()._job(ov)
        trial_dir = ov[DIR_KEY].strip("'")
        history = [(s, self.curve(ov, s)) for s in range(self.eval_every, self.max_steps + 1, self.eval_every)]
        TrialLink(trial_dir, ov[REP_KEY]).report(self.max_steps, history, self.max_steps)
        time.sleep(0.05)  # the sweeper polls while the job ends
        with self.lock:
            self.jobs.append({"overrides": ov, "trial": int(Path(trial_dir).name), "step": 0, "pruned": False})
        return history[-1][1]


def test_finished_runs_met_by_a_trial_set_the_rungs_bar_and_are_never_pruned(tmp_path):
    # one trial at a time, successive halving with a rung at step 20 (top half goes on): trial 0 (met, 0.9) sets the
    # bar; trial 1 (trained, 0.3) is below it and pruned; trial 2 (met, 0.2) is below both but has nothing left to
    # train: COMPLETE with its value and its whole curve
    launcher = MetLauncher(met={0.9, 0.2}, max_steps=60, eval_every=10, step_s=0.01)
    sweeper = _sweeper(tmp_path, launcher, study_name="met", n_trials=3, n_jobs=1, params={"w": "interval(0, 1)"},
                       enqueue=[{"w": w} for w in (0.9, 0.3, 0.2)],
                       pruner={"_target_": "optuna.pruners.SuccessiveHalvingPruner", "min_resource": 20,
                               "reduction_factor": 2})
    sweeper.sweep([])
    trials = _load(tmp_path, "met").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.COMPLETE]
    assert sorted(trials[0].intermediate_values) == sorted(trials[2].intermediate_values) == list(range(10, 61, 10))
    assert trials[1].user_attrs["pruned_at_step"] == 20 and trials[2].value == pytest.approx(0.2)


def test_replicated_trials_report_the_mean_of_their_replicates(tmp_path):
    launcher = CurveLauncher(lambda ov, step: _level(ov, step) * step / 30, max_steps=30, eval_every=10, step_s=0.005)
    sweeper = _sweeper(tmp_path, launcher, study_name="r", n_trials=3, n_jobs=2, params={"w": "interval(0, 1)"},
                       enqueue=[{"w": w} for w in (0.5, 0.6, 0.7)], replicates=3)
    sweeper.sweep([])
    trials = _load(tmp_path, "r").trials
    assert all(t.state == TrialState.COMPLETE for t in trials)
    for t in trials:
        w = t.params["w"]
        assert t.value == pytest.approx(w + 0.02)  # seeds 1, 2, 3: mean offset 0.02
        assert t.intermediate_values == pytest.approx({s: (w + 0.02) * s / 30 for s in (10, 20, 30)})
        assert t.user_attrs["replicate_values"] == pytest.approx({"1": w + 0.01, "2": w + 0.02, "3": w + 0.03})
        assert t.user_attrs["replicates"] == [1, 2, 3] and t.user_attrs["steps"] == [30, 30, 30]
    # each trial is one launch of its three replicates side by side, differing only by the seed
    assert len(launcher.launches) == 3
    for jobs in launcher.launches:
        assert [j["trainer.seed"] for j in jobs] == ["1", "2", "3"]
        assert len({tuple(sorted((k, v) for k, v in j.items() if k not in ("trainer.seed", REP_KEY))) for j in jobs}) == 1


def test_a_replicated_trial_is_pruned_on_the_mean_of_its_replicates(tmp_path):
    # seeds 1, 2 on a trial at 0.48: 0.49 and 0.50, mean 0.495 < 0.5 (one replicate alone would pass)
    launcher = CurveLauncher(_level, max_steps=40, eval_every=10, step_s=0.03)
    sweeper = _sweeper(tmp_path, launcher, study_name="rp", n_trials=2, n_jobs=2, params={"w": "interval(0, 1)"},
                       enqueue=[{"w": 0.48}, {"w": 0.52}], replicates=2,
                       pruner={"_target_": "optuna.pruners.ThresholdPruner", "lower": 0.5})
    sweeper.sweep([])
    t0, t1 = _load(tmp_path, "rp").trials
    assert t0.state == TrialState.PRUNED and t0.intermediate_values == pytest.approx({10: 0.495})
    assert t1.state == TrialState.COMPLETE and t1.value == pytest.approx(0.535)
    assert all(j["step"] < 20 for j in launcher.jobs if j["trial"] == 0)  # both replicates stopped


def test_the_replicate_values_and_key_are_configurable_and_the_key_cannot_be_fixed_as_well(tmp_path):
    from dcc.sweeps.optuna_sweeper import SweeperConfigError

    launcher = CurveLauncher(_level, max_steps=10, eval_every=10, step_s=0.0)
    sweeper = _sweeper(tmp_path, launcher, study_name="v", n_trials=1, params={"w": "interval(0, 1)"},
                       replicates=2, replicate_values=[7, 9])
    sweeper.sweep([])
    assert [j["trainer.seed"] for j in launcher.launches[0]] == ["7", "9"]
    with pytest.raises(SweeperConfigError, match="trainer.seed is fixed to 3"):
        _sweeper(tmp_path, launcher, study_name="v2", n_trials=1, params={"w": "interval(0, 1)"}, replicates=2).sweep(
            ["trainer.seed=3"])


@pytest.mark.parametrize("kwargs, culprit", [
    ({"pruner": {"_target_": "optuna.pruners.MedianPrunr"}}, "hydra.sweeper.pruner._target_=optuna.pruners.MedianPrunr"),
    ({"pruner": {"_target_": "collections.OrderedDict"}}, "not an Optuna pruner"),
    ({"pruner": {"_target_": "optuna.pruners.MedianPruner", "n_startup_trial": 3}}, "MedianPruner(n_startup_trial=3)"),
    ({"replicates": 0}, "hydra.sweeper.replicates=0"),
    ({"replicates": 3, "replicate_values": [1, 2]}, "hydra.sweeper.replicate_values=[1, 2]"),
])
def test_bad_sweeper_values_fail_at_start_in_one_line(tmp_path, kwargs, culprit):
    from dcc.sweeps.optuna_sweeper import StudySweeper, SweeperConfigError

    with pytest.raises(SweeperConfigError) as info:
        StudySweeper(**kwargs)
    assert culprit in str(info.value) and "\n" not in str(info.value)


def test_a_pruner_with_a_launcher_that_runs_trials_one_by_one_fails_before_the_study_is_opened(tmp_path):
    from dcc.sweeps.optuna_sweeper import SweeperConfigError

    class Basic:  # like Hydra's basic launcher: no concurrent_launches
        def launch(self, overrides, initial_job_idx):
            raise AssertionError("nothing may be launched")

    sweeper = _sweeper(tmp_path, Basic(), study_name="b", n_trials=2, params={"w": "interval(0, 1)"},
                       pruner={"_target_": "optuna.pruners.MedianPruner"})
    with pytest.raises(SweeperConfigError, match="hydra.sweeper.pruner with Basic") as info:
        sweeper.sweep([])
    assert "\n" not in str(info.value) and not (tmp_path / "optuna.db").exists()


# --- a study killed (SIGKILL of the sweeper's process) and continued --------------------------------------------

def run_study(tmp: str, n_trials: int, stop_delay_s: float) -> None:
    """The study of the kill test, run in its own process (``python -c``)."""
    tmp_path = Path(tmp)
    launcher = CurveLauncher(_level, max_steps=40, eval_every=10, step_s=0.02, stop_delay_s=stop_delay_s)
    sweeper = _sweeper(tmp_path, launcher, study_name="k", n_trials=n_trials, n_jobs=2,
                       sampler=optuna.samplers.RandomSampler(seed=int(stop_delay_s * 10) + 3),
                       params={"w": "interval(0, 1)"},
                       pruner={"_target_": "optuna.pruners.ThresholdPruner", "lower": 0.5, "n_warmup_steps": 10})
    sweeper.sweep([])
    with open(tmp_path / f"launched-{os.getpid()}.txt", "w") as fh:
        fh.write("\n".join(str(j["trial"]) for j in launcher.jobs))


def test_a_killed_study_continues_to_exactly_n_trials_without_running_a_trial_twice(tmp_path):
    n = 8
    code = f"from tests.test_optuna_pruning import run_study; run_study({str(tmp_path)!r}, {n}, %s)"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # the jobs of a pruned trial take 1.5 s to stop: the kill lands between the pruning decision and the end of its jobs
    first = subprocess.Popen([sys.executable, "-c", code % 1.5], cwd=ROOT, env=env)
    seen = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.1)
        try:
            trials = _load(tmp_path, "k").get_trials(deepcopy=False)
        except Exception:  # noqa: BLE001 - not created yet
            continue
        marked = [t for t in trials if t.state == TrialState.RUNNING and "pruned_at_step" in t.user_attrs]
        if marked and any(t.state == TrialState.COMPLETE for t in trials):
            os.kill(first.pid, signal.SIGKILL)
            first.wait(30)
            seen = {t.number: (t.state, dict(t.params), "pruned_at_step" in t.user_attrs)
                    for t in _load(tmp_path, "k").get_trials(deepcopy=False)}  # as the kill left it
            break
    assert seen is not None, "the study never had a pruned trial whose jobs were still stopping"
    assert any(s == TrialState.RUNNING for s, _, _ in seen.values())

    again = subprocess.run([sys.executable, "-c", code % 0.0], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    trials = _load(tmp_path, "k").trials
    assert len(trials) == n and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert len({t.params["w"] for t in trials}) == n  # no trial asked twice
    (launched_file,) = tmp_path.glob("launched-*.txt")
    launched = {int(x) for x in launched_file.read_text().split()}
    for number, (state, params, marked) in seen.items():
        assert trials[number].params == params
        if state != TrialState.RUNNING or marked:  # finished, or pruned before the kill: not run again
            assert number not in launched
        else:  # interrupted: run again (its own number, its parameters)
            assert number in launched
        if marked:
            assert trials[number].state == TrialState.PRUNED
    # the first process asked for len(seen) trials; the second only for the rest
    assert launched == {k for k, (s, _, m) in seen.items() if s == TrialState.RUNNING and not m} | set(range(len(seen), n))


# --- through run.py ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, culprit", [
    ("hydra.sweeper.replicates=0", "error: hydra.sweeper.replicates=0: "),
    ("hydra.sweeper.pruner={_target_:optuna.pruners.MedianPrunr}",
     "error: hydra.sweeper.pruner._target_=optuna.pruners.MedianPrunr: not an Optuna pruner"),
    ("hydra.sweeper.pruner={_target_:optuna.pruners.MedianPruner}", "error: hydra.sweeper.pruner with BasicLauncher: "),
])
def test_run_py_refuses_a_bad_pruner_or_replicates_in_one_line_before_anything_is_written(tmp_path, override, culprit):
    from tests.test_optuna import SEARCH
    from tests.test_sweep_parent import run_py

    proc = run_py(["-m", SEARCH, override, f"logger.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"], tmp_path,
                  timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith(culprit), proc.stderr[-2000:]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "optuna.db").exists()


@pytest.mark.slow
def test_a_pruned_training_job_ends_cleanly_with_its_checkpoint_and_a_tagged_mlflow_run(tiny_overrides, tmp_path):
    import json

    from mlflow.tracking import MlflowClient

    from tests.test_optuna import SEARCH
    from tests.test_sweep_parent import run_py, sweep_overrides, tracking_uri

    # every trial is below the threshold at step 6 (its second evaluation): pruned there, its job stops at step 7
    over = [o for o in sweep_overrides(tiny_overrides) if not o.startswith("trainer.")] + [
        o for o in tiny_overrides if o.startswith("trainer.") and "max_steps" not in o and "eval_every" not in o]
    args = ["-m", SEARCH, "hydra/launcher=local", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2",
            "hydra.sweeper.study_name=p", "hydra.sweeper.poll_interval=0.1",
            "hydra.sweeper.pruner={_target_:optuna.pruners.ThresholdPruner,lower:99,n_warmup_steps:6}",  # in %
            *over, "trainer.max_steps=30", "trainer.eval_every=3", "trainer.log_every=1"]
    proc = run_py(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = _load(tmp_path, "p").trials
    assert [t.state for t in trials] == [TrialState.PRUNED] * 2
    assert all(t.user_attrs["pruned_at_step"] == 6 and sorted(t.intermediate_values) == [3, 6] for t in trials)
    assert all(6 < t.user_attrs["steps"][0] < 9 for t in trials)  # within one evaluation interval
    client = MlflowClient(tracking_uri=tracking_uri(over))
    exp = client.get_experiment_by_name("digits")
    runs = client.search_runs([exp.experiment_id], "tags.pruned = 'true'")
    assert len(runs) == 2 and all(r.info.status == "KILLED" and r.data.tags["pruned_at_step"] == "6" for r in runs)
    run_dirs = [p for p in (tmp_path / "runs" / "digits").iterdir() if p.is_dir()]
    assert len(run_dirs) == 2
    for d in run_dirs:  # checkpoint kept, not marked finished: the same command continues it
        assert (d / "last.pt").exists() and not (d / "result.json").exists()
    for f in tmp_path.glob("multirun/*/*/trials/*/replicate-0.json"):
        assert json.loads(f.read_text())["pruned"] is True
    assert proc.stdout.count("PRUNED at step 6") == 2


# --- the study report --------------------------------------------------------------------------------------------

def test_the_study_report_numbers_every_trial_marks_baseline_and_best_and_counts_the_steps(tmp_path, capsys, monkeypatch):
    from dcc.sweeps.report import main

    # baseline 60 %, a pruned trial (20 %), the best (70 %) and a middle one; two replicates (seeds 1, 2) each
    launcher = CurveLauncher(lambda ov, step: 100 * _level(ov, step), max_steps=40, eval_every=10, step_s=0.005)
    sweeper = _sweeper(tmp_path, launcher, study_name="lambda_gamma_tau-digits-x", n_trials=4, n_jobs=2,
                       params={"w": "interval(0, 1)"}, enqueue=[{"w": w} for w in (0.6, 0.2, 0.7, 0.65)],
                       replicates=2, pruner={"_target_": "optuna.pruners.ThresholdPruner", "lower": 50})
    sweeper.sweep(["x=7"])
    monkeypatch.chdir(tmp_path)  # the launch directory: optuna.db is found there; no mlflow.db: nothing logged
    assert main(["lambda_gamma_tau", "--out", "rep"]) == 0  # the sweep's name finds its latest study
    text = capsys.readouterr().out
    assert "## Optuna study lambda_gamma_tau-digits-x" in text and "2 replicates per trial (trainer.seed = 1, 2" in text
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()}
    assert rows["0"][:3] == ["baseline", "COMPLETE", "61.50"] and rows["0"][3] == "40+40"
    assert rows["1"][:2] == ["", "PRUNED at 10"]
    assert all(10 <= int(s) < 40 for s in rows["1"][3].split("+"))  # stopped early (how soon: the first test)
    assert rows["2"][:2] == ["best", "COMPLETE"] and rows["2"][-1] == "1: 71.00, 2: 72.00"
    assert "reproduce: `python run.py -m w=0.7 x=7 trainer.seed=1,2`" in text
    assert "lead of trial 2 over the baseline (trial 0), paired over 2 replicates (1, 2): +10.00 points" in text
    assert "larger than the noise" in text
    trained = sum(j["step"] for j in launcher.jobs)
    assert f"Steps trained: {trained:,} of 320 = **{100 * trained / 320:.1f}%**" in text
    for name in ("study.md", "trials.csv", "history.png", "slice.png", "intermediate.png"):
        assert (tmp_path / "rep" / name).stat().st_size > 0


def _legacy_study(tmp_path, name):
    """A study as the sweeper wrote them before 2026-12-06: values in fractions of 1, no unit attribute."""
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{tmp_path / 'optuna.db'}", direction="maximize")
    for i, (w, v) in enumerate([(0.1, 0.50), (0.3, 0.55)]):
        study.enqueue_trial({"w": w}, user_attrs={"enqueued": i})
        t = study.ask({"w": optuna.distributions.FloatDistribution(0, 1)})
        study.tell(t, v)
    return study


def test_an_old_study_in_fractions_is_not_continued_in_percent_and_its_report_shows_percent(tmp_path, capsys, monkeypatch):
    """Jobs return mIoU in %; a study from before (fractions, no ``dcc.unit``) would mix the scales: refused in one
    line naming the study, before a trial is asked for. Its report still reads it, in %, and says why."""
    from dcc.sweeps.optuna_sweeper import SweeperConfigError
    from dcc.sweeps.report import main

    _legacy_study(tmp_path, "lambda_gamma_tau-old")
    launcher = CurveLauncher(lambda ov, step: 100 * _level(ov, step), max_steps=20)
    sweeper = _sweeper(tmp_path, launcher, study_name="lambda_gamma_tau-old", n_trials=4, params={"w": "interval(0, 1)"})
    with pytest.raises(SweeperConfigError, match="study_name=lambda_gamma_tau-old: its 2 trials hold .* fractions") as e:
        sweeper.sweep(["x=7"])
    assert "\n" not in str(e.value) and launcher.jobs == [] and len(_load(tmp_path, "lambda_gamma_tau-old").trials) == 2
    monkeypatch.chdir(tmp_path)
    assert main(["lambda_gamma_tau-old", "--out", "rep"]) == 0
    text = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()}
    assert rows["0"][:3] == ["baseline", "COMPLETE", "50.00"] and rows["1"][:3] == ["best", "COMPLETE", "55.00"]
    assert "fractions of 1" in text
    # a new study gets the unit: continued later, it is not refused
    new = _sweeper(tmp_path, CurveLauncher(lambda ov, step: 100 * _level(ov, step), max_steps=20),
                   study_name="lambda_gamma_tau-new", n_trials=1, params={"w": "interval(0, 1)"})
    new.sweep(["x=7"])
    assert _load(tmp_path, "lambda_gamma_tau-new").user_attrs["dcc.unit"] == "percent"
    _sweeper(tmp_path, CurveLauncher(lambda ov, step: 100 * _level(ov, step), max_steps=20),
             study_name="lambda_gamma_tau-new", n_trials=2, params={"w": "interval(0, 1)"}).sweep(["x=7"])
    assert len(_load(tmp_path, "lambda_gamma_tau-new").trials) == 2


def test_the_bench_pruner_trains_at_most_60_percent_of_the_steps_of_12_full_trials(tmp_path):
    # the pruner of `bash sweeps/optuna.sh bench`, 12 trials of one replicate, two at a time, on the bench's schedule
    # (1,500 steps, an evaluation every 150) with curves that rise to each trial's level and keep their order
    import math

    from tests.test_bench_profile import _commands

    (argv,) = _commands("optuna.sh", "bench")
    (spec,) = [a.split("=", 1)[1].strip("{}") for a in argv if a.startswith("hydra.sweeper.pruner=")]
    pruner = {k: (v if k == "_target_" else int(v)) for k, v in (kv.split(":", 1) for kv in spec.split(","))}
    launcher = CurveLauncher(lambda ov, step: float(ov["w"]) * (1 - math.exp(-step / 400)), max_steps=1500,
                             eval_every=150, step_s=0.002)
    sweeper = _sweeper(tmp_path, launcher, study_name="b", n_trials=12, n_jobs=2, params={"w": "interval(0, 1)"},
                       sampler=optuna.samplers.RandomSampler(seed=4), pruner=pruner)
    sweeper.sweep([])
    trials = _load(tmp_path, "b").trials
    # the pruner's share: a pruned trial counts the steps to the evaluation that pruned it, a complete one 1,500
    # (the job's own last step adds the time it took to see the stop file, which a loaded machine stretches)
    allowed = {t.number: t.user_attrs["pruned_at_step"] if t.state == TrialState.PRUNED else 1500 for t in trials}
    share = sum(allowed.values()) / (12 * 1500)
    assert share <= 0.6, share
    for j in launcher.jobs:  # and every job stopped before its next evaluation
        assert allowed[j["trial"]] <= j["step"] < allowed[j["trial"]] + 150 or j["step"] == 1500, (j, allowed)
    assert sum(t.state == TrialState.PRUNED for t in trials) >= 7
    best = max(trials, key=lambda t: t.params["w"])
    assert best.state == TrialState.COMPLETE  # the best setting is never pruned: its curve leads at every rung
