"""A :class:`~dcc.sweeps.aggregate.Report` as Markdown, CSV, a PNG chart and MLflow metrics; :func:`write_report`
writes the three files.

Every table and the chart state in their titles the report's evaluation split, its budget (steps) and the
number of replicates; a cell shows n, mean, std and a 95% Student-t interval, the paired table each arm's
differences from the baseline arm with their interval and verdict. With one replicate there is no std and
no interval, and the report says that the differences are not separable.
"""

from __future__ import annotations

import csv
import io
import re
import textwrap
from pathlib import Path
from typing import Any, Sequence

from dcc.engine.naming import short
from dcc.sweeps.aggregate import CONFIDENCE, Cell, Comparison, Report

NOT_SEPARABLE_N1 = "n=1: no interval; differences not separable"
DASH = "–"


def _ci(ci: tuple[float, float] | None, signed: bool = False) -> str:
    if ci is None:
        return DASH
    f = "{:+.1f}" if signed else "{:.1f}"
    return f"[{f.format(ci[0])}, {f.format(ci[1])}]"


def _signed(x: float | None) -> str:
    return "" if x is None else f"{x:+.1f}"


def col_label(col: tuple[tuple[str, str], ...], keys: Sequence[str]) -> str:
    if len(keys) == 1 and keys[0] == "split":
        return col[0][1].replace("_", "/")
    if len(keys) == 1:  # one swept key: its last part is enough (weight=0.1)
        return f"{keys[0].rsplit('/', 1)[-1]}={short(col[0][1])}"
    return ", ".join(f"{k}={short(v)}" for k, v in col)


def layout_for(report: Report, layout: str = "auto") -> str:
    """``wide`` (one table column per swept value) for 2-6 values of one key, else ``long`` (a row per cell)."""
    if layout != "auto":
        return layout
    return "wide" if len(report.by) == 1 and 2 <= len(report.cols) <= 6 else "long"


def _md_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def metric_label(report: Report) -> str:
    return ("test mIoU (%)" if report.split == "test" else "final validation mIoU (%)")


def _compact(c: Cell, show_n: bool) -> str:
    """``55.3 ± 0.3 [54.5, 56.1]`` (n > 1) or ``55.3`` (n = 1) for a wide table's cell."""
    text = f"{c.mean:.1f}" if c.n < 2 else f"{c.mean:.1f} ± {c.std:.1f} {_ci(c.ci)}"
    return text + (f" (n={c.n})" if show_n else "")


def _col_values(report: Report, col: tuple[tuple[str, str], ...]) -> list[str]:
    if len(report.cols) < 2:
        return []
    return [v.replace("_", "/") if k in ("split", "split/name") else short(v) for k, v in col]


def _col_header(report: Report) -> list[str]:
    return list(report.by) if len(report.cols) > 1 else []


def cells_markdown(report: Report, layout: str = "auto") -> str:
    layout = layout_for(report, layout)
    paper_cols = {c.col for c in report.cells if c.paper is not None}
    if layout == "wide":
        show_n = len({c.n for c in report.cells}) > 1
        header = [report.row_key]
        for col in report.cols:
            lab = col_label(col, report.by)
            header.append(lab)
            if col in paper_cols:
                header += [f"{lab} {report.paper_label}", f"{lab} Δ"]
        body = []
        for row in report.rows:
            line = [row]
            for col in report.cols:
                c = report.cell(row, col)
                line.append(_compact(c, show_n) if c else DASH)
                if col in paper_cols:
                    line += ([f"{c.paper:.1f}", _signed(c.delta)] if c and c.paper is not None else ["", ""])
            body.append(line)
    else:
        header = [report.row_key, *_col_header(report), "n", "mean", "std", f"{CONFIDENCE:.0%} CI"] + (
            [report.paper_label, "Δ"] if paper_cols else [])
        body = []
        for c in report.cells:
            line = [c.row, *_col_values(report, c.col), str(c.n), f"{c.mean:.1f}",
                    DASH if c.std is None else f"{c.std:.1f}", _ci(c.ci)]
            if paper_cols:
                line += [f"{c.paper:.1f}" if c.paper is not None else "", _signed(c.delta)]
            body.append(line)
    return _md_table(header, body)


def _per_replicate(report: Report, c: Comparison) -> str:
    return ", ".join(f"{report.rep_label(r)}: {d:+.1f}" for r, d in zip(c.replicates, c.diffs)) or DASH


