"""The report of an Optuna study (``hparams_search=...``): ``python -m dcc.report <study or sweep name>``.

Read from the study's own storage (``--storage``, default ``sqlite:///optuna.db`` in the launch directory):

* every trial by number: state (PRUNED with the step the pruner stopped it at), value, the steps its jobs trained,
  its parameters and its replicates' values; the baseline (the first ``hydra.sweeper.enqueue`` entry, trial 0)
  and the best trial are marked;
* the best trial with the overrides that reproduce it, and whether its lead over the baseline is larger than the
  noise: the paired differences over the replicates the two trials share, with a 95% t interval (one replicate:
  no estimate of the noise, said so);
* the steps trained against an unpruned study: ``sum of the steps reached / (trials x replicates x max_steps)``;
* Optuna's parameter importances, and Optuna's own plots (``optuna.visualization.matplotlib``: optimisation
  history, slice, importances, intermediate values) as PNG.

Everything is written to ``reports/<study>/`` (``--out``) and, when the sweep's MLflow parent run is found (tag
``dcc.sweep_key``), logged to it under ``study_report/``. ``optuna-dashboard sqlite:///optuna.db`` shows the same
storage interactively (``pip install optuna-dashboard``; optional, not a dependency).
"""

from __future__ import annotations

import csv
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from dcc.engine.metrics import percent
from dcc.engine.tracking import PERCENT, UNIT_TAG as UNIT_ATTR  # the sweeper sets it on a study as on a run

DEFAULT_STORAGE = "sqlite:///optuna.db"


class StudyReportError(RuntimeError):
    pass


def find_study(target: str | None, storage: str) -> tuple[str, list[str]] | None:
    """``(study name, other matching names)`` for a study name, or a sweep name (``lambda_gamma_tau``: the most
    recent study named ``lambda_gamma_tau-...``); None when the storage holds no such study (or does not exist)."""
    if storage.startswith("sqlite:///") and not Path(storage[len("sqlite:///"):]).exists():
        return None
    try:
        summaries = optuna.get_all_study_summaries(storage, include_best_trial=False)
    except Exception:  # noqa: BLE001 - not an Optuna storage
        return None
    names = {s.study_name: s for s in summaries}
    if target in names:
        return target, []
    matches = [s for s in summaries if target is None or s.study_name.startswith(f"{target}-")]
    if not matches:
        return None
    matches.sort(key=lambda s: (s.datetime_start is not None, s.datetime_start or 0), reverse=True)
    return matches[0].study_name, [s.study_name for s in matches[1:]]


@dataclass
class Row:
    number: int
    state: str
    value: float | None
    steps: list[int | None]
    params: dict[str, Any]
    replicates: dict[str, float]
    marks: list[str] = field(default_factory=list)


@dataclass
class StudyReport:
    study_name: str
    storage: str
    direction: str
    rows: list[Row]
    counts: dict[str, int]
    replicate_key: str
    replicate_values: list[Any]
    max_steps: int | None
    steps_trained: int
    steps_full: int | None
    best: Row | None
    baseline: Row | None
    reproduce: str | None
    lead: str
    importances: dict[str, float]
    notes: list[str] = field(default_factory=list)

    @property
    def steps_share(self) -> float | None:
        return self.steps_trained / self.steps_full if self.steps_full else None


def _baseline(trials: list[FrozenTrial]) -> FrozenTrial | None:
    marked = [t for t in trials if t.user_attrs.get("enqueued") == 0]
    if marked:
        return marked[0]
    if not any("enqueued" in t.user_attrs for t in trials) and trials:
        return trials[0]  # a study of an older sweeper: trial 0 is the enqueued preset
    return None


def paired_lead(best: Row, base: Row, maximize: bool) -> str:
    """Whether ``best``'s lead over ``base`` is larger than the noise, from their paired replicates."""
    shared = sorted(set(best.replicates) & set(base.replicates))
    if len(shared) < 2:
        return ("no estimate of the noise (one replicate per trial): a lead of a point or two may be the seed's "
                "(run the study with hydra.sweeper.replicates>=2, or compare the two on the test split over 3 seeds)")
    from scipy import stats

    sign = 1.0 if maximize else -1.0
    d = [sign * (best.replicates[r] - base.replicates[r]) for r in shared]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    lo, hi = mean - half, mean + half
    verdict = "larger than the noise (the interval excludes 0)" if lo > 0 or hi < 0 else \
        "within the noise (the interval includes 0)"
    return (f"lead of trial {best.number} over the baseline (trial {base.number}), paired over {n} replicates "
            f"({', '.join(shared)}): {mean:+.2f} points, 95% interval [{lo:+.2f}, {hi:+.2f}]: "
            f"{verdict}; validation split")


