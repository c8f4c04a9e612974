"""Finished MLflow runs -> records (one per run) -> cells (statistics over replicates) -> a :class:`Report`.

Rows are loss presets, the *arms* (Table 3's order first), columns the config keys that vary between the
runs (found automatically, or named); keys that do not change a result (:data:`dcc.config.RESULT_NEUTRAL_KEYS`)
never make a column. A *replicate* is the pair (``trainer/seed``, ``split/seed``) of a run's params: the
training seed and the labeled subset; replicates are averaged over, never a column.

Each cell has n, mean, sample std and a 95% Student-t interval over its replicates; each arm is compared
with a baseline arm (``suponly`` by default) in the same column through the paired differences of the
replicates both ran (:class:`Comparison`). The numbers are one split's: ``test/miou`` when every run logged
it, else ``val/final_miou`` (:func:`choose_split`).
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from dcc.config import result_neutral
from dcc.engine.metrics import percent
from dcc.engine.naming import ST_ONLY_KEYS
from dcc.engine.tracking import PERCENT, UNIT_TAG
from dcc.sweeps.paper import ROW_ORDER, paper_miou, switches_label

BEST, LAST, TEST = "val/best_miou", "val/final_miou", "test/miou"
SPLIT_METRIC = {"val": LAST, "test": TEST}  # the number a report is about, per evaluation split
SPLIT_NAME = {"val": "validation split", "test": "test split"}
CONFIDENCE = 0.95
DEFAULT_BASELINE = "suponly"
SPLIT_ORDER = ("1_16", "1_8", "1_4", "1_2", "full")

# Keys that never make a column: the replicate (trainer seed and labeled subset, averaged over), what the
# labeled subset determines (its manifest), the keys a loss preset fixes (the rows), the split (its own
# column key) and keys that do not change what a run computes.
REPLICATE_KEYS = ("trainer/seed", "split/seed")
SEED_KEYS = REPLICATE_KEYS
DERIVED_PREFIXES = ("split_manifest/",)
ROW_KEYS = ("loss/preset", "loss/method", "loss/proj", "loss/context", "loss/cl", "loss/dir", "loss/ns", "loss/pf",
            "loss/weak", "dataset/image_labels")
# self-training's own keys (dcc.engine.naming.ST_ONLY_KEYS): never columns, since the other arms do not read them (a
# sweep loss=suponly,st loss.st_threshold=0.7 pairs ST with the SupOnly runs it met); where they vary between the ST
# runs of a sweep they name ST's rows (st[st_threshold=0.7]); the teacher file is per replicate, not a setting
ST_ROW_KEYS = tuple(f"loss/{k}" for k in ST_ONLY_KEYS if k != "teacher_checkpoint")
ST_KEYS = tuple(f"loss/{k}" for k in ST_ONLY_KEYS)
SPLIT_KEYS = ("split/name", "split/fraction")
STEPS_KEY = "trainer/max_steps"
LABELED_SHA_KEY = "split_manifest/labeled_sha256"


class ReportError(RuntimeError):
    """Bad input to a report (one line, naming the problem)."""


def t_interval(xs: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """The Student-t confidence interval of the mean of ``xs`` (None for fewer than two values)."""
    if len(xs) < 2:
        return None
    from scipy import stats

    mean = statistics.fmean(xs)
    sem = float(stats.sem(xs))
    if sem == 0.0:  # identical values: scipy needs a positive scale
        return mean, mean
    lo, hi = stats.t.interval(confidence, len(xs) - 1, loc=mean, scale=sem)
    return float(lo), float(hi)


def _std(xs: Sequence[float]) -> float | None:
    return statistics.stdev(xs) if len(xs) > 1 else None


@dataclass
class Record:
    run_id: str
    row: str  # loss preset (the arm)
    col: tuple[tuple[str, str], ...]  # ((key, value), ...) of the column keys
    seed: str  # trainer/seed
    best: float | None  # val/best_miou (every mIoU of a record in %)
    last: float | None  # val/final_miou
    dataset: str
    segnet: str
    backbone: str
    split: str
    start_time: int
    protocol: str = "aug"  # dataset.protocol (VOC)
    switches: str | None = None  # Table 3's switches that are on (Proj+Context+...), for chart labels
    split_seed: str | None = None  # split/seed: the labeled subset
    test: float | None = None  # test/miou
    steps: str | None = None  # trainer/max_steps
    labeled_sha: str | None = None  # split_manifest/labeled_sha256
    value: float = math.nan  # the report's number: test or val final, by the report's split

    @property
    def replicate(self) -> tuple[str, str]:
        return self.seed, self.split_seed or ""


def replicate_label(rep: tuple[str, str], split_seeds: Sequence[str] = ()) -> str:
    """``1`` (training seed 1, its labeled subset drawn with the same seed, or the one ``split.seed`` of every run
    in ``split_seeds``), ``1/7`` (training seed 1, split seed 7)."""
    seed, split_seed = rep
    fixed = len(split_seeds) == 1 and split_seed == split_seeds[0]
    return seed if not split_seed or split_seed == seed or fixed else f"{seed}/{split_seed}"


@dataclass
class Cell:
    row: str
    col: tuple[tuple[str, str], ...]
    values: list[float]  # the report's number per replicate, percent
    replicates: list[tuple[str, str]]
    best: list[float] = field(default_factory=list)  # val/best_miou (percent), where logged
    last: list[float] = field(default_factory=list)  # val/final_miou (percent), where logged
    paper: float | None = None
    steps: str = ""  # trainer/max_steps of its runs

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def seeds(self) -> list[str]:
        return [replicate_label(r) for r in self.replicates]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float | None:
        return _std(self.values)

    @property
    def ci(self) -> tuple[float, float] | None:
        return t_interval(self.values)

    @property
    def delta(self) -> float | None:
        return None if self.paper is None else self.mean - self.paper

    @property
    def value_by_replicate(self) -> dict[tuple[str, str], float]:
        return dict(zip(self.replicates, self.values))


@dataclass
class Comparison:
    """An arm against the baseline arm in one column: the paired differences (arm - baseline, points)."""

    row: str
    col: tuple[tuple[str, str], ...]
    baseline: str
    replicates: list[tuple[str, str]]  # the paired replicates, in order
    diffs: list[float]
    unpaired: int  # replicates of the arm or of the baseline without a partner

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.diffs) if self.diffs else None

    @property
    def std(self) -> float | None:
        return _std(self.diffs)

    @property
    def ci(self) -> tuple[float, float] | None:
        return t_interval(self.diffs)

    @property
    def same_sign(self) -> int:
        """How many replicates' differences have the sign of the mean difference."""
        m = self.mean
        if m is None:
            return 0
        sign = (m > 0) - (m < 0)
        return sum(1 for d in self.diffs if (d > 0) - (d < 0) == sign)

    @property
    def verdict(self) -> str:
        if not self.diffs:
            return "no paired replicate"
        ci = self.ci
        if ci is None:
            return "not separable (n=1)"
        if ci[0] > 0:
            return "better"
        if ci[1] < 0:
            return "worse"
        return "not separable"


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
    split: str = "val"  # the evaluation split of every number: val or test
    steps: list[str] = field(default_factory=list)  # trainer/max_steps of the runs (distinct values)
    baseline: str | None = None
    comparisons: list[Comparison] = field(default_factory=list)
    subset: str = "unknown"  # the labeled subset across replicates: fixed, varies, mixed, unknown
    split_seeds: list[str] = field(default_factory=list)  # the split/seed values of the runs
    row_key: str = "loss"  # what the rows (arms) are: the loss preset, or the parameter of --rows

    def rep_label(self, rep: tuple[str, str]) -> str:
        return replicate_label(rep, self.split_seeds)

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

    def comparison(self, row: str, col: tuple[tuple[str, str], ...]) -> Comparison | None:
        for c in self.comparisons:
            if c.row == row and c.col == col:
                return c
        return None

    # ---- what every title states: split, budget, replicates -------------------------------------
    @property
    def metric(self) -> str:
        return SPLIT_METRIC[self.split]

    @property
    def split_label(self) -> str:
        return SPLIT_NAME[self.split]

    @property
    def budget_label(self) -> str:
        nums = sorted({int(float(s)) for s in self.steps if _is_number(s)})
        if not nums:
            return "steps unknown"
        if len(nums) == 1:
            return f"{nums[0]:,} steps"
        return f"{nums[0]:,}-{nums[-1]:,} steps"

    @property
    def n_label(self) -> str:
        ns = sorted({c.n for c in self.cells})
        if not ns:
            return "n=0"
        if len(ns) == 1:
            return f"n={ns[0]} replicate{'s' if ns[0] != 1 else ''}"
        return f"n={ns[0]}-{ns[-1]} replicates per cell"

    def heading(self, what: str = "", n_label: str | None = None) -> str:
        """``<title>[ — what]: labels 1/8, test split, 1,500 steps, n=3 replicates``."""
        parts = []
        if len(self.cols) == 1 and self.by == ["split"]:
            parts.append("labels " + self.cols[0][0][1].replace("_", "/"))
        parts += [self.split_label, self.budget_label, n_label or self.n_label]
        return f"{self.title}{' — ' + what if what else ''}: {', '.join(parts)}"

    @property
    def paired_n_label(self) -> str:
        ns = sorted({c.n for c in self.comparisons})
        if not ns:
            return "n=0 paired"
        if len(ns) == 1:
            return f"n={ns[0]} paired replicate{'s' if ns[0] != 1 else ''}"
        return f"n={ns[0]}-{ns[-1]} paired replicates"

    @property
    def single_replicate(self) -> bool:
        return any(c.n == 1 for c in self.cells)


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _row_key(preset: str) -> tuple[Any, ...]:
    base = preset.partition("[")[0]  # st[st_threshold=0.7]: among the ST rows, in the order of the values
    if base in ROW_ORDER:
        return (ROW_ORDER.index(base), tuple(_value_key("", v) for v in re.findall(r"=([^,\]]*)", preset)), preset)
    key, eq, value = preset.partition("=")  # an arm of --rows KEY: "KEY=value", in the order of the values
    return (len(ROW_ORDER), _value_key(key, value) if eq else (), preset)


