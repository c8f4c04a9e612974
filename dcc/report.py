"""Tables of finished runs, read back from MLflow: the paper's ablation and split tables, grids, seeds.

    python -m dcc.report                       # the latest sweep in the store
    python -m dcc.report digits                # the latest sweep of experiment "digits"
    python -m dcc.report digits --all          # every finished run of the experiment
    python -m dcc.report <parent run id | sweep name> [--by loss/weight] [--out DIR]

Rows are loss presets (in the order of Table 3), columns are splits or, for a grid, the swept values
(the config keys that differ between the runs, found automatically or named with ``--by``). A cell is
the mean +- standard deviation over seeds of the best and of the last validation mIoU (percent); where
dataset, segnet and backbone are those of a table of the paper, the paper's number and the difference
(best - paper) stand beside it. The table is printed as Markdown and written, with a CSV and a PNG
chart, to ``--out``; for a sweep the three files are also logged to its parent run (``report/``).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from dcc.config import result_neutral
from dcc.tracking import PARENT_TAG, SWEEP_NAME_TAG, SWEEP_TAG, default_tracking_uri  # noqa: F401 - PARENT_TAG, SWEEP_TAG: used by tests

BEST, LAST = "val/best_miou", "val/final_miou"

# Table 3's rows, in the paper's order; other presets follow alphabetically.
ROW_ORDER = ("suponly", "st", "ablation_i", "ablation_ii", "ablation_iii", "ablation_iv", "ablation_v",
             "ablation_vi", "ablation_vii", "ablation_viii", "weakly")
SPLIT_ORDER = ("1_16", "1_8", "1_4", "1_2", "full")

# Keys that never make a column: the seed (averaged over), the keys a loss preset fixes (the rows),
# the split (its own column key) and keys that do not change what a run computes.
SEED_KEYS = ("trainer/seed",)
ROW_KEYS = ("loss/preset", "loss/method", "loss/proj", "loss/context", "loss/cl", "loss/dir", "loss/ns", "loss/pf",
            "loss/weak", "dataset/image_labels")
SPLIT_KEYS = ("split/name", "split/fraction")

# The switches of Table 3 (config key, column name), and each preset's, for runs that did not log them.
SWITCHES = (("proj", "Proj"), ("context", "Context"), ("cl", "CL"), ("dir", "Dir"), ("ns", "NS"), ("pf", "PF"))
PRESET_SWITCHES = {
    "suponly": "", "st": "", "ablation_i": "Proj+Context", "ablation_ii": "Proj+Context+CL",
    "ablation_iii": "Proj+Context+CL+Dir", "ablation_iv": "Proj+Context+CL+Dir+NS", "ablation_v": "Proj+Context+CL+NS+PF",
    "ablation_vi": "Proj+CL+Dir+NS+PF", "ablation_vii": "Context+CL+Dir+NS+PF", "ablation_viii": "Proj+Context+CL+Dir+NS+PF",
    "weakly": "Proj+Context+CL+Dir+NS+PF",
}


def switches_label(preset: str, params: dict[str, str]) -> str | None:
    """``Proj+Context+CL+Dir+NS`` from a run's params (else the preset's known switches); no switch: the method."""
    if all(f"loss/{k}" in params for k, _ in SWITCHES):
        on = "+".join(name for k, name in SWITCHES if params[f"loss/{k}"].lower() == "true")
    elif preset in PRESET_SWITCHES:
        on = PRESET_SWITCHES[preset]
    else:
        return None
    if not on:
        method = params.get("loss/method", "st" if preset == "st" else "suponly")
        return "self-training" if method == "st" else "supervised only"
    return on + ("+weak" if params.get("loss/weak", "").lower() == "true" else "")

# ---------------------------------------------------------------------------------------------------
# The paper's numbers (Lai et al., CVPR 2021), mIoU in percent.

# Table 3 (ablation): Pascal VOC, DeepLabv3+ ResNet-50, 1/8 of the labels.
TABLE3_SETTING = ("voc", "deeplabv3plus", "resnet50", "1_8")
TABLE3 = {
    "suponly": 64.7, "st": 66.3, "ablation_i": 64.2, "ablation_ii": 56.4, "ablation_iii": 64.8,
    "ablation_iv": 71.6, "ablation_v": 71.2, "ablation_vi": 70.5, "ablation_vii": 61.5, "ablation_viii": 72.4,
}
# Table 1: Pascal VOC; "Ours" is the full method (ablation_viii).
TABLE1 = {
    ("pspnet", "resnet50"): {
        "suponly": {"1_16": 57.4, "1_8": 65.0, "1_4": 68.3, "full": 75.1},
        "ablation_viii": {"1_16": 67.1, "1_8": 71.3, "1_4": 72.5, "full": 76.4},
    },
    ("deeplabv3plus", "resnet50"): {
        "suponly": {"1_16": 63.9, "1_8": 68.3, "1_4": 71.2, "full": 76.3},
        "ablation_viii": {"1_16": 70.1, "1_8": 72.4, "1_4": 74.0, "full": 76.5},
    },
    ("deeplabv3plus", "resnet101"): {
        "suponly": {"1_16": 66.4, "1_8": 71.0, "1_4": 73.5, "full": 77.7},
        "ablation_viii": {"1_16": 72.4, "1_8": 74.6, "1_4": 76.3, "full": 78.2},
    },
}
# Table 2: Cityscapes (the paper's Cityscapes experiments use DeepLabv3+ ResNet-50).
TABLE2 = {
    ("deeplabv3plus", "resnet50"): {
        "suponly": {"1_8": 66.0, "1_4": 70.7, "full": 77.7},
        "ablation_viii": {"1_8": 69.7, "1_4": 72.7, "full": 77.5},
    },
}

# Table 5: Pascal VOC classic protocol (1,464 pixel-labeled, 9,118 unlabeled = split "full"), "Semi" = the full
# method (ablation_viii), "Weakly" = with image-level labels (the weakly preset). Head: DeepLabv3+ (see
# conf/experiment/voc_table5_*.yaml).
TABLE5 = {
    "resnet50": {"ablation_viii": 74.5, "weakly": 76.1},
    "vgg16": {"ablation_viii": 68.7, "weakly": 69.3},
}


def paper_dataset(name: str) -> str | None:
    """Map a dataset tag to the paper's dataset (``voc``, ``cityscapes``) or None."""
    n = name.lower()
    if "voc" in n or "pascal" in n:
        return "voc"
    if "cityscapes" in n:
        return "cityscapes"
    return None