def build(study: optuna.Study, storage: str) -> StudyReport:
    trials = study.get_trials(deepcopy=False)
    attrs = study.user_attrs
    reps = attrs.get("dcc.replicates") or {}
    replicate_key, replicate_values = reps.get("key", "trainer.seed"), list(reps.get("values") or [])
    max_steps = attrs.get("dcc.max_steps") or max((t.user_attrs.get("max_steps") or 0 for t in trials), default=0) or None
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE if len(study.directions) == 1 else True
    # values in % (mIoU); a study made before dcc logged mIoU in % (no unit attribute) holds fractions of 1
    old_fractions = attrs.get(UNIT_ATTR) != PERCENT and bool(trials)
    shown = percent if old_fractions else float
    counts: dict[str, int] = {}
    rows: list[Row] = []
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
        steps = list(t.user_attrs.get("steps") or [])
        if not steps:  # a trial of an older sweeper: its last reported step, or the whole run when complete
            steps = [t.last_step if t.last_step is not None else (max_steps if t.state == TrialState.COMPLETE else None)]
        value = shown(t.value) if len(study.directions) == 1 and t.value is not None else None
        rows.append(Row(t.number, t.state.name, value, steps, dict(t.params),
                        {str(k): shown(float(v)) for k, v in (t.user_attrs.get("replicate_values") or {}).items()
                         if not isinstance(v, list)}))
    by_number = {r.number: r for r in rows}
    base_trial = _baseline(trials)
    baseline = by_number.get(base_trial.number) if base_trial is not None else None
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = by_number[study.best_trial.number] if complete and len(study.directions) == 1 else None
    if baseline is not None:
        baseline.marks.append("baseline")
    if best is not None:
        best.marks.append("best")
    for t, row in zip(trials, rows):
        if t.state == TrialState.PRUNED and "pruned_at_step" in t.user_attrs:
            row.state = f"PRUNED at {t.user_attrs['pruned_at_step']}"
    reproduce = None
    if best is not None:
        fixed = attrs.get("dcc.overrides", "")
        over = " ".join(f"{k}={v}" for k, v in best.params.items()) + (f" {fixed}" if fixed else "")
        if replicate_values:
            over = f"-m {over} {replicate_key}={','.join(str(v) for v in replicate_values)}"
        reproduce = f"python run.py {over}"
    if best is None:
        lead = "no complete trial"
    elif baseline is None:
        lead = "no baseline trial (hydra.sweeper.enqueue) to compare with"
    elif best is baseline:
        lead = "the baseline is the best trial: nothing found that beats it"
    elif baseline.state != "COMPLETE":
        lead = f"the baseline (trial {baseline.number}) is {baseline.state}: no comparison"
    else:
        lead = paired_lead(best, baseline, maximize)
    per_trial = max(1, len(replicate_values))
    trained = sum(s for r in rows for s in r.steps if s)
    full = len(rows) * per_trial * max_steps if max_steps else None
    notes: list[str] = []
    if old_fractions:
        notes.append("the study stores its values as fractions of 1 (it was made before dcc logged mIoU in %): the "
                     "table shows them in %, Optuna's plots as stored")
    importances: dict[str, float] = {}
    if len(study.directions) == 1:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                importances = optuna.importance.get_param_importances(study)
        except Exception as exc:  # noqa: BLE001 - too few complete trials, a single parameter value, ...
            notes.append(f"no parameter importances ({exc})")
    return StudyReport(study.study_name, storage, "maximize" if maximize else "minimize", rows, counts,
                       replicate_key, replicate_values, max_steps, trained, full, best, baseline, reproduce, lead,
                       importances, notes)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def to_markdown(rep: StudyReport) -> str:
    names = sorted({k for r in rep.rows for k in r.params})
    counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(rep.counts.items()))
    reps = (f"{len(rep.replicate_values)} replicates per trial ({rep.replicate_key} = "
            f"{', '.join(str(v) for v in rep.replicate_values)}; value = their mean)") if rep.replicate_values else \
        "one run per trial"
    lines = [f"## Optuna study {rep.study_name}", "",
             f"{len(rep.rows)} trials ({counts}); {rep.direction} the validation mIoU (in %); {reps}. "
             f"Storage: {rep.storage}.", ""]
    head = ["trial", "", "state", "value", "steps"] + names + (["replicates"] if rep.replicate_values else [])
    lines += ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for r in rep.rows:
        steps = "+".join("?" if s is None else str(s) for s in r.steps)
        cells = [str(r.number), " ".join(r.marks), r.state, "" if r.value is None else f"{r.value:.2f}", steps]
        cells += [_fmt(r.params[k]) if k in r.params else "" for k in names]
        if rep.replicate_values:
            cells.append(", ".join(f"{k}: {v:.2f}" for k, v in r.replicates.items()))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if rep.best is not None:
        lines += [f"**Best: trial {rep.best.number}**, value {rep.best.value:.2f}; reproduce: `{rep.reproduce}`", ""]
    lines += [f"Best vs baseline: {rep.lead}.", ""]
    if rep.steps_full:
        lines += [f"Steps trained: {rep.steps_trained:,} of {rep.steps_full:,} = **{100 * rep.steps_share:.1f}%** "
                  f"(sum of the steps reached / ({len(rep.rows)} trials x {max(1, len(rep.replicate_values))} "
                  f"replicate(s) x {rep.max_steps} max_steps)).", ""]
    if rep.importances:
        lines += ["Parameter importances (Optuna, fANOVA): " +
                  ", ".join(f"{k} {v:.2f}" for k, v in rep.importances.items()) + ".", ""]
    lines += [f"Note: {n}." for n in rep.notes]
    return "\n".join(lines).rstrip() + "\n"