def _value_key(key: str, value: str) -> tuple[Any, ...]:
    if key in ("split", "split/name") and value in SPLIT_ORDER:
        return (0, SPLIT_ORDER.index(value), "")
    try:
        return (1, float(value), "")
    except ValueError:
        return (2, 0.0, value)


def _col_key(col: tuple[tuple[str, str], ...]) -> tuple[Any, ...]:
    return tuple(_value_key(k, v) for k, v in col)


def _rep_key(rep: tuple[str, str]) -> tuple[Any, ...]:
    return tuple(_value_key("", v) for v in rep)


def _ignored(key: str) -> bool:
    if key in REPLICATE_KEYS or key in ROW_KEYS or key in ST_KEYS or key in SPLIT_KEYS or key.startswith(DERIVED_PREFIXES):
        return True
    return result_neutral(key)


def varying_keys(params: Sequence[dict[str, str]]) -> list[str]:
    """Config keys whose value differs between runs (split first), the replicate and row keys left out."""
    keys = sorted({k for p in params for k in p})
    out = []
    if len({p.get("split/name") for p in params}) > 1:
        out.append("split")
    for k in keys:
        if not _ignored(k) and len({p.get(k) for p in params}) > 1:
            out.append(k)
    return out


def _metric(run: Any, name: str) -> float | None:
    """A run's metric in % (a run without the unit tag logged fractions of 1: read as such)."""
    v = run.data.metrics.get(name)
    if v is None or not math.isfinite(v):
        return None
    return float(v) if run.data.tags.get(UNIT_TAG) == PERCENT else percent(float(v))