def paper_miou(dataset: str, segnet: str, backbone: str, preset: str, split: str, *, ablation: bool,
               force: bool = False, protocol: str = "aug") -> float | None:
    """The paper's mIoU for this setting, or None when no table of the paper has it.

    ``ablation``: the report is an ablation table (presets beyond SupOnly and the full method), so at
    Table 3's setting its numbers are used (its SupOnly, 64.7, differs from Table 1's 68.3).
    ``force``: compare with Table 3 / Table 1 (VOC, DeepLabv3+ ResNet-50) whatever the run's setting.
    ``protocol``: VOC's ``dataset.protocol``; classic at split full with DeepLabv3+ is Table 5's setting.
    """
    if force:
        dataset, segnet, backbone = "voc", "deeplabv3plus", "resnet50"
    ds = paper_dataset(dataset)
    if ds is None:
        return None
    if ds == "voc" and protocol == "classic" and split == "full" and segnet == "deeplabv3plus" and \
            preset in ("ablation_viii", "weakly"):
        return TABLE5.get(backbone, {}).get(preset)
    if ds == "voc" and (ablation or preset not in ("suponly", "ablation_viii")) and \
            (ds, segnet, backbone, split) == TABLE3_SETTING:
        return TABLE3.get(preset)
    table = TABLE1 if ds == "voc" else TABLE2
    return table.get((segnet, backbone), {}).get(preset, {}).get(split)


# ---------------------------------------------------------------------------------------------------
# Runs -> records -> cells


@dataclass
class Record:
    run_id: str
    row: str  # loss preset
    col: tuple[tuple[str, str], ...]  # ((key, value), ...) of the column keys
    seed: str
    best: float
    last: float
    dataset: str
    segnet: str
    backbone: str
    split: str
    start_time: int
    protocol: str = "aug"  # dataset.protocol (VOC)
    switches: str | None = None  # Table 3's switches that are on (Proj+Context+...), for chart labels


