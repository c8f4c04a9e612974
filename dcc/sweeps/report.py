"""Tables of finished runs, read back from MLflow: the paper's ablation and split tables, grids, seeds.

    python -m dcc.report                       # the latest sweep in the store
    python -m dcc.report digits                # the latest sweep of experiment "digits"
    python -m dcc.report digits --all          # every finished run of the experiment
    python -m dcc.report <parent run id | sweep name> [--by loss/weight] [--split val|test] [--baseline suponly]
    python -m dcc.report <Optuna study | its sweep name>   # the study report (dcc/sweeps/study_report.py)

Rows are loss presets, the arms (in the order of Table 3), columns are splits or, for a grid, the swept
values (the config keys that differ between the runs, found automatically or named with ``--by``). A cell
is n, mean, std and a 95% Student-t interval over replicates (a replicate: ``trainer/seed`` and
``split/seed``) of the test mIoU (percent) when every run logged ``test/miou``, else of the final
validation mIoU (``--split`` names one); every other arm is compared with a baseline arm (``suponly``
by default, ``--baseline``) through its paired differences per replicate, their mean with a 95% interval,
how many share its sign and a verdict (better / worse only when the interval excludes 0). Where dataset,
segnet and backbone are those of a table of the paper, the paper's number and the difference stand beside
a cell. The tables are printed as Markdown and written, with a CSV and a PNG chart, to ``--out``; for a
sweep the three files are also logged to its parent run (``report/``).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, Sequence

from dcc.engine.tracking import PARENT_TAG, SWEEP_KEY_TAG, SWEEP_NAME_TAG, SWEEP_TAG, default_tracking_uri
from dcc.sweeps.aggregate import (BEST, LAST, TEST, Cell, Comparison, Record, Report, ReportError,  # noqa: F401
                                  build_report, records_from_runs, t_interval, varying_keys)
from dcc.sweeps.paper import (PRESET_SWITCHES, ROW_ORDER, SWITCHES, TABLE1, TABLE2, TABLE3, TABLE3_SETTING,  # noqa: F401
                              TABLE5, paper_dataset, paper_miou, switches_label)
from dcc.sweeps.render import (CSV_FIELDS, chart, col_label, layout_for, plot, short, summary_metrics,  # noqa: F401
                               to_csv, to_markdown, write_report)

# The module is the report's command line and its MLflow queries; the names above are re-exported so that
# ``from dcc.sweeps import report`` gives the whole report (tables, aggregation, rendering).

def search_all(client: Any, experiment_ids: list[str], filter_string: str = "", order_by: list[str] | None = None,
               max_runs: int | None = None) -> list[Any]:
    """Every run matching ``filter_string`` (pages through MLflow's results)."""
    out: list[Any] = []
    token = None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=1000,
                                  order_by=order_by, page_token=token)
        out.extend(page)
        token = page.token
        if not token or (max_runs is not None and len(out) >= max_runs):
            return out[:max_runs] if max_runs is not None else out