def choose_split(runs: Sequence[Any], split: str | None = None) -> tuple[str, list[str]]:
    """The evaluation split of a report and its notes: ``test`` when every run (with a loss tag) logged
    ``test/miou``, else ``val``; ``split`` names one (``test`` with runs that lack it is an error)."""
    runs = [r for r in runs if "loss" in r.data.tags]
    with_test = sum(1 for r in runs if _metric(r, TEST) is not None)
    if split not in (None, "auto", "val", "test"):
        raise ReportError(f"--split {split}: use val or test")
    if split == "test" and with_test < len(runs):
        lacking = next(r for r in runs if _metric(r, TEST) is None)
        raise ReportError(f"--split test: {len(runs) - with_test} of {len(runs)} runs have no {TEST} "
                          f"(e.g. run {lacking.info.run_id}); use --split val")
    if split in (None, "auto"):
        split = "test" if runs and with_test == len(runs) else "val"
        if split == "val" and with_test:
            return split, [f"validation split: only {with_test} of {len(runs)} runs have {TEST}"]
    return split, []


def records_from_runs(runs: Iterable[Any], by: Sequence[str] | None = None, split: str | None = None,
                      rows: str | None = None) -> tuple[list[Record], list[str], list[str]]:
    """Turn MLflow runs into records keyed by (row, column, replicate); returns (records, column keys, notes).
    Each record's ``value`` is the number of the evaluation split (:func:`choose_split`: ``split`` or auto).
    The rows (arms) are the loss presets, or with ``rows`` the values of that parameter (``loss/st_threshold``):
    ``"loss/st_threshold=0.7"``.

    A run without that number is skipped; of several runs with the same row, column and replicate only the
    latest is kept (a sweep that was run twice into one experiment, a failed run and its rerun).
    """
    runs = list(runs)
    split, notes = choose_split(runs, split)
    metric = SPLIT_METRIC[split]
    usable = []
    skipped = 0
    for r in runs:
        value = _metric(r, metric)
        if value is None or "loss" not in r.data.tags:
            skipped += 1
            continue
        usable.append((r, value))
    if skipped:
        notes.append(f"{skipped} run(s) without {metric} (or without a loss tag) left out")
    params = [dict(r.data.params) for r, _ in usable]
    if rows is not None and not any(rows in p for p in params):
        found = sorted({k for p in params for k in p if not _ignored(k) or k.startswith("loss/")})
        raise ReportError(f"--rows {rows}: no run has this parameter (e.g. {', '.join(found[:8])})")
    keys = [k for k in (list(by) if by else varying_keys(params)) if k != rows]
    if not keys:
        keys = ["split"]
    st_params = [p for (r, _), p in zip(usable, params) if r.data.tags["loss"] == "st"]
    st_varying = [k for k in ST_ROW_KEYS if k != rows and len({p.get(k) for p in st_params}) > 1]
    latest: dict[tuple[Any, ...], Record] = {}
    for (r, value), p in zip(usable, params):
        tags = r.data.tags
        name = tags.get("split", p.get("split/name", "?"))
        col = tuple((k, name if k == "split" else p.get(k, tags.get(k, "?"))) for k in keys)
        rec = Record(
            run_id=r.info.run_id, row=_row(tags["loss"], p, rows, st_varying), col=col,
            seed=p.get("trainer/seed", tags.get("seed", "?")),
            best=_metric(r, BEST), last=_metric(r, LAST), dataset=tags.get("dataset", "?"),
            segnet=tags.get("segnet", "?"), backbone=tags.get("backbone", "?"), split=name,
            start_time=int(r.info.start_time or 0), protocol=p.get("dataset/protocol", "aug"),
            switches=switches_label(tags["loss"], p), split_seed=p.get("split/seed"), test=_metric(r, TEST),
            steps=p.get(STEPS_KEY), labeled_sha=p.get(LABELED_SHA_KEY), value=value,
        )
        key = (rec.row, rec.col, rec.replicate)
        if key not in latest or latest[key].start_time < rec.start_time:
            latest[key] = rec
    dupes = len(usable) - len(latest)
    if dupes:
        notes.append(f"{dupes} older run(s) with the same preset, column and replicate as a newer one left out")
    records = sorted(latest.values(), key=lambda x: (_row_key(x.row), _col_key(x.col), _rep_key(x.replicate)))
    return records, keys, notes