def paired_markdown(report: Report) -> str:
    header = [report.row_key, *_col_header(report), "paired", "per replicate", "mean", f"{CONFIDENCE:.0%} CI", "same sign",
              "verdict"]
    body = []
    for c in report.comparisons:
        paired = str(c.n) + (f" ({c.unpaired} unpaired)" if c.unpaired else "")
        body.append([c.row, *_col_values(report, c.col), paired, _per_replicate(report, c),
                     DASH if c.mean is None else f"{c.mean:+.1f}", _ci(c.ci, signed=True),
                     f"{c.same_sign}/{c.n}" if c.n else DASH, c.verdict])
    return _md_table(header, body)


def replicates_sentence(report: Report) -> str:
    seeds = ", ".join(report.split_seeds)
    if report.subset == "fixed":
        return ("Replicates vary `trainer.seed` only: the labeled subset was fixed"
                + (f" (`split.seed` {seeds} in every run)" if len(report.split_seeds) == 1 else "")
                + ", so the spread leaves out what another labeled subset would change.")
    if report.subset == "varies":
        return ("A replicate is a training seed and a labeled subset (`trainer.seed`, `split.seed`); arms are paired "
                "on both.")
    if report.subset == "mixed":
        return ("The labeled subset varies between the replicates of some cells only (`split.seed`: "
                f"{seeds or 'not logged'}); arms are paired on (`trainer.seed`, `split.seed`).")
    reps = {r for c in report.cells for r in c.replicates}
    if len(reps) == 1:
        (seed, split_seed), = reps
        return f"One replicate: `trainer.seed` {seed}" + (f", `split.seed` {split_seed}." if split_seed else ".")
    return "Replicates are (`trainer.seed`, `split.seed`) pairs."


def to_markdown(report: Report, layout: str = "auto") -> str:
    """The cells (n, mean, std, 95% interval; paper and Δ where the setting matches) and, with a baseline, the
    paired differences of every arm from it; every title states the split, the budget and n."""
    if not report.cells:
        return f"## {report.title}\n\nNo finished runs with {report.metric}.\n"
    metric = ("on the test split (`test/miou`, measured once at the end of each run)" if report.split == "test"
              else "on the validation split (`val/final_miou`, the last evaluation of each run)")
    text = [f"## {report.heading()}", "", cells_markdown(report, layout), "",
            f"mIoU (%) {metric}: mean, sample std and {CONFIDENCE:.0%} Student-t interval over replicates"
            + (" (wide cells: mean ± std [interval])" if layout_for(report, layout) == "wide" else "")
            + ("; Δ = mean − paper." if report.has_paper else ".") + " " + replicates_sentence(report)]
    if report.single_replicate:
        text.append(f"{NOT_SEPARABLE_N1}.")
    if report.comparisons:
        text += ["", f"### {report.heading(f'paired differences vs {report.baseline}', report.paired_n_label)}", "",
                 paired_markdown(report), "",
                 f"Difference = arm − {report.baseline} in points, per replicate that both ran; mean with its "
                 f"{CONFIDENCE:.0%} Student-t interval; same sign: replicates whose difference has the mean's sign; "
                 "better / worse only when the interval excludes 0, else not separable."]
        if any(c.n == 1 for c in report.comparisons):
            text.append(f"{NOT_SEPARABLE_N1}.")
    text += [f"Note: {n}." for n in report.notes]
    return "\n".join(text) + "\n"


CSV_FIELDS = ("loss", "column", "eval_split", "steps", "n", "replicates", "values", "mean", "std", "ci_low", "ci_high",
              "paper", "delta", "baseline", "paired", "unpaired", "diffs", "diff_mean", "diff_std", "diff_ci_low",
              "diff_ci_high", "same_sign", "verdict")


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.3f}"