@dataclass
class Cell:
    row: str
    col: tuple[tuple[str, str], ...]
    best: list[float]
    last: list[float]
    seeds: list[str]
    paper: float | None = None

    @property
    def n(self) -> int:
        return len(self.best)

    @staticmethod
    def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
        mean = statistics.fmean(xs)
        return mean, (statistics.stdev(xs) if len(xs) > 1 else 0.0)

    @property
    def best_mean_std(self) -> tuple[float, float]:
        return self._mean_std(self.best)

    @property
    def last_mean_std(self) -> tuple[float, float]:
        return self._mean_std(self.last)

    @property
    def delta(self) -> float | None:
        return None if self.paper is None else self.best_mean_std[0] - self.paper

    @property
    def delta_last(self) -> float | None:
        return None if self.paper is None else self.last_mean_std[0] - self.paper


@dataclass
class Report:
    title: str
    by: list[str]  # the column keys
    cells: list[Cell]
    rows: list[str]
    cols: list[tuple[tuple[str, str], ...]]
    notes: list[str] = field(default_factory=list)
    paper_label: str = "paper"
    switches: dict[str, str] = field(default_factory=dict)  # row -> its switches (chart labels)

    def row_label(self, row: str) -> str:
        sw = self.switches.get(row)
        return f"{row}\n{sw}" if sw else row

    @property
    def has_paper(self) -> bool:
        return any(c.paper is not None for c in self.cells)

    def cell(self, row: str, col: tuple[tuple[str, str], ...]) -> Cell | None:
        for c in self.cells:
            if c.row == row and c.col == col:
                return c
        return None


def _row_key(preset: str) -> tuple[int, str]:
    return (ROW_ORDER.index(preset), "") if preset in ROW_ORDER else (len(ROW_ORDER), preset)


def _value_key(key: str, value: str) -> tuple[Any, ...]:
    if key in ("split", "split/name") and value in SPLIT_ORDER:
        return (0, SPLIT_ORDER.index(value), "")
    try:
        return (1, float(value), "")
    except ValueError:
        return (2, 0.0, value)


def _col_key(col: tuple[tuple[str, str], ...]) -> tuple[Any, ...]:
    return tuple(_value_key(k, v) for k, v in col)


def _ignored(key: str) -> bool:
    if key in SEED_KEYS or key in ROW_KEYS or key in SPLIT_KEYS:
        return True
    return result_neutral(key)


def varying_keys(params: Sequence[dict[str, str]]) -> list[str]:
    """Config keys whose value differs between runs (split first), the seed and row keys left out."""
    keys = sorted({k for p in params for k in p})
    out = []
    if len({p.get("split/name") for p in params}) > 1:
        out.append("split")
    for k in keys:
        if not _ignored(k) and len({p.get(k) for p in params}) > 1:
            out.append(k)
    return out


def _metric(run: Any, name: str) -> float | None:
    v = run.data.metrics.get(name)
    return None if v is None or not math.isfinite(v) else float(v)


def records_from_runs(runs: Iterable[Any], by: Sequence[str] | None = None) -> tuple[list[Record], list[str], list[str]]:
    """Turn MLflow runs into records keyed by (row, column, seed); returns (records, column keys, notes).

    A run without both metrics is skipped; of several runs with the same row, column and seed only the
    latest is kept (a sweep that was run twice into one experiment, a failed run and its rerun).
    """
    notes: list[str] = []
    usable = []
    skipped = 0
    for r in runs:
        best, last = _metric(r, BEST), _metric(r, LAST)
        if best is None or last is None or "loss" not in r.data.tags:
            skipped += 1
            continue
        usable.append((r, best, last))
    if skipped:
        notes.append(f"{skipped} run(s) without {BEST} and {LAST} (or without a loss tag) left out")
    params = [dict(r.data.params) for r, _, _ in usable]
    keys = list(by) if by else varying_keys(params)
    if not keys:
        keys = ["split"]
    latest: dict[tuple[Any, ...], Record] = {}
    for (r, best, last), p in zip(usable, params):
        tags = r.data.tags
        split = tags.get("split", p.get("split/name", "?"))
        col = tuple((k, split if k == "split" else p.get(k, tags.get(k, "?"))) for k in keys)
        rec = Record(
            run_id=r.info.run_id, row=tags["loss"], col=col, seed=tags.get("seed", p.get("trainer/seed", "?")),
            best=best, last=last, dataset=tags.get("dataset", "?"), segnet=tags.get("segnet", "?"),
            backbone=tags.get("backbone", "?"), split=split, start_time=int(r.info.start_time or 0),
            protocol=p.get("dataset/protocol", "aug"), switches=switches_label(tags["loss"], p),
        )
        key = (rec.row, rec.col, rec.seed)
        if key not in latest or latest[key].start_time < rec.start_time:
            latest[key] = rec
    dupes = len(usable) - len(latest)
    if dupes:
        notes.append(f"{dupes} older run(s) with the same preset, column and seed as a newer one left out")
    return sorted(latest.values(), key=lambda x: (_row_key(x.row), _col_key(x.col), x.seed)), keys, notes


