"""Labeled / unlabeled splits: generated from (seed, index), or read from list files; and their manifest.

List files hold one item per line in either format (blank lines and ``#`` comments are skipped):

- the authors' pairs ``/JPEGImages/2009_000898.jpg /SegmentationClassAug/2009_000898.png`` (paths
  relative to the dataset root; the label path is informative only: labels come from the protocol);
- bare ids as other codebases use them: ``2009_000898`` (VOC) or
  ``aachen_000000_000019`` (Cityscapes), with or without a file extension.

The manifest is what a run logs so that splits can be compared across codebases: the labeled and the
unlabeled list in the authors' format, their SHA-256, and how many labeled images are VOC "fine" images.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np

from dcc.data.files import DataError

log = logging.getLogger(__name__)

__all__ = [
    "choose_split", "generate_labeled", "labeled_count", "manifest_params", "read_list", "resolve_list",
    "split_manifest", "write_split_manifest",
]


def read_list(path: str | Path) -> list[tuple[str, str | None]]:
    """``(first token, second token or None)`` per non-empty line of a list file."""
    path = Path(path).expanduser()
    try:
        text = path.read_text()
    except OSError as exc:
        raise DataError(f"cannot read list file {path}: {exc}") from exc
    items = []
    for number, line in enumerate(text.splitlines(), 1):
        tokens = line.split("#", 1)[0].split()
        if not tokens:
            continue
        if len(tokens) > 2:
            raise DataError(f"{path}:{number}: expected 'image [label]' or an id, got {line.strip()!r}")
        items.append((tokens[0], tokens[1] if len(tokens) == 2 else None))
    return items


def _keys(source: Any, i: int) -> list[str]:
    """Names under which item ``i`` may appear in a list: its relative image path and its id."""
    keys = []
    entries = getattr(source, "entries", None)
    if entries is not None:
        keys.append(entries[i][0].lstrip("/"))
    ids = getattr(source, "ids", None)
    keys.append(ids[i] if ids is not None else str(i))
    return keys


def _normalise(token: str) -> list[str]:
    """Candidate keys of a list token: the path without a leading slash, its stem and the stem without ``_leftImg8bit``."""
    token = token.strip().lstrip("/")
    stem = Path(token).name.rsplit(".", 1)[0] if "." in Path(token).name else Path(token).name
    out = [token, stem]
    if stem.endswith("_leftImg8bit"):
        out.append(stem[: -len("_leftImg8bit")])
    return out


def resolve_list(path: str | Path, source: Any) -> np.ndarray:
    """Indices into ``source`` of the items a list file names, in file order; unknown or repeated items fail."""
    lookup: dict[str, int] = {}
    for i in range(len(source)):
        for key in _keys(source, i):
            lookup.setdefault(key, i)
    indices, seen = [], {}
    for number, (image, _) in enumerate(read_list(path), 1):
        index = next((lookup[k] for k in _normalise(image) if k in lookup), None)
        if index is None:
            raise DataError(
                f"{path}:{number}: {image!r} is not an image of the training set "
                f"(expected a path relative to the dataset root or an id, e.g. {_keys(source, 0)})"
            )
        if index in seen:
            raise DataError(f"{path}:{number}: {image!r} repeats line {seen[index]}")
        seen[index] = number
        indices.append(index)
    if not indices:
        raise DataError(f"{path}: the list is empty")
    return np.asarray(indices, dtype=np.int64)


def labeled_count(cfg: Any, pool_size: int) -> int:
    """How many images of a pool of ``pool_size`` keep their labels.

    The published count ``dataset.split_sizes[split.name]`` when the pool is the one those counts refer
    to (``dataset.split_pool_size`` images, e.g. VOC's 10,582), else ``round(split.fraction x pool)`` (>= 1),
    e.g. for VOC classic (a fraction of the 1,464 fine images) or an incomplete tree (with a warning).
    """
    sizes = cfg.dataset.get("split_sizes") or {}
    name = str(cfg.split.name)
    fraction_count = min(pool_size, max(1, int(round(pool_size * float(cfg.split.fraction)))))
    if name not in sizes:
        return fraction_count
    expected = cfg.dataset.get("split_pool_size")
    if expected is None or pool_size == int(expected):
        return int(sizes[name])
    if str(cfg.dataset.get("protocol", "aug")) == "aug":  # VOC classic draws from the fine set by design
        log.warning(
            "split %s: the published count %d refers to a pool of %s images but this one has %d; "
            "using split.fraction=%s -> %d labeled", name, int(sizes[name]), expected, pool_size,
            cfg.split.fraction, fraction_count,
        )
    return fraction_count


def generate_labeled(pool: np.ndarray, count: int, seed: int, index: int = 0) -> np.ndarray:
    """``count`` items of ``pool`` drawn without replacement, sorted; list ``index`` of ``seed`` (0, 1, 2, ...).

    Index 0 uses ``default_rng(seed)`` alone, so the first list of a seed is the split of earlier releases.
    """
    rng = np.random.default_rng(seed if index == 0 else [seed, index])
    return np.sort(np.asarray(pool)[rng.permutation(len(pool))[:count]])


def _complement(num_items: int, labeled: np.ndarray) -> np.ndarray:
    """Every item that is not labeled; with every item labeled (``full``), all items are also used unlabeled."""
    rest = np.setdiff1d(np.arange(num_items), labeled)
    return rest if len(rest) else np.arange(num_items)


def choose_split(cfg: Any, train: Any) -> tuple[np.ndarray, np.ndarray]:
    """(labeled, unlabeled) indices into ``train``, from ``split.labeled_list`` or generated.

    Labeled items are drawn from the items that have a label (``train.has_label()``: VOC classic keeps
    only the 1,464 fine ones); the unlabeled items are ``split.unlabeled_list`` or every other item.
    """
    sp = cfg.split
    n = len(train)
    pool_mask = train.has_label() if hasattr(train, "has_label") else np.ones(n, dtype=bool)
    if sp.get("labeled_list"):
        labeled = resolve_list(sp.labeled_list, train)
        no_label = labeled[~pool_mask[labeled]]
        if len(no_label):
            raise DataError(
                f"{sp.labeled_list}: {len(no_label)} listed images have no label under this protocol, e.g. "
                f"{_keys(train, int(no_label[0]))[-1]} (voc: dataset.protocol=classic labels only the 1,464 fine "
                "images; folder: the image has no mask in masks/train)"
            )
        labeled = np.sort(labeled)
        log.info("split: the labeled subset is fixed by split.labeled_list=%s (%d images): replicates "
                 "(trainer.seed) vary the training seed only, not the labeled subset", sp.labeled_list, len(labeled))
    else:
        pool = np.flatnonzero(pool_mask)
        labeled = generate_labeled(pool, labeled_count(cfg, len(pool)), int(sp.seed), int(sp.get("index", 0)))
        if len(labeled) == len(pool):
            log.info("split: all %d labeled images keep their labels: replicates (trainer.seed) vary the training "
                     "seed only", len(labeled))
        else:
            log.info("split: %d of %d images keep their labels, drawn with split.seed=%s index %s",
                     len(labeled), len(pool), sp.seed, sp.get("index", 0))
    if sp.get("unlabeled_list"):
        unlabeled = np.sort(resolve_list(sp.unlabeled_list, train))
    else:
        unlabeled = _complement(n, labeled)
    return labeled, unlabeled


def _line(source: Any, i: int) -> str:
    return source.entry_line(i) if hasattr(source, "entry_line") else _keys(source, i)[-1]


def split_manifest(cfg: Any, data: Any) -> dict[str, Any]:
    """What identifies a run's split: the two lists (authors' format), hashes and counts.

    Returns ``labeled_text``, ``unlabeled_text``, ``sha256`` (of both lists), ``labeled_sha256``,
    ``num_labeled``, ``num_unlabeled``, ``num_fine`` (labeled images from VOC's 1,464 fine train set;
    None for datasets without one) and ``origin`` (the list file, or ``seed=S index=I``).
    """
    train = data.train
    labeled_text = "".join(_line(train, int(i)) + "\n" for i in data.labeled)
    unlabeled_text = "".join(_line(train, int(i)) + "\n" for i in data.unlabeled)
    both = f"# labeled\n{labeled_text}# unlabeled\n{unlabeled_text}"
    fine = getattr(train, "fine", None)
    sp = cfg.split
    origin = (
        f"list {sp.labeled_list}" + (f" + {sp.unlabeled_list}" if sp.get("unlabeled_list") else "")
        if sp.get("labeled_list") else f"seed={sp.seed} index={sp.get('index', 0)}"
    )
    return {
        "labeled_text": labeled_text,
        "unlabeled_text": unlabeled_text,
        "sha256": hashlib.sha256(both.encode()).hexdigest(),
        "labeled_sha256": hashlib.sha256(labeled_text.encode()).hexdigest(),
        "num_labeled": int(len(data.labeled)),
        "num_unlabeled": int(len(data.unlabeled)),
        "num_fine": None if fine is None else int(fine[np.asarray(data.labeled, dtype=np.int64)].sum()),
        "origin": origin,
    }


def write_split_manifest(manifest: dict[str, Any], directory: str | Path) -> list[Path]:
    """Writes ``split_labeled.txt`` and ``split_unlabeled.txt`` (reusable as split.labeled_list / unlabeled_list)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / "split_labeled.txt", directory / "split_unlabeled.txt"]
    paths[0].write_text(manifest["labeled_text"])
    paths[1].write_text(manifest["unlabeled_text"])
    return paths


def manifest_params(manifest: dict[str, Any]) -> dict[str, str]:
    """MLflow params of the manifest (``split_manifest/...``; num_fine is ``n/a`` without a fine set)."""
    return {
        "split_manifest/sha256": manifest["sha256"],
        "split_manifest/labeled_sha256": manifest["labeled_sha256"],
        "split_manifest/num_labeled": str(manifest["num_labeled"]),
        "split_manifest/num_unlabeled": str(manifest["num_unlabeled"]),
        "split_manifest/num_fine": "n/a" if manifest["num_fine"] is None else str(manifest["num_fine"]),
        "split_manifest/origin": manifest["origin"],
    }
