"""Walk a dataset once and report what a training run would trip over, all problems at once.

    python -m dcc.data.check dataset=voc dataset.root=/data/voc [dataset.protocol=classic] [split=1_8 ...]
    python -m dcc.data.check --workers 8 dataset=cityscapes dataset.root=/data/cityscapes

Reports image and label counts of the training and validation sets (against the published counts),
the labeled/unlabeled split the config would use, a per-class pixel histogram, and every unreadable
image or label, label/image size mismatch and out-of-range label value, naming each file. Exits 0
when nothing is wrong, 1 otherwise (a missing or incomplete root included).
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dcc.data.files import DataError

CONF = Path(__file__).resolve().parents[2] / "conf"

# Published (training, validation) sizes; the training set of VOC is the augmented one in both protocols.
EXPECTED = {"voc": (10582, 1449), "cityscapes": (2975, 500)}
EXPECTED_VOC_FINE = 1464


@dataclass
class SetReport:
    """One walked set (train or val): counts, per-class pixel counts (index 255 = ignore) and problems."""

    name: str
    images: int = 0
    labels: int = 0
    histogram: np.ndarray = field(default_factory=lambda: np.zeros(256, dtype=np.int64))
    problems: list[str] = field(default_factory=list)


def _check_item(source: Any, i: int) -> tuple[bool, np.ndarray | None, list[str]]:
    """(has a label, label or None, problems) of item ``i``; reads image and label separately so both are checked."""
    if not hasattr(source, "read_image"):  # a generic Source (e.g. the digits arrays)
        try:
            image, mask = source.load(i)
        except DataError as exc:
            return True, None, [str(exc)]
        return mask is not None, mask, []
    problems: list[str] = []
    image = mask = None
    try:
        image = source.read_image(i)
    except DataError as exc:
        problems.append(str(exc))
    has_label = source.label_path(i) is not None
    try:
        mask = source.read_label(i)
    except DataError as exc:
        problems.append(str(exc))
    if image is not None and mask is not None and mask.shape != image.shape[:2]:
        problems.append(
            f"{source.label_path(i)}: label is {mask.shape[1]}x{mask.shape[0]} but its image "
            f"{source.image_path(i)} is {image.shape[1]}x{image.shape[0]}"
        )
    return has_label, mask, problems


def check_source(name: str, source: Any, *, workers: int = 1, progress: bool = False) -> SetReport:
    """Read every image and label of ``source`` once."""
    report = SetReport(name=name, images=len(source))
    every = max(len(source) // 20, 1)
    with ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:  # PIL decodes without the GIL
        for k, (has_label, mask, problems) in enumerate(pool.map(lambda i: _check_item(source, i), range(len(source)))):
            report.labels += int(has_label)
            report.problems.extend(problems)
            if mask is not None:
                report.histogram += np.bincount(mask.ravel(), minlength=256)
            if progress and (k + 1) % every == 0:
                print(f"  {name}: {k + 1}/{len(source)}", file=sys.stderr, flush=True)
    return report


def check_dataset(cfg: Any, *, workers: int = 1, progress: bool = False) -> tuple[list[SetReport], list[str], list[str]]:
    """(set reports, problems outside single files, informational notes) for the composed config ``cfg``."""
    from dcc.data.build import load_sources
    from dcc.data.splits import choose_split

    try:
        train, val = load_sources(cfg.dataset)
    except DataError as exc:
        return [], [str(exc)], []
    reports = [check_source("train", train, workers=workers, progress=progress),
               check_source("val", val, workers=workers, progress=progress)]
    notes, problems = [], []
    for source in (train, val):
        problems += getattr(source, "layout_problems", [])
    unlabeled_only = int((~train.has_label()).sum()) if hasattr(train, "has_label") else 0
    if unlabeled_only:
        notes.append(f"train: {unlabeled_only} images without a label, used as unlabeled images only")
    name = str(cfg.dataset.name)
    if name in EXPECTED:
        for report, expected in zip(reports, EXPECTED[name]):
            if report.images != expected:
                notes.append(f"{report.name}: {report.images} images, the published set has {expected}")
    fine = getattr(train, "fine", None)
    if fine is not None:
        notes.append(f"train: {int(fine.sum())} images of the fine set (published: {EXPECTED_VOC_FINE})")
    try:
        labeled, unlabeled = choose_split(cfg, train)
        fine_note = "" if fine is None else f", {int(fine[labeled].sum())} of them from the fine set"
        notes.append(f"split {cfg.split.name}: {len(labeled)} labeled{fine_note}, {len(unlabeled)} unlabeled")
    except DataError as exc:
        problems.append(str(exc))
    return reports, problems, notes


def format_report(reports: Sequence[SetReport], problems: Sequence[str], notes: Sequence[str],
                  class_names: Sequence[str], ignore_index: int = 255) -> str:
    lines = []
    for r in reports:
        lines.append(f"{r.name}: {r.images} images, {r.labels} labels, {len(r.problems)} problems")
    lines += notes
    if reports:
        total = {r.name: max(int(r.histogram.sum()), 1) for r in reports}
        lines.append("pixels per class (share of labeled pixels): " + " | ".join(r.name for r in reports))
        names = list(class_names) + [f"{ignore_index} (ignore)"]
        for k, cname in zip(list(range(len(class_names))) + [ignore_index], names):
            cells = [f"{int(r.histogram[k]):>12d} {100.0 * r.histogram[k] / total[r.name]:6.2f}%" for r in reports]
            lines.append(f"  {k:>3d} {cname:<14s} " + " | ".join(cells))
    all_problems = list(problems) + [p for r in reports for p in r.problems]
    if all_problems:
        lines.append(f"{len(all_problems)} problems:")
        lines += [f"  {p}" for p in all_problems]
    else:
        lines.append("no problems found")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dcc.data.check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4, help="reader threads (default 4)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args, overrides = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))

    from hydra import compose, initialize_config_dir

    from dcc.config import quote_split_overrides, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=quote_split_overrides(list(overrides)))
    reports, problems, notes = check_dataset(cfg, workers=args.workers, progress=not args.quiet)
    try:  # dataset=folder reads them from classes.txt, which a wrong root lacks (reported above)
        names = list(cfg.dataset.class_names) or [str(k) for k in range(cfg.dataset.num_classes)]
    except Exception:  # noqa: BLE001
        names = []
    print(f"dataset {cfg.dataset.name} at {cfg.dataset.root}")
    print(format_report(reports, problems, notes, names, cfg.dataset.ignore_index), flush=True)
    return 1 if problems or any(r.problems for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