def build_report(runs: Iterable[Any], *, title: str, by: Sequence[str] | None = None, paper: str = "match") -> Report:
    """Aggregate runs over seeds. ``paper``: ``match`` (paper numbers where the setting matches),
    ``always`` (compare with Table 3 / Table 1 at VOC, DeepLabv3+ ResNet-50) or ``never``."""
    records, keys, notes = records_from_runs(runs, by)
    groups: dict[tuple[Any, ...], list[Record]] = {}
    for rec in records:
        groups.setdefault((rec.row, rec.col), []).append(rec)
    rows = sorted({r.row for r in records}, key=_row_key)
    cols = sorted({r.col for r in records}, key=_col_key)
    ablation = any(r not in ("suponly", "ablation_viii", "weakly") for r in rows)
    cells = []
    for (row, col), recs in groups.items():
        cell = Cell(row=row, col=col, best=[100 * r.best for r in recs], last=[100 * r.last for r in recs],
                    seeds=[r.seed for r in recs])
        settings = {(r.dataset, r.segnet, r.backbone, r.split, r.protocol) for r in recs}
        if paper != "never" and len(settings) == 1:
            (dataset, segnet, backbone, split, protocol), = settings
            cell.paper = paper_miou(dataset, segnet, backbone, row, split, ablation=ablation,
                                    force=paper == "always", protocol=protocol)
        cells.append(cell)
    cells.sort(key=lambda c: (_row_key(c.row), _col_key(c.col)))
    label = "paper" if paper != "always" else "paper (VOC, DeepLabv3+ R50)"
    if paper == "match" and not any(c.paper is not None for c in cells):
        found = sorted({f"{r.dataset}/{r.segnet}/{r.backbone}" for r in records})
        if found:
            notes.append("no paper numbers: dataset/segnet/backbone " + ", ".join(found)
                         + " match no table of the paper (--paper always compares with Table 3 anyway)")
    switches = {r.row: r.switches for r in records if r.switches}
    return Report(title=title, by=keys, cells=cells, rows=rows, cols=cols, notes=notes, paper_label=label,
                  switches=switches)


# ---------------------------------------------------------------------------------------------------
# Rendering


def _fmt(mean_std: tuple[float, float], n: int) -> str:
    mean, std = mean_std
    return f"{mean:.1f} ± {std:.1f}" if n > 1 else f"{mean:.1f}"


def _signed(x: float | None) -> str:
    return "" if x is None else f"{x:+.1f}"


def short(value: str) -> str:
    """A swept value for display: long floats (Optuna's) to 4 significant digits."""
    try:
        return f"{float(value):.4g}" if len(value) > 6 and "." in value else value
    except ValueError:
        return value


def col_label(col: tuple[tuple[str, str], ...], keys: Sequence[str]) -> str:
    if len(keys) == 1 and keys[0] == "split":
        return col[0][1].replace("_", "/")
    if len(keys) == 1:  # one swept key: its last part is enough (weight=0.1)
        return f"{keys[0].rsplit('/', 1)[-1]}={short(col[0][1])}"
    return ", ".join(f"{k}={short(v)}" for k, v in col)


def layout_for(report: Report, layout: str = "auto") -> str:
    if layout != "auto":
        return layout
    return "wide" if len(report.by) == 1 and len(report.cols) <= 6 else "long"


