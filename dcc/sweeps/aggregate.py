"""Finished MLflow runs -> records (one per run) -> cells (mean +- std over seeds) -> a :class:`Report`.

Rows are loss presets (Table 3's order first), columns the config keys that vary between the runs
(found automatically, or named), keys that do not change a result (:data:`dcc.config.RESULT_NEUTRAL_KEYS`)
never make a column.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from dcc.config import result_neutral
from dcc.sweeps.paper import ROW_ORDER, paper_miou, switches_label

BEST, LAST = "val/best_miou", "val/final_miou"
SPLIT_ORDER = ("1_16", "1_8", "1_4", "1_2", "full")

# Keys that never make a column: the seed (averaged over), the keys a loss preset fixes (the rows),
# the split (its own column key) and keys that do not change what a run computes.
SEED_KEYS = ("trainer/seed",)
ROW_KEYS = ("loss/preset", "loss/method", "loss/proj", "loss/context", "loss/cl", "loss/dir", "loss/ns", "loss/pf",
            "loss/weak", "dataset/image_labels")
SPLIT_KEYS = ("split/name", "split/fraction")


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
