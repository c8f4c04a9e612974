"""dcc.report on runs written straight into an MLflow store (no training): tables, paper numbers, files."""

from __future__ import annotations

import csv
import io

import pytest
from mlflow.tracking import MlflowClient

from dcc.sweeps import report
from dcc.sweeps.paper import ROW_ORDER, TABLE3

TABLE3_ROWS = [p for p in ROW_ORDER if p in TABLE3]  # the ablation sweep: Table 3 rows in order

PRESET_SCORE = {p: 0.30 + 0.02 * i for i, p in enumerate(TABLE3_ROWS)}


def _log_run(client, exp_id, parent, *, preset, split="1_8", seed=1, best, last, dataset="digits",
             segnet="deeplabv3plus", backbone="resnet18", params=None, status="FINISHED", test=None, split_seed=None,
             steps=4, percent=False):
    """One finished job's run; its mIoU as given (``percent``: tagged dcc.unit=percent, as dcc logs them now;
    else untagged, as runs of a store written before 2026-12-06, in fractions of 1)."""
    tags = {"loss": preset, "split": split, "seed": str(seed), "dataset": dataset, "segnet": segnet,
            "backbone": backbone} | ({"dcc.unit": "percent"} if percent else {})
    if parent is not None:
        tags[report.PARENT_TAG] = parent
    run = client.create_run(exp_id, run_name=f"{preset}-{split}-s{seed}", tags=tags)
    p = {"loss/preset": preset, "split/name": split, "trainer/seed": str(seed), "trainer/max_steps": str(steps),
         "loss/weight": "0.1", "logger/tracking_uri": "x", **(params or {})}
    if split_seed is not None:
        p["split/seed"] = str(split_seed)
    for k, v in p.items():
        client.log_param(run.info.run_id, k, v)
    client.log_metric(run.info.run_id, "val/best_miou", best, step=4)
    client.log_metric(run.info.run_id, "val/final_miou", last, step=4)
    if test is not None:
        client.log_metric(run.info.run_id, "test/miou", test, step=4)
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("digits")
    return uri, client, exp


def _parent(client, exp, name):
    run = client.create_run(exp, run_name=name, tags={report.SWEEP_TAG: "true", report.SWEEP_NAME_TAG: name})
    return run.info.run_id


def test_ablation_sweep_table_has_ten_rows_with_mean_and_std_over_seeds(store, tmp_path, capsys):
    uri, client, exp = store
    parent = _parent(client, exp, "ablation")
    for preset in TABLE3_ROWS:
        for seed, jitter in ((1, -0.01), (2, 0.01)):
            _log_run(client, exp, parent, preset=preset, seed=seed, best=PRESET_SCORE[preset] + jitter,
                     last=PRESET_SCORE[preset] + jitter - 0.05)
    # noise that must not enter the table: an unfinished child, and a run outside the sweep
    _log_run(client, exp, parent, preset="suponly", seed=3, best=0.9, last=0.9, status="FAILED")
    _log_run(client, exp, None, preset="suponly", seed=1, best=0.9, last=0.9)
    out = tmp_path / "rep"
    assert report.main(["--tracking-uri", uri, "--out", str(out)]) == 0  # no target: the latest sweep
    text = capsys.readouterr().out
    table = text.split("\n\n")[1].splitlines()  # the cells (the paired differences follow)
    assert len(table) == 2 + 10, text  # header, rule, 10 rows in Table 3's order
    assert [line.split("|")[1].strip() for line in table[2:]] == TABLE3_ROWS
    assert table[0] == "| loss | n | mean | std | 95% CI |"
    first = [c.strip() for c in table[2].split("|")[2:-1]]
    # suponly's final validation mIoU 24 / 26: mean 25, std sqrt(2), 25 +- t(0.975, 1) * sqrt(2) / sqrt(2)
    assert first == ["2", "25.0", "1.4", "[12.3, 37.7]"]
    assert "## sweep ablation" in text and "labels 1/8, validation split, 4 steps, n=2 replicates" in text
    assert "no paper numbers" in text
    rows = list(csv.DictReader(io.StringIO((out / "table.csv").read_text())))
    assert len(rows) == 10 and rows[0]["loss"] == "suponly" and rows[0]["n"] == "2"
    assert float(rows[-1]["mean"]) == pytest.approx(100 * PRESET_SCORE["ablation_viii"] - 5)
    assert (out / "chart.png").stat().st_size > 1000
    logged = {a.path for a in client.list_artifacts(parent, "report")}
    assert logged == {"report/table.md", "report/table.csv", "report/chart.png"}