def _md_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def to_markdown(report: Report, layout: str = "auto") -> str:
    """Wide: one row per preset, per column best / last (and paper / delta). Long: one row per cell."""
    if not report.cells:
        return f"## {report.title}\n\nNo finished runs with validation mIoU.\n"
    layout = layout_for(report, layout)
    ns = {c.n for c in report.cells}
    paper_cols = {c.col for c in report.cells if c.paper is not None}
    if layout == "wide":
        header = ["loss"]
        for col in report.cols:
            lab = col_label(col, report.by)
            header += [f"{lab} best", f"{lab} last"]
            if col in paper_cols:
                header += [f"{lab} {report.paper_label}", f"{lab} Δ"]
        body = []
        for row in report.rows:
            line = [row]
            for col in report.cols:
                c = report.cell(row, col)
                line += [_fmt(c.best_mean_std, c.n), _fmt(c.last_mean_std, c.n)] if c else ["–", "–"]
                if col in paper_cols:
                    line += ([f"{c.paper:.1f}", _signed(c.delta)] if c and c.paper is not None else ["", ""])
            body.append(line)
    else:
        header = ["loss", *report.by, "n", "best", "last"] + (
            [report.paper_label, "Δ"] if paper_cols else [])
        body = []
        for c in report.cells:
            line = [c.row, *[short(v) for _, v in c.col], str(c.n), _fmt(c.best_mean_std, c.n),
                    _fmt(c.last_mean_std, c.n)]
            if paper_cols:
                line += [f"{c.paper:.1f}" if c.paper is not None else "", _signed(c.delta)]
            body.append(line)
    text = [f"## {report.title}", "", _md_table(header, body), ""]
    seeds = f"{ns.pop()} seed(s) per cell" if len(ns) == 1 else "seeds per cell vary (see the CSV's n)"
    text.append(f"Validation mIoU (%), mean ± std over seeds of the best and of the last evaluation; {seeds}."
                + (" Δ = best − paper." if paper_cols else ""))
    text += [f"Note: {n}." for n in report.notes]
    return "\n".join(text) + "\n"


CSV_FIELDS = ("loss", "column", "n", "seeds", "best_mean", "best_std", "last_mean", "last_std", "paper",
              "delta_best", "delta_last")


def to_csv(report: Report) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*CSV_FIELDS[:2], *report.by, *CSV_FIELDS[2:]])
    for c in report.cells:
        (bm, bs), (lm, ls) = c.best_mean_std, c.last_mean_std
        w.writerow([c.row, col_label(c.col, report.by), *[v for _, v in c.col], c.n, " ".join(c.seeds),
                    f"{bm:.3f}", f"{bs:.3f}", f"{lm:.3f}", f"{ls:.3f}",
                    "" if c.paper is None else c.paper, "" if c.delta is None else f"{c.delta:.3f}",
                    "" if c.delta_last is None else f"{c.delta_last:.3f}"])
    return buf.getvalue()


