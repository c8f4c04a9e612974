"""The report's statistics against a hand computation, on made-up runs written straight into MLflow.

t quantiles used by hand: t(0.975, df=2) = 4.302653, t(0.975, df=1) = 12.706205.
"""

from __future__ import annotations

import csv
import io
import math

import pytest

from dcc.sweeps import report
from dcc.sweeps.render import CSV_FIELDS, chart
from tests.test_report import _log_run, _parent

T2, T1 = 4.302653, 12.706205

# test mIoU (fraction) per replicate (trainer.seed, split.seed); replicate r varies both
RUNS = {
    "suponly": {(1, 1): 0.50, (2, 2): 0.52, (3, 3): 0.51},
    "st": {(1, 1): 0.49, (2, 2): 0.53, (3, 3): 0.52},
    "ablation_iv": {(1, 1): 0.52, (2, 2): 0.55, (3, 9): 0.60},  # (3, 9): another labeled subset, unpaired
    "ablation_viii": {(1, 1): 0.53, (2, 2): 0.56, (3, 3): 0.545},
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store for the module (its database takes seconds to create); each test logs its own sweep."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('stats') / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    return uri, client, client.create_experiment("digits")


def _sweep(client, exp, name="seeds", runs=RUNS, test=True, steps=1500, percent=False):
    """The runs in fractions of 1, untagged (a store written before 2026-12-06); ``percent``: in %, tagged."""
    k = 100.0 if percent else 1.0
    parent = _parent(client, exp, name)
    for preset, reps in runs.items():
        for (seed, split_seed), v in reps.items():
            _log_run(client, exp, parent, preset=preset, seed=seed, split_seed=split_seed, best=k * (v - 0.1),
                     last=k * (v - 0.2), test=k * v if test else None, steps=steps, percent=percent)
    return parent


def test_runs_in_percent_and_old_runs_in_fractions_give_the_same_report(store):
    """One unit everywhere: dcc logs mIoU in % (tag dcc.unit=percent); runs of an older store logged fractions of 1
    without the tag. The report reads each by its tag: the same numbers, in %."""
    uri, client, exp = store
    old = report.build_report(report.sweep_children(client, client.get_run(_sweep(client, exp, "old"))), title="t")
    new = report.build_report(report.sweep_children(client, client.get_run(_sweep(client, exp, "new", percent=True))),
                              title="t")
    for a, b in zip(old.cells, new.cells, strict=True):
        assert a.values == pytest.approx(b.values) and a.last == pytest.approx(b.last)
    assert new.cell("suponly", (("split", "1_8"),)).mean == pytest.approx(51.0)
    assert report.summary_metrics(old) == pytest.approx(report.summary_metrics(new))


def _tables(text):
    """{heading: {row: [cells]}} of the Markdown tables."""
    out, heading, rows = {}, None, None
    for line in text.splitlines():
        if line.startswith("#"):
            heading, rows = line.lstrip("# "), {}
            out[heading] = rows
        elif line.startswith("| ") and not line.startswith("| loss") and not line.startswith("| ---"):
            cells = [c.strip() for c in line.split("|")[1:-1]]
            rows[cells[0]] = cells[1:]
    return out


def _ci(mean, std, n, t):
    half = t * std / math.sqrt(n)
    return mean - half, mean + half


def test_interval_and_paired_difference_match_a_hand_computation(store, tmp_path, capsys):
    uri, client, exp = store
    parent = _sweep(client, exp)
    rep = report.build_report(report.sweep_children(client, client.get_run(parent)), title="t")
    assert rep.split == "test" and rep.baseline == "suponly" and rep.subset == "varies"

    sup = rep.cell("suponly", (("split", "1_8"),))  # 50, 52, 51: mean 51, std 1
    assert (sup.n, sup.mean, sup.std) == (3, pytest.approx(51.0), pytest.approx(1.0))
    assert sup.ci == pytest.approx(_ci(51.0, 1.0, 3, T2), abs=1e-5)  # [48.516, 53.484]

    viii = rep.comparison("ablation_viii", (("split", "1_8"),))  # 53-50, 56-52, 54.5-51
    assert viii.diffs == pytest.approx([3.0, 4.0, 3.5])
    assert viii.mean == pytest.approx(3.5) and viii.std == pytest.approx(0.5)
    assert viii.ci == pytest.approx(_ci(3.5, 0.5, 3, T2), abs=1e-5)  # [2.258, 4.742]
    assert (viii.same_sign, viii.verdict) == (3, "better")

    st = rep.comparison("st", (("split", "1_8"),))  # -1, +1, +1
    assert st.mean == pytest.approx(1 / 3) and st.same_sign == 2 and st.verdict == "not separable"
    assert st.ci == pytest.approx(_ci(1 / 3, math.sqrt(4 / 3), 3, T2), abs=1e-5)

    iv = rep.comparison("ablation_iv", (("split", "1_8"),))  # (3, 9) and suponly's (3, 3) have no partner
    assert iv.replicates == [("1", "1"), ("2", "2")] and iv.unpaired == 2
    assert iv.diffs == pytest.approx([2.0, 3.0])
    assert iv.ci == pytest.approx(_ci(2.5, math.sqrt(0.5), 2, T1), abs=1e-5)  # [-3.853, 8.853]
    assert iv.verdict == "not separable"

    # the same numbers in the printed tables, whose titles state split, budget and n
    assert report.main([parent, "--tracking-uri", uri, "--out", str(tmp_path / "r"), "--no-log"]) == 0
    text = capsys.readouterr().out
    tables = _tables(text)
    cells_title = next(h for h in tables if "paired" not in h)
    paired_title = next(h for h in tables if "paired differences vs suponly" in h)
    assert "labels 1/8, test split, 1,500 steps, n=3 replicates" in cells_title
    assert "test split, 1,500 steps, n=2-3 paired replicates" in paired_title
    assert tables[cells_title]["suponly"] == ["3", "51.0", "1.0", "[48.5, 53.5]"]
    assert tables[paired_title]["ablation_viii"] == ["3", "1: +3.0, 2: +4.0, 3: +3.5", "+3.5", "[+2.3, +4.7]", "3/3",
                                                      "better"]
    assert tables[paired_title]["ablation_iv"][:2] == ["2 (2 unpaired)", "1: +2.0, 2: +3.0"]
    assert tables[paired_title]["ablation_iv"][3:] == ["[-3.9, +8.9]", "2/2", "not separable"]
    assert "test/miou" in text and "arms are paired on both" in text
    assert "not separable" in tables[paired_title]["st"][-1]


def test_csv_has_one_row_per_cell_with_its_interval_and_paired_difference(store, tmp_path):
    uri, client, exp = store
    parent = _sweep(client, exp)
    assert report.main([parent, "--tracking-uri", uri, "--out", str(tmp_path / "r"), "--no-log"]) == 0
    text = (tmp_path / "r" / "table.csv").read_text()
    assert text.splitlines()[0].split(",") == ["loss", "column", "split", *CSV_FIELDS[2:]]
    assert list(CSV_FIELDS) == ["loss", "column", "eval_split", "steps", "n", "replicates", "values", "mean", "std",
                                "ci_low", "ci_high", "paper", "delta", "baseline", "paired", "unpaired", "diffs",
                                "diff_mean", "diff_std", "diff_ci_low", "diff_ci_high", "same_sign", "verdict"]
    rows = {r["loss"]: r for r in csv.DictReader(io.StringIO(text))}
    viii = rows["ablation_viii"]
    lo, hi = _ci(54.5, 1.5, 3, T2)  # 53, 56, 54.5
    assert (viii["split"], viii["eval_split"], viii["steps"], viii["n"], viii["replicates"]) == (
        "1_8", "test", "1500", "3", "1 2 3")
    assert float(viii["ci_low"]) == pytest.approx(lo, abs=1e-3) and float(viii["ci_high"]) == pytest.approx(hi, abs=1e-3)
    assert (viii["baseline"], viii["paired"], viii["diff_mean"], viii["same_sign"], viii["verdict"]) == (
        "suponly", "3", "3.500", "3", "better")
    assert float(viii["diff_ci_low"]) == pytest.approx(3.5 - T2 * 0.5 / math.sqrt(3), abs=1e-3)
    assert rows["ablation_iv"]["replicates"] == "1 2 3/9" and rows["ablation_iv"]["unpaired"] == "2"
    assert rows["suponly"]["baseline"] == "" and rows["suponly"]["verdict"] == ""


def test_one_replicate_has_no_interval_and_says_differences_are_not_separable(store, tmp_path, capsys):
    uri, client, exp = store
    # a 40-step `ablation.sh try`: one run per arm, SupOnly above row VIII, no test split
    parent = _sweep(client, exp, "ablation", runs={"suponly": {(42, 42): 0.31}, "ablation_viii": {(42, 42): 0.29}},
                    test=False, steps=40)
    assert report.main([parent, "--tracking-uri", uri, "--out", str(tmp_path / "r"), "--no-log"]) == 0
    text = capsys.readouterr().out
    tables = _tables(text)
    cells_title = next(h for h in tables if "paired" not in h)
    paired_title = next(h for h in tables if "paired" in h)
    assert "labels 1/8, validation split, 40 steps, n=1 replicate" in cells_title
    assert "n=1 paired replicate" in paired_title
    assert tables[cells_title]["suponly"] == ["1", "11.0", "–", "–"]  # val/final_miou = test - 0.2 here
    assert tables[paired_title]["ablation_viii"] == ["1", "42: -2.0", "-2.0", "–", "1/1", "not separable (n=1)"]
    assert "n=1: no interval; differences not separable" in text
    rows = list(csv.DictReader(io.StringIO((tmp_path / "r" / "table.csv").read_text())))
    assert rows[0]["std"] == "" and rows[0]["ci_low"] == "" and rows[1]["diff_ci_low"] == ""


def test_runs_with_a_fixed_labeled_subset_pair_on_the_training_seed_and_say_so(store, tmp_path, capsys):
    uri, client, exp = store
    fixed = {arm: {(seed, 42): v for (seed, _), v in reps.items()} for arm, reps in RUNS.items() if arm != "ablation_iv"}
    parent = _sweep(client, exp, runs=fixed)
    rep = report.build_report(report.sweep_children(client, client.get_run(parent)), title="t")
    assert rep.subset == "fixed" and rep.comparison("ablation_viii", (("split", "1_8"),)).n == 3
    assert report.main([parent, "--tracking-uri", uri, "--out", str(tmp_path / "r"), "--no-log"]) == 0
    text = capsys.readouterr().out
    assert "the labeled subset was fixed (`split.seed` 42 in every run)" in text
    assert "split/seed" not in text.splitlines()[2]  # a replicate key, never a column


def test_validation_when_a_run_lacks_test_and_a_named_split_and_baseline(store, tmp_path, capsys):
    uri, client, exp = store
    parent = _sweep(client, exp)
    _log_run(client, exp, parent, preset="ablation_viii", seed=4, split_seed=4, best=0.4, last=0.5,
             steps=1500)  # no test/miou
    rep = report.build_report(report.sweep_children(client, client.get_run(parent)), title="t")
    assert rep.split == "val" and any("only 12 of 13 runs have test/miou" in n for n in rep.notes)
    assert rep.cell("suponly", (("split", "1_8"),)).mean == pytest.approx(31.0)  # val/final_miou = test - 0.2

    assert report.main([parent, "--tracking-uri", uri, "--split", "test", "--no-log"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --split test: 1 of 13 runs have no test/miou") and "\n" not in err

    assert report.main([parent, "--tracking-uri", uri, "--baseline", "ablation_ii", "--no-log"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: baseline arm 'ablation_ii' is not in this sweep "
                   "(arms: suponly, st, ablation_iv, ablation_viii)")

    assert report.main([parent, "--tracking-uri", uri, "--baseline", "st", "--split", "val",
                        "--out", str(tmp_path / "r"), "--no-log"]) == 0
    text = capsys.readouterr().out
    assert "paired differences vs st: labels 1/8, validation split" in text
    paired = _tables(text)[next(h for h in _tables(text) if "paired differences vs st" in h)]
    assert paired["suponly"][:2] == ["3", "1: +1.0, 2: -1.0, 3: -1.0"]  # SupOnly is now an arm compared with st


def test_no_finished_runs_is_one_line(store, capsys):
    uri, client, exp = store
    parent = _parent(client, exp, "broken")
    _log_run(client, exp, parent, preset="suponly", best=0.5, last=0.5, status="FAILED")
    assert report.main(["broken", "--tracking-uri", uri, "--no-log"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: sweep broken") and "no finished runs" in err and "1 FAILED" in err
    assert "\n" not in err


def test_chart_states_split_budget_n_and_keeps_its_legend_off_the_plots(store):
    import matplotlib.pyplot as plt

    uri, client, exp = store
    parent = _sweep(client, exp)
    rep = report.build_report(report.sweep_children(client, client.get_run(parent)), title="t")
    fig = chart(rep)
    fig.canvas.draw()
    top, bottom = fig.axes
    assert "test split, 1,500 steps, n=3 replicates" in top.get_title().replace("\n", " ")
    assert "paired differences vs suponly" in bottom.get_title().replace("\n", " ")
    legend = fig.legends[0].get_window_extent()
    for ax in (top, bottom):
        assert not legend.overlaps(ax.get_window_extent())
    plt.close(fig)


def test_summary_metrics_carry_the_interval_and_the_paired_difference(store):
    uri, client, exp = store
    parent = _sweep(client, exp)
    rep = report.build_report(report.sweep_children(client, client.get_run(parent)), title="t")
    m = report.summary_metrics(rep)
    assert m["test/mean_miou/suponly"] == pytest.approx(51.0)  # in %, like the report (the runs: fractions, untagged)
    assert m["test/ci95_low/suponly"] == pytest.approx(_ci(51.0, 1.0, 3, T2)[0], abs=1e-5)
    assert m["test/diff_vs_suponly/ablation_viii"] == pytest.approx(3.5)
    assert m["test/diff_same_sign/ablation_viii"] == 3
    assert m["mean_final_miou/suponly"] == pytest.approx(31.0) and m["finished_runs"] == 12


def test_the_sweeps_parent_run_gets_the_statistics_as_metrics_and_tags(store, tmp_path):
    from dcc.sweeps.callback import MLflowSweepParent

    uri, client, exp = store
    parent = _sweep(client, exp, "parent")
    cb = MLflowSweepParent()
    cb.client, cb.run_id, cb.sweep_dir = client, parent, tmp_path / "multirun"
    cb._summarise()
    run = client.get_run(parent)
    assert run.data.metrics["test/diff_vs_suponly/ablation_viii"] == pytest.approx(3.5)  # points, in %
    assert run.data.metrics["test/ci95_high/suponly"] == pytest.approx(_ci(51.0, 1.0, 3, T2)[1], abs=1e-5)
    tags = run.data.tags
    assert (tags["dcc.report_split"], tags["dcc.report_steps"], tags["dcc.report_baseline"]) == (
        "test", "1,500 steps", "suponly")
    assert "test split, 1,500 steps, n=3 replicates" in tags["dcc.report_title"]
    assert "paired differences vs suponly" in (tmp_path / "multirun" / "report" / "table.md").read_text()


def test_arms_can_be_the_values_of_a_parameter_paired_on_the_replicates(store, tmp_path, capsys):
    """`--rows loss/st_threshold --baseline 0`: the self-training threshold's choice (conf/loss/st.yaml) as a report."""
    uri, client, exp = store
    parent = _parent(client, exp, "st_threshold")
    values = {"0.0": [0.50, 0.52, 0.51], "0.7": [0.52, 0.55, 0.53], "0.9": [0.49, 0.53, 0.52]}
    for threshold, per_rep in values.items():
        for r, v in enumerate(per_rep, start=1):
            _log_run(client, exp, parent, preset="st", seed=r, split_seed=r, best=v, last=v, test=v - 0.05,
                     params={"loss/st_threshold": threshold}, steps=1500)
    runs = report.sweep_children(client, client.get_run(parent))
    rep = report.build_report(runs, title="t", split="val", rows_key="loss/st_threshold", baseline="0")
    assert rep.rows == ["loss/st_threshold=0.0", "loss/st_threshold=0.7", "loss/st_threshold=0.9"]
    assert rep.baseline == "loss/st_threshold=0.0" and rep.by == ["split"]  # the key is the rows, not a column
    high = rep.comparison("loss/st_threshold=0.7", (("split", "1_8"),))  # +2, +3, +2 (val: final mIoU)
    assert high.diffs == pytest.approx([2.0, 3.0, 2.0]) and high.verdict == "better"
    assert high.ci == pytest.approx(_ci(7 / 3, math.sqrt(1 / 3), 3, T2), abs=1e-5)  # [0.899, 3.768]
    assert rep.comparison("loss/st_threshold=0.9", (("split", "1_8"),)).verdict == "not separable"  # -1, +1, +1

    assert report.main([parent, "--tracking-uri", uri, "--split", "val", "--rows", "loss/st_threshold", "--baseline",
                        "0", "--out", str(tmp_path / "r"), "--no-log"]) == 0
    text = capsys.readouterr().out
    assert "| loss/st_threshold |" in text and "paired differences vs loss/st_threshold=0.0" in text
    assert report.main([parent, "--tracking-uri", uri, "--rows", "loss/nope", "--no-log"]) == 2
    assert "--rows loss/nope: no run has this parameter" in capsys.readouterr().err


def test_self_training_settings_pair_st_with_the_other_arms_and_name_its_rows_when_they_vary(store):
    """A sweep `loss=suponly,st loss.st_threshold=...`: the SupOnly runs it met logged the default threshold (they do
    not read it), so the threshold is no column; ST's rows carry it where the sweep's ST runs differ in it."""
    uri, client, exp = store
    parent = _parent(client, exp, "st_mixed")
    for r, v in enumerate([0.50, 0.52, 0.51], start=1):
        _log_run(client, exp, parent, preset="suponly", seed=r, split_seed=r, best=v, last=v, test=v,
                 params={"loss/st_threshold": "0.0", "loss/teacher_checkpoint": "None"})
        for threshold, gain in (("0.7", 0.02), ("0.9", -0.01)):
            _log_run(client, exp, parent, preset="st", seed=r, split_seed=r, best=v, last=v, test=v + gain,
                     params={"loss/st_threshold": threshold, "loss/teacher_checkpoint": f"/t/s{r}.pt"})
    rep = report.build_report(report.sweep_children(client, client.get_run(parent)), title="t")
    assert rep.by == ["split"] and rep.rows == ["suponly", "st[st_threshold=0.7]", "st[st_threshold=0.9]"]
    high = rep.comparison("st[st_threshold=0.7]", (("split", "1_8"),))
    assert high.diffs == pytest.approx([2.0, 2.0, 2.0]) and high.n == 3
    # one threshold among the ST runs: the row is plain "st", still paired with SupOnly
    parent = _parent(client, exp, "st_one")
    for r, v in enumerate([0.50, 0.52, 0.51], start=1):
        _log_run(client, exp, parent, preset="suponly", seed=r, split_seed=r, best=v, last=v, test=v,
                 params={"loss/st_threshold": "0.0"})
        _log_run(client, exp, parent, preset="st", seed=r, split_seed=r, best=v, last=v, test=v + 0.01,
                 params={"loss/st_threshold": "0.7"})
    rep = report.build_report(report.sweep_children(client, client.get_run(parent)), title="t")
    assert rep.rows == ["suponly", "st"] and rep.comparison("st", (("split", "1_8"),)).diffs == pytest.approx([1.0] * 3)
