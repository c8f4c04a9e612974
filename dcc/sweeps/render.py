"""A :class:`~dcc.sweeps.aggregate.Report` as Markdown, CSV, a PNG chart and MLflow metrics; :func:`write_report`
writes the three files."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from typing import Any, Sequence

from dcc.sweeps.aggregate import Report


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