def _numeric(values: Sequence[str]) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def plot(report: Report, path: Path) -> Path:
    """Write :func:`chart` to ``path`` (PNG)."""
    fig = chart(report)  # selects the Agg backend first
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def chart(report: Report) -> Any:
    """Grouped bars (best mIoU, std over seeds as error bars where there are several seeds, paper numbers as
    black ticks), rows labelled by their switches (Proj+Context+CL+...); a line plot over the swept value
    when the column key is one numeric config key (a lambda, gamma or tau grid)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs_values = [col[0][1] for col in report.cols] if len(report.by) == 1 else []
    numeric = _numeric(xs_values) if xs_values and report.by[0] != "split" else None
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(report.rows) * max(1, len(report.cols)) ** 0.5 + 2), 4.5))
    if numeric is not None and len(report.cols) > 1:
        for row in report.rows:
            pts = [(x, report.cell(row, col)) for x, col in zip(numeric, report.cols)]
            pts = [(x, c) for x, c in pts if c is not None]
            line, = ax.plot([x for x, _ in pts], [c.best_mean_std[0] for _, c in pts], marker="o",
                            label=report.row_label(row).replace("\n", ": "))
            spread = [(x, c) for x, c in pts if c.n > 1]  # no error bar for a single seed
            if spread:
                ax.errorbar([x for x, _ in spread], [c.best_mean_std[0] for _, c in spread],
                            yerr=[c.best_mean_std[1] for _, c in spread], fmt="none", capsize=3, color=line.get_color())
        if min(numeric) > 0 and max(numeric) / min(numeric) >= 20:
            ax.set_xscale("log")
        ax.set_xlabel(report.by[0])
    else:
        width = 0.8 / max(1, len(report.cols))
        for j, col in enumerate(report.cols):
            xs, ys, spread, papers = [], [], [], []
            for i, row in enumerate(report.rows):
                c = report.cell(row, col)
                if c is None:
                    continue
                x = i - 0.4 + width * (j + 0.5)
                xs.append(x)
                ys.append(c.best_mean_std[0])
                if c.n > 1:  # no error bar for a single seed
                    spread.append((x, *c.best_mean_std))
                if c.paper is not None:
                    papers.append((x, c.paper))
            ax.bar(xs, ys, width=width * 0.9, label=col_label(col, report.by))
            if spread:
                ax.errorbar([x for x, _, _ in spread], [m for _, m, _ in spread], yerr=[s for _, _, s in spread],
                            fmt="none", capsize=2, color="black", linewidth=0.8)
            if papers:
                ax.scatter([x for x, _ in papers], [p for _, p in papers], marker="_", s=300, color="black",
                           zorder=3, label=report.paper_label if j == 0 else None)
        ax.set_xticks(range(len(report.rows)))
        ax.set_xticklabels([report.row_label(r) for r in report.rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("best validation mIoU (%)")
    ax.set_title(report.title)
    ax.grid(axis="y", alpha=0.3)
    if len(report.cols) > 1 or report.has_paper or numeric is not None:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def summary_metrics(report: Report) -> dict[str, float]:
    """The table as MLflow metrics of the sweep's parent run (fractions, like the jobs' ``val/*_miou``):
    ``mean_final_miou/<row>[/<column>]`` and ``mean_best_miou/...`` per cell (the column only when there are
    several), ``best_mean_final_miou`` over the cells and ``finished_runs``."""
    out: dict[str, float] = {}
    for c in report.cells:
        col = ""
        if len(report.cols) > 1:
            col = "/" + "_".join(v if k in ("split", "split/name") else f"{k.rsplit('/', 1)[-1]}_{short(v)}"
                                 for k, v in c.col)
        name = re.sub(r"[^\w\-. :/]", "_", f"{c.row}{col}")
        out[f"mean_final_miou/{name}"] = c.last_mean_std[0] / 100
        out[f"mean_best_miou/{name}"] = c.best_mean_std[0] / 100
    if report.cells:
        out["best_mean_final_miou"] = max(c.last_mean_std[0] for c in report.cells) / 100
    out["finished_runs"] = float(sum(c.n for c in report.cells))
    return out


def write_report(report: Report, out_dir: Path, layout: str = "auto") -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"markdown": out_dir / "table.md", "csv": out_dir / "table.csv", "png": out_dir / "chart.png"}
    files["markdown"].write_text(to_markdown(report, layout))
    files["csv"].write_text(to_csv(report))
    if report.cells:
        plot(report, files["png"])
    else:
        del files["png"]
    return files


# ---------------------------------------------------------------------------------------------------
# MLflow


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


class ReportError(RuntimeError):
    pass


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
                      out_dir: Path | None = None, layout: str = "auto", log: bool = True) -> tuple[Report, dict[str, Path]]:
    """Build, write and (``log``) attach to the parent run the report of one sweep; used by the sweep callback."""
    parent = client.get_run(parent_run_id)
    report = build_report(sweep_children(client, parent), title=_sweep_title(parent), by=by, paper=paper)
    files = write_report(report, out_dir or Path("reports") / _slug(report.title), layout)
    if log:
        for f in files.values():
            client.log_artifact(parent_run_id, str(f), "report")
    return report, files


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
    ap.add_argument("--layout", choices=("auto", "wide", "long"), default="auto")
    ap.add_argument("--include-unfinished", action="store_true", help="also use RUNNING/FAILED/KILLED runs that logged final metrics")
    ap.add_argument("--out", default=None, help="directory for table.md, table.csv and chart.png (default: reports/<sweep>)")
    ap.add_argument("--no-log", action="store_true", help="do not log the files to the sweep's parent run")
    args = ap.parse_args(argv)

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
    statuses = ("FINISHED", "RUNNING", "FAILED", "KILLED") if args.include_unfinished else ("FINISHED",)
    if parent is not None:
        runs = sweep_children(client, parent, statuses)
    else:
        runs = [r for r in search_all(client, exp_ids)
                if r.info.status in statuses and r.data.tags.get(SWEEP_TAG) != "true"]
    by = [k.strip() for k in args.by.split(",") if k.strip()] if args.by else None
    report = build_report(runs, title=title, by=by, paper=args.paper)
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