def test_paper_numbers_and_difference_where_the_setting_matches(store, tmp_path, capsys):
    uri, client, exp = store
    parent = _parent(client, exp, "ablation-voc")
    for preset in ("suponly", "ablation_iv", "ablation_viii"):
        _log_run(client, exp, parent, preset=preset, dataset="voc", backbone="resnet50", best=0.70, last=0.69)
    assert report.main([parent, "--tracking-uri", uri, "--out", str(tmp_path / "r"), "--no-log"]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert table[0] == "| loss | n | mean | std | 95% CI | paper | Δ |"
    by_row = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table[2:5]}
    # an ablation table: Table 3's numbers (its SupOnly is 64.7, Table 1's is 68.3); Δ = mean - paper
    assert by_row["suponly"] == ["1", "69.0", "–", "–", "64.7", "+4.3"]
    assert by_row["ablation_iv"][4:] == [f"{TABLE3['ablation_iv']:.1f}", "-2.6"]


def test_split_table_uses_table1_and_grid_columns_are_the_swept_values(store, tmp_path, capsys):
    uri, client, exp = store
    parent = _parent(client, exp, "splits")
    for preset in ("suponly", "ablation_viii"):
        for split in ("full", "1_16", "1_4", "1_8"):
            _log_run(client, exp, parent, preset=preset, split=split, dataset="voc", backbone="resnet101",
                     best=0.75, last=0.74)
    rep = report.build_report(report.sweep_children(client, client.get_run(parent)), title="t")
    assert rep.by == ["split"] and [c[0][1] for c in rep.cols] == ["1_16", "1_8", "1_4", "full"]
    assert rep.cell("ablation_viii", (("split", "1_4"),)).paper == 76.3  # Table 1, DeepLabv3+ R101
    assert rep.cell("suponly", (("split", "1_8"),)).paper == 71.0

    grid = _parent(client, exp, "lambda")
    for w in ("0.3", "0.03", "1.0"):
        _log_run(client, exp, grid, preset="ablation_viii", best=0.5, last=0.4, params={"loss/weight": w})
    rep = report.build_report(report.sweep_children(client, client.get_run(grid)), title="lambda")
    assert rep.by == ["loss/weight"] and [c[0][1] for c in rep.cols] == ["0.03", "0.3", "1.0"]
    assert report.main(["lambda", "--tracking-uri", uri, "--out", str(tmp_path / "g")]) == 0
    assert "| loss | weight=0.03 | weight=0.3 | weight=1.0 |" in capsys.readouterr().out
    assert (tmp_path / "g" / "chart.png").exists()


def test_an_experiment_with_all_runs_and_a_clear_error_for_an_unknown_target(store, tmp_path, capsys):
    uri, client, exp = store
    _log_run(client, exp, None, preset="suponly", best=0.5, last=0.5)
    _log_run(client, exp, None, preset="ablation_viii", best=0.6, last=0.6)
    assert report.main(["digits", "--all", "--tracking-uri", uri, "--out", str(tmp_path / "e")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(lines) == 4 + 3  # the cells (2 rows), ablation_viii paired with suponly (1 row)
    assert report.main(["nope", "--tracking-uri", uri]) == 2
    assert "neither an experiment" in capsys.readouterr().err
    assert report.main(["--tracking-uri", f"sqlite:///{tmp_path / 'missing.db'}"]) == 2


def test_table5_numbers_only_at_its_setting():
    from dcc.sweeps.paper import paper_miou

    classic = dict(ablation=False, protocol="classic")
    assert paper_miou("voc", "deeplabv3plus", "resnet50", "weakly", "full", **classic) == 76.1
    assert paper_miou("voc", "deeplabv3plus", "resnet50", "ablation_viii", "full", **classic) == 74.5
    assert paper_miou("voc", "deeplabv3plus", "vgg16", "weakly", "full", **classic) == 69.3
    assert paper_miou("voc", "deeplabv3plus", "resnet50", "ablation_viii", "full", ablation=False) == 76.5  # aug: Table 1
    assert paper_miou("voc", "pspnet", "resnet50", "ablation_viii", "full", **classic) == 76.4  # Table 1's PSPNet
    assert paper_miou("digits", "deeplabv3plus", "resnet18", "weakly", "1_8", **classic) is None