def _row(preset: str, params: dict[str, str], rows: str | None, st_varying: Sequence[str]) -> str:
    """A run's arm: its loss preset (ST's with the settings that vary between the sweep's ST runs), or the value
    of the parameter ``rows``."""
    if rows is not None:
        return f"{rows}={params.get(rows, '?')}"
    if preset == "st" and st_varying:
        return "st[" + ",".join(f"{k.rsplit('/', 1)[-1]}={params.get(k, '?')}" for k in st_varying) + "]"
    return preset


def _subset(cells: Sequence[Cell], records: Sequence[Record]) -> str:
    """Whether the labeled subset changes between the replicates of a cell: ``fixed``, ``varies``, ``mixed``
    (some cells only) or ``unknown`` (no cell with two replicates). The labeled list's hash decides where
    the runs logged it, else ``split/seed`` (a run without it: the subset of older runs, fixed)."""
    by_cell: dict[tuple[Any, ...], list[Record]] = {}
    for r in records:
        by_cell.setdefault((r.row, r.col), []).append(r)
    fixed = varied = 0
    for recs in by_cell.values():
        if len(recs) < 2:
            continue
        if all(r.labeled_sha for r in recs):
            distinct = {r.labeled_sha for r in recs}
        else:
            distinct = {r.split_seed or "" for r in recs}
        if len(distinct) > 1:
            varied += 1
        else:
            fixed += 1
    if not fixed and not varied:
        return "unknown"
    return "mixed" if fixed and varied else ("fixed" if fixed else "varies")