def plots(study: optuna.Study, out: Path) -> tuple[list[Path], list[str]]:
    """Optuna's own matplotlib plots as PNG; the names of those it could not draw, with why."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from optuna.visualization import matplotlib as ovm

    files, skipped = [], []
    draws = [("history", ovm.plot_optimization_history), ("slice", ovm.plot_slice),
             ("importances", ovm.plot_param_importances), ("intermediate", ovm.plot_intermediate_values)]
    for name, draw in draws:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = draw(study)
            fig = np.atleast_1d(ax).ravel()[0].figure
            path = out / f"{name}.png"
            fig.savefig(path, dpi=120, bbox_inches="tight")
            plt.close(fig)
            files.append(path)
        except Exception as exc:  # noqa: BLE001 - e.g. importances with fewer than two complete trials
            skipped.append(f"{name} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
            plt.close("all")
    return files, skipped


def write(rep: StudyReport, study: optuna.Study, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files, skipped = plots(study, out)
    if skipped:
        rep.notes.append("plots not drawn: " + "; ".join(skipped))
    md = out / "study.md"
    md.write_text(to_markdown(rep))
    names = sorted({k for r in rep.rows for k in r.params})
    with open(out / "trials.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["trial", "marks", "state", "value", "steps"] + names + ["replicates"])
        for r in rep.rows:
            w.writerow([r.number, " ".join(r.marks), r.state, r.value, "+".join(str(s) for s in r.steps)]
                       + [r.params.get(k, "") for k in names] + [";".join(f"{k}={v}" for k, v in r.replicates.items())])
    return [md, out / "trials.csv", *files]


def parent_run(client: Any, study_name: str) -> Any | None:
    """The sweep's MLflow parent run of this study (tag ``dcc.sweep_key`` = ``optuna:<study>@<storage>``)."""
    from dcc.engine.tracking import SWEEP_KEY_TAG

    for exp in client.search_experiments():
        runs = client.search_runs([exp.experiment_id], f"tags.`{SWEEP_KEY_TAG}` LIKE 'optuna:{study_name}@%'",
                                  max_results=1, order_by=["attributes.start_time DESC"])
        if runs:
            return runs[0]
    return None


def report(study_name: str, storage: str, out: Path, client: Any = None, run_id: str | None = None) -> tuple[str, list[Path], str | None]:
    """Build and write the report; log it to ``run_id`` (or the study's parent run, found with ``client``).
    Returns the Markdown, the files and the run it was logged to."""
    study = optuna.load_study(study_name=study_name, storage=storage)
    rep = build(study, storage)
    files = write(rep, study, out)
    logged = None
    if client is not None:
        if run_id is None:
            parent = parent_run(client, study_name)
            run_id = parent.info.run_id if parent is not None else None
        if run_id is not None:
            for f in files:
                client.log_artifact(run_id, str(f), "study_report")
            logged = run_id
    return files[0].read_text(), files, logged


def cli(study_name: str, others: list[str], storage: str, out: str | None, tracking_uri: str | None, log: bool) -> int:
    """``python -m dcc.report <study>``'s Optuna branch (dispatched from :mod:`dcc.sweeps.report`)."""
    import re

    from dcc.engine.tracking import default_tracking_uri

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # "no complete trials" and the like: said in the report
    client = None
    uri = tracking_uri or default_tracking_uri()
    if log and not (uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists()):
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
    folder = Path(out) if out else Path("reports") / re.sub(r"[^A-Za-z0-9_.-]+", "-", study_name)[:80]
    text, files, logged = report(study_name, storage, folder, client)
    print(text)
    if others:
        print(f"(other studies of that name in {storage}: {', '.join(others)}; name one to see it)")
    print("written: " + ", ".join(str(f) for f in files))
    if logged:
        print(f"logged to the sweep's parent run {logged} (artifacts/study_report)")
    print(f"interactive: optuna-dashboard {storage}   (pip install optuna-dashboard; optional)")
    return 0