def to_csv(report: Report) -> str:
    """One row per cell (the swept keys as columns after ``column``; ``split`` among them is the labeled share,
    ``eval_split`` the evaluation split, val or test): its replicates and values (percent), mean,
    std and interval; for an arm other than the baseline, its paired differences from the baseline."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*CSV_FIELDS[:2], *report.by, *CSV_FIELDS[2:]])
    for c in report.cells:
        ci = c.ci
        cmp = report.comparison(c.row, c.col)
        paired: list[Any] = [""] * 10
        if cmp is not None:
            dci = cmp.ci
            paired = [cmp.baseline, cmp.n, cmp.unpaired,
                      " ".join(f"{report.rep_label(r)}:{d:.3f}" for r, d in zip(cmp.replicates, cmp.diffs)),
                      _num(cmp.mean), _num(cmp.std), _num(dci and dci[0]), _num(dci and dci[1]), cmp.same_sign,
                      cmp.verdict]
        w.writerow([c.row, col_label(c.col, report.by), *[v for _, v in c.col], report.split, c.steps, c.n,
                    " ".join(report.rep_label(r) for r in c.replicates), " ".join(f"{v:.3f}" for v in c.values),
                    _num(c.mean), _num(c.std),
                    _num(ci and ci[0]), _num(ci and ci[1]), "" if c.paper is None else c.paper, _num(c.delta),
                    *paired])
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
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _yerr(points: Sequence[tuple[float, float, tuple[float, float]]]) -> list[list[float]]:
    return [[m - lo for _, m, (lo, _) in points], [hi - m for _, m, (_, hi) in points]]


def _wrap(text: str) -> str:
    return "\n".join(textwrap.wrap(text, 90))


def chart(report: Report) -> Any:
    """Top: the cells' means with their 95% intervals (bars per column, paper numbers as black ticks; a line
    over the swept value for a grid of one numeric key). Bottom, with a baseline: each arm's paired differences
    (dots, one per replicate) and their mean with its 95% interval. Titles state split, budget and n; legends
    sit below the plots, never over the bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs_values = [col[0][1] for col in report.cols] if len(report.by) == 1 else []
    numeric = _numeric(xs_values) if xs_values and report.by[0] != "split" else None
    paired = bool(report.comparisons)
    width_in = max(7.0, 0.9 * len(report.rows) * max(1, len(report.cols)) ** 0.5 + 2)
    fig, axes = plt.subplots(2 if paired else 1, 1, figsize=(width_in, 9.0 if paired else 5.0), layout="constrained",
                             squeeze=False)
    ax = axes[0][0]
    grid = numeric is not None and len(report.cols) > 1
    if grid:
        for i, row in enumerate(report.rows):
            pts = [(x, report.cell(row, col)) for x, col in zip(numeric, report.cols)]
            pts = [(x, c) for x, c in pts if c is not None]
            line, = ax.plot([x for x, _ in pts], [c.mean for _, c in pts], marker="o", color=f"C{i}",
                            label=report.row_label(row).replace("\n", ": "))
            spread = [(x, c.mean, c.ci) for x, c in pts if c.ci is not None]  # no interval for one replicate
            if spread:
                ax.errorbar([x for x, _, _ in spread], [m for _, m, _ in spread], yerr=_yerr(spread), fmt="none",
                            capsize=3, color=line.get_color())
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
                ys.append(c.mean)
                if c.ci is not None:  # no interval for one replicate
                    spread.append((x, c.mean, c.ci))
                if c.paper is not None:
                    papers.append((x, c.paper))
            ax.bar(xs, ys, width=width * 0.9, color=f"C{j}",
                   label=col_label(col, report.by) if len(report.cols) > 1 else None)
            if spread:
                ax.errorbar([x for x, _, _ in spread], [m for _, m, _ in spread], yerr=_yerr(spread), fmt="none",
                            capsize=3, color="black", linewidth=0.9,
                            label=f"{CONFIDENCE:.0%} interval" if j == 0 else None)
            if papers:
                ax.scatter([x for x, _ in papers], [p for _, p in papers], marker="_", s=300, color="black",
                           zorder=3, label=report.paper_label if j == 0 else None)
        ax.set_xticks(range(len(report.rows)))
        ax.set_xticklabels([report.row_label(r) for r in report.rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(metric_label(report))
    title = report.heading() + (f" ({NOT_SEPARABLE_N1})" if report.single_replicate else "")
    ax.set_title(_wrap(title), fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    if paired:
        (_paired_grid_axis(axes[1][0], report, numeric) if grid else _paired_axis(axes[1][0], report))
    handles, labels = [], []
    for a in axes[:, 0]:
        h, lab = a.get_legend_handles_labels()
        for hh, ll in zip(h, lab):
            if ll not in labels:
                handles.append(hh)
                labels.append(ll)
    if handles:  # below every plot: a legend inside the axes covered bars
        per_row = max(1, int(width_in * 11 / (max(len(lab) for lab in labels) + 6)))  # ~11 characters an inch
        fig.legend(handles, labels, loc="outside lower center", ncol=min(per_row, len(handles)), fontsize=8,
                   frameon=False)
    return fig


def _paired_title(ax: Any, report: Report) -> None:
    title = report.heading(f"paired differences vs {report.baseline}, {CONFIDENCE:.0%} intervals",
                           report.paired_n_label)
    if any(c.n == 1 for c in report.comparisons):
        title += f" ({NOT_SEPARABLE_N1})"
    ax.set_title(_wrap(title), fontsize=9)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_ylabel(f"paired difference vs {report.baseline} (points)")
    ax.grid(axis="y", alpha=0.3)


def _paired_grid_axis(ax: Any, report: Report, numeric: Sequence[float]) -> None:
    """A grid's paired differences over the swept value: a line per arm, its replicates as dots."""
    for i, row in enumerate(report.rows):
        pts = [(x, report.comparison(row, col)) for x, col in zip(numeric, report.cols)]
        pts = [(x, c) for x, c in pts if c is not None and c.n]
        if not pts:
            continue
        color = f"C{i}"  # the arm's colour in the lines above
        ax.plot([x for x, _ in pts], [c.mean for _, c in pts], marker="D", color=color)
        ax.scatter([x for x, c in pts for _ in c.diffs], [d for _, c in pts for d in c.diffs], s=12, alpha=0.5,
                   color=color)
        spread = [(x, c.mean, c.ci) for x, c in pts if c.ci is not None]
        if spread:
            ax.errorbar([x for x, _, _ in spread], [m for _, m, _ in spread], yerr=_yerr(spread), fmt="none",
                        capsize=3, color=color)
    if min(numeric) > 0 and max(numeric) / min(numeric) >= 20:
        ax.set_xscale("log")
    ax.set_xlabel(report.by[0])
    _paired_title(ax, report)


def _paired_axis(ax: Any, report: Report) -> None:
    arms = [r for r in report.rows if any(c.row == r for c in report.comparisons)]
    width = 0.8 / max(1, len(report.cols))
    for j, col in enumerate(report.cols):
        xs, spread, dots = [], [], []
        for i, row in enumerate(arms):
            c = report.comparison(row, col)
            if c is None or not c.n:
                continue
            x = i - 0.4 + width * (j + 0.5)
            xs.append((x, c.mean))
            dots += [(x, d) for d in c.diffs]
            if c.ci is not None:
                spread.append((x, c.mean, c.ci))
        if not xs:
            continue
        color = f"C{j}"  # the column's colour in the bars above
        ax.scatter([x for x, _ in xs], [m for _, m in xs], marker="D", s=30, zorder=3, color=color,
                   label="mean difference" if j == 0 else None)
        ax.scatter([x for x, _ in dots], [d for _, d in dots], s=12, alpha=0.5, color=color,
                   label="per replicate" if j == 0 else None)
        if spread:
            ax.errorbar([x for x, _, _ in spread], [m for _, m, _ in spread], yerr=_yerr(spread), fmt="none",
                        capsize=4, color=color)
    ax.set_xlim(-0.6, len(arms) - 0.4)
    ax.set_xticks(range(len(arms)))
    ax.set_xticklabels([report.row_label(r) for r in arms], rotation=30, ha="right", fontsize=8)
    _paired_title(ax, report)


def _metric_name(report: Report, c: Cell | Comparison) -> str:
    col = ""
    if len(report.cols) > 1:
        col = "/" + "_".join(v if k in ("split", "split/name") else f"{k.rsplit('/', 1)[-1]}_{short(v)}"
                             for k, v in c.col)
    return re.sub(r"[^\w\-. :/]", "_", f"{c.row}{col}")


def summary_metrics(report: Report) -> dict[str, float]:
    """The table as MLflow metrics of the sweep's parent run (in %, like the jobs' ``val/*_miou``):
    ``mean_final_miou/<row>[/<column>]`` and ``mean_best_miou/...`` (validation) per cell (the column only when
    there are several), ``best_mean_final_miou`` over the cells and ``finished_runs``; on the report's split
    (``<split>/``): ``mean_miou``, ``n`` and ``ci95_low`` / ``ci95_high`` per cell and, per arm against the
    baseline, ``diff_vs_<baseline>`` (mean paired difference), ``diff_ci95_low`` / ``diff_ci95_high`` and
    ``diff_same_sign``."""
    import statistics

    out: dict[str, float] = {}
    s = report.split
    for c in report.cells:
        name = _metric_name(report, c)
        if c.last:
            out[f"mean_final_miou/{name}"] = statistics.fmean(c.last)
        if c.best:
            out[f"mean_best_miou/{name}"] = statistics.fmean(c.best)
        out[f"{s}/mean_miou/{name}"] = c.mean
        out[f"{s}/n/{name}"] = float(c.n)
        if c.ci is not None:
            out[f"{s}/ci95_low/{name}"], out[f"{s}/ci95_high/{name}"] = c.ci[0], c.ci[1]
    for cmp in report.comparisons:
        if cmp.mean is None:
            continue
        name = _metric_name(report, cmp)
        out[f"{s}/diff_vs_{cmp.baseline}/{name}"] = cmp.mean
        out[f"{s}/diff_same_sign/{name}"] = float(cmp.same_sign)
        if cmp.ci is not None:
            out[f"{s}/diff_ci95_low/{name}"], out[f"{s}/diff_ci95_high/{name}"] = cmp.ci[0], cmp.ci[1]
    lasts = [statistics.fmean(c.last) for c in report.cells if c.last]
    if lasts:
        out["best_mean_final_miou"] = max(lasts)
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