def compare(cells: Sequence[Cell], baseline: str) -> tuple[list[Comparison], list[str]]:
    """Every other arm against ``baseline`` in the same column, paired on the replicates both ran."""
    out, notes = [], []
    base = {c.col: c for c in cells if c.row == baseline}
    for c in cells:
        if c.row == baseline:
            continue
        b = base.get(c.col)
        if b is None:
            notes.append(f"{c.row} at {', '.join(f'{k}={v}' for k, v in c.col)}: no {baseline} run in that column "
                         "to pair with")
            continue
        mine, theirs = c.value_by_replicate, b.value_by_replicate
        paired = sorted(set(mine) & set(theirs), key=_rep_key)
        out.append(Comparison(row=c.row, col=c.col, baseline=baseline, replicates=paired,
                              diffs=[mine[r] - theirs[r] for r in paired],
                              unpaired=len(set(mine) ^ set(theirs))))
    return out, notes


def _arm_of_value(key: str, value: str, arms: Sequence[str]) -> str:
    """The arm of ``--rows key`` that ``--baseline value`` names: ``value`` or ``key=value``, numbers by value."""
    value = value.partition("=")[2] if value.startswith(f"{key}=") else value
    for arm in arms:
        mine = arm.partition("=")[2]
        if mine == value or (_is_number(mine) and _is_number(value) and float(mine) == float(value)):
            return arm
    return f"{key}={value}"