def sweep_children(client: Any, parent: Any, statuses: Sequence[str] = ("FINISHED",)) -> list[Any]:
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = search_all(client, exps, f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'")
    return [r for r in runs if r.info.status in statuses]


def _latest_sweep(client: Any, experiment_ids: list[str], name: str | None = None) -> Any | None:
    filt = f"tags.`{SWEEP_TAG}` = 'true'"
    if name is not None:
        filt += f" and tags.`{SWEEP_NAME_TAG}` = '{name}'"
    runs = client.search_runs(experiment_ids, filter_string=filt, max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def resolve_target(client: Any, target: str | None, all_runs: bool) -> tuple[str, Any | None, list[str]]:
    """``(title, parent run or None, experiment ids)`` for a target: nothing (the latest sweep), an
    experiment name (its latest sweep, or with ``all_runs`` all its runs), a parent run id or a sweep name."""
    exps = client.search_experiments()
    all_ids = [e.experiment_id for e in exps]
    if target is None:
        parent = _latest_sweep(client, all_ids) if all_ids else None
        if parent is None:
            raise ReportError("no sweep in this MLflow store: name an experiment (python -m dcc.report digits --all)")
        return _sweep_title(parent), parent, [parent.info.experiment_id]
    by_name = {e.name: e for e in exps}
    if target in by_name:
        ids = [by_name[target].experiment_id]
        if not all_runs:
            parent = _latest_sweep(client, ids)
            if parent is not None:
                return _sweep_title(parent), parent, ids
        return f"experiment {target}: all finished runs", None, ids
    if re.fullmatch(r"[0-9a-f]{32}", target):
        try:
            parent = client.get_run(target)
        except Exception as exc:  # noqa: BLE001
            raise ReportError(f"no run {target} in this MLflow store ({exc})") from exc
        return _sweep_title(parent), parent, [parent.info.experiment_id]
    parent = _latest_sweep(client, all_ids, name=target) if all_ids else None
    if parent is None:
        names = ", ".join(sorted(by_name)) or "none"
        raise ReportError(f"{target!r} is neither an experiment (experiments: {names}), a run id nor a sweep name")
    return _sweep_title(parent), parent, [parent.info.experiment_id]


def _sweep_title(parent: Any) -> str:
    name = parent.data.tags.get(SWEEP_NAME_TAG) or parent.info.run_name or parent.info.run_id
    return f"sweep {name} ({parent.info.run_id[:8]})"


def report_for_parent(client: Any, parent_run_id: str, *, by: Sequence[str] | None = None, paper: str = "match",
                      out_dir: Path | None = None, layout: str = "auto", log: bool = True, split: str | None = None,
                      baseline: str | None = None) -> tuple[Report, dict[str, Path]]:
    """Build, write and (``log``) attach to the parent run the report of one sweep; used by the sweep callback."""
    parent = client.get_run(parent_run_id)
    report = build_report(sweep_children(client, parent), title=_sweep_title(parent), by=by, paper=paper,
                          split=split, baseline=baseline)
    files = write_report(report, out_dir or Path("reports") / _slug(report.title), layout)
    if log:
        for f in files.values():
            client.log_artifact(parent_run_id, str(f), "report")
    return report, files


def _run_counts(client: Any, parent: Any | None, exp_ids: list[str]) -> str:
    """``3 runs: 2 FAILED, 1 RUNNING`` (a sweep's children, else the experiments' runs)."""
    if parent is not None:
        runs = sweep_children(client, parent, ("FINISHED", "RUNNING", "FAILED", "KILLED", "SCHEDULED"))
    else:
        runs = [r for r in search_all(client, exp_ids) if r.data.tags.get(SWEEP_TAG) != "true"]
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.info.status] = counts.get(r.info.status, 0) + 1
    if not runs:
        return "no runs"
    return f"{len(runs)} run(s): " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:80] or "report"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dcc.report", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", nargs="?", help="experiment name, sweep (parent) run id or sweep name; default: the latest sweep")
    ap.add_argument("--tracking-uri", default=None, help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    ap.add_argument("--all", action="store_true", help="with an experiment: every finished run, not only its latest sweep")
    ap.add_argument("--by", default=None, help="comma-separated column keys (split, loss/weight, ...); default: the keys that vary")
    ap.add_argument("--paper", choices=("match", "always", "never"), default="match",
                    help="paper numbers where dataset/segnet/backbone match (default), always (Table 3/1, VOC DeepLabv3+ R50) or never")
    ap.add_argument("--split", choices=("val", "test"), default=None,
                    help="the evaluation split of every number (default: test when every run logged test/miou, else val)")
    ap.add_argument("--baseline", default=None,
                    help="the arm (loss preset) every other arm is compared with (default: suponly when the sweep has it)")
    ap.add_argument("--rows", default=None, metavar="KEY",
                    help="arms are the values of this parameter (e.g. loss/st_threshold), not the loss presets; "
                         "--baseline then names one value")
    ap.add_argument("--layout", choices=("auto", "wide", "long"), default="auto")
    ap.add_argument("--include-unfinished", action="store_true", help="also use RUNNING/FAILED/KILLED runs that logged final metrics")
    ap.add_argument("--out", default=None, help="directory for table.md, table.csv and chart.png (default: reports/<sweep>)")
    ap.add_argument("--no-log", action="store_true", help="do not log the files to the sweep's parent run")
    ap.add_argument("--storage", default=None, help="the Optuna storage of a study (default: sqlite:///optuna.db here)")
    ap.add_argument("--runs", action="store_true", help="for an Optuna sweep: the runs table, not the study report")
    args = ap.parse_args(argv)

    if args.target and not args.runs:  # an Optuna study (or its sweep's name) in the storage: the study report
        from dcc.sweeps import study_report

        storage = args.storage or study_report.DEFAULT_STORAGE
        found = study_report.find_study(args.target, storage)
        if found is not None:
            return study_report.cli(found[0], found[1], storage, args.out, args.tracking_uri, not args.no_log)

    uri = args.tracking_uri or default_tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        print(f"error: no MLflow store at {uri} (run from the launch directory or pass --tracking-uri)", file=sys.stderr)
        return 2
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    try:
        title, parent, exp_ids = resolve_target(client, args.target, args.all)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    key = parent.data.tags.get(SWEEP_KEY_TAG, "") if parent is not None else ""
    if key.startswith("optuna:") and not args.runs:  # an Optuna sweep: the report of its study
        from dcc.sweeps import study_report

        name, _, storage = key[len("optuna:"):].rpartition("@")
        return study_report.cli(name, [], args.storage or storage, args.out, args.tracking_uri, not args.no_log)
    statuses = ("FINISHED", "RUNNING", "FAILED", "KILLED") if args.include_unfinished else ("FINISHED",)
    if parent is not None:
        runs = sweep_children(client, parent, statuses)
    else:
        runs = [r for r in search_all(client, exp_ids)
                if r.info.status in statuses and r.data.tags.get(SWEEP_TAG) != "true"]
    by = [k.strip() for k in args.by.split(",") if k.strip()] if args.by else None
    try:
        report = build_report(runs, title=title, by=by, paper=args.paper, split=args.split, baseline=args.baseline,
                              rows_key=args.rows)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not report.cells:
        print(f"error: {title}: no finished runs with {report.metric} ({_run_counts(client, parent, exp_ids)})",
              file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path("reports") / _slug(title)
    files = write_report(report, out, args.layout)
    print(to_markdown(report, args.layout))
    print("written: " + ", ".join(str(f) for f in files.values()))
    if parent is not None and not args.no_log:
        for f in files.values():
            client.log_artifact(parent.info.run_id, str(f), "report")
        print(f"logged to the sweep's parent run {parent.info.run_id} (artifacts/report)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