def build_report(runs: Iterable[Any], *, title: str, by: Sequence[str] | None = None, paper: str = "match",
                 split: str | None = None, baseline: str | None = None, rows_key: str | None = None) -> Report:
    """Aggregate runs over replicates and pair every arm with the baseline arm.

    ``paper``: ``match`` (paper numbers where the setting matches), ``always`` (compare with Table 3 /
    Table 1 at VOC, DeepLabv3+ ResNet-50) or ``never``. ``split``: ``val``, ``test`` or None (test when
    every run has it). ``baseline``: the arm the others are compared with; None: ``suponly`` when the sweep
    has it (else no comparison). A named baseline that the sweep lacks raises :class:`ReportError`.
    ``rows_key``: a parameter whose values are the arms instead of the loss presets (paired on the replicates as
    presets are); ``baseline`` is then one of its values (``0`` matches ``0.0``).
    """
    runs = list(runs)
    split, split_notes = choose_split(runs, split)
    records, keys, notes = records_from_runs(runs, by, split, rows_key)
    notes = split_notes + notes
    groups: dict[tuple[Any, ...], list[Record]] = {}
    for rec in records:
        groups.setdefault((rec.row, rec.col), []).append(rec)
    rows = sorted({r.row for r in records}, key=_row_key)
    cols = sorted({r.col for r in records}, key=_col_key)
    ablation = any(r not in ("suponly", "ablation_viii", "weakly") for r in rows)
    cells = []
    for (row, col), recs in groups.items():
        cell = Cell(row=row, col=col, values=[r.value for r in recs], replicates=[r.replicate for r in recs],
                    best=[r.best for r in recs if r.best is not None],
                    last=[r.last for r in recs if r.last is not None],
                    steps=" ".join(sorted({r.steps for r in recs if r.steps})))
        settings = {(r.dataset, r.segnet, r.backbone, r.split, r.protocol) for r in recs}
        if paper != "never" and len(settings) == 1:
            (dataset, segnet, backbone, name, protocol), = settings
            cell.paper = paper_miou(dataset, segnet, backbone, row, name, ablation=ablation,
                                    force=paper == "always", protocol=protocol)
        cells.append(cell)
    cells.sort(key=lambda c: (_row_key(c.row), _col_key(c.col)))
    label = "paper" if paper != "always" else "paper (VOC, DeepLabv3+ R50)"
    if paper == "match" and not any(c.paper is not None for c in cells):
        found = sorted({f"{r.dataset}/{r.segnet}/{r.backbone}" for r in records})
        if found:
            notes.append("no paper numbers: dataset/segnet/backbone " + ", ".join(found)
                         + " match no table of the paper (--paper always compares with Table 3 anyway)")
    if baseline is not None and rows_key is not None:
        baseline = _arm_of_value(rows_key, baseline, rows)
    if baseline is not None and rows and baseline not in rows:
        raise ReportError(f"baseline arm {baseline!r} is not in this sweep (arms: {', '.join(rows)})")
    chosen = baseline if baseline is not None else (DEFAULT_BASELINE if DEFAULT_BASELINE in rows else None)
    comparisons: list[Comparison] = []
    if chosen is not None and len(rows) > 1:
        comparisons, more = compare(cells, chosen)
        notes += more
    elif chosen is None and len(rows) > 1:
        notes.append(f"no paired differences: no {DEFAULT_BASELINE} arm in this sweep (--baseline names one of: "
                     f"{', '.join(rows)})")
    switches = {r.row: r.switches for r in records if r.switches}
    split_seeds = sorted({r.split_seed for r in records if r.split_seed}, key=lambda v: _value_key("", v))
    return Report(title=title, by=keys, cells=cells, rows=rows, cols=cols, notes=notes, paper_label=label,
                  switches=switches, split=split, steps=sorted({r.steps for r in records if r.steps}),
                  baseline=chosen if comparisons else None, comparisons=comparisons, subset=_subset(cells, records),
                  split_seeds=split_seeds, row_key=rows_key or "loss")

