"""``dataset=folder``: your own images and index masks in one simple layout (see LAYOUT).

Training images with a mask of the same name form the labeled pool (the ``split`` group draws its
fraction from it, or ``split.labeled_list`` names them); training images without a mask are always
unlabeled. Every validation image needs a mask. Masks are index PNGs (palette or grayscale): value
``k`` is class ``k`` of ``classes.txt``, ``dataset.ignore_index`` (255) is ignored, anything else is an
error naming the file. ``classes.txt`` sets ``dataset.num_classes`` and ``dataset.class_names`` when the
config is resolved (conf/dataset/folder.yaml interpolates :func:`classes_resolver`); ``palette.txt``
(optional) colours the prediction PNGs.

A mask without an image of the same name is a layout problem: ``python -m dcc.data.check`` lists each,
and training refuses to start (it would silently turn a labeled image into an unlabeled one).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from dcc.data.files import DataError, FileSource, LayoutError, identity_lut, list_dir

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MASK_SUFFIX = ".png"

LAYOUT = """\
  <dataset.root>/
    classes.txt                   one class name per line; line i is class index i (required)
    palette.txt                   optional: "r g b" per line (line i colours class i), for prediction PNGs
    images/train/<name>.jpg|png   training images
    masks/train/<name>.png        index PNG (palette or grayscale) for the images that have labels; 255 = ignore
    images/val/<name>.jpg|png     validation images
    masks/val/<name>.png          every validation image needs one
    images/test/<name>.jpg|png    optional: held-out test images, evaluated once at the end of a run (test/miou)
    masks/test/<name>.png         every test image needs one"""
HINT = "Set dataset.root=/path/to/data or the environment variable DCC_FOLDER_ROOT (see docs/own-data.md)."

# MLflow metric names (val/iou/<class name>) allow these characters only.
_NAME_OK = re.compile(r"^[A-Za-z0-9_\-. /]+$")


def _layout_error(message: str, root: object) -> LayoutError:
    return LayoutError(f"folder: {message}\n(dataset.root={root}; expected layout:\n{LAYOUT}\n)\n{HINT}")


def read_classes(root: str | Path | None) -> list[str]:
    """Class names of ``<root>/classes.txt`` (one per line, trailing blank lines ignored)."""
    if root is None or str(root) in ("", "None"):
        raise _layout_error("dataset.root is not set", root)
    path = Path(str(root)).expanduser() / "classes.txt"
    if not path.is_file():
        raise _layout_error(f"missing {path}", root)
    return _parse_classes(path, path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _parse_classes(path: Path, _mtime: int) -> list[str]:
    lines = path.read_text().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    names = [line.strip() for line in lines]
    for number, name in enumerate(names, 1):
        if not name:
            raise LayoutError(f"{path}:{number}: empty line (line i names class i-1; remove the gap)")
        if not _NAME_OK.match(name):
            raise LayoutError(f"{path}:{number}: class name {name!r} may only hold letters, digits, '_', '-', '.', "
                              "' ' and '/' (it names the MLflow metric val/iou/<name>)")
    if not 1 <= len(names) <= 255:
        raise LayoutError(f"{path}: {len(names)} classes; expected 1 to 255 (255 is the ignore value)")
    seen: dict[str, int] = {}
    for number, name in enumerate(names, 1):
        if name in seen:
            raise LayoutError(f"{path}:{number}: class {name!r} repeats line {seen[name]}")
        seen[name] = number
    return names


def classes_resolver(root: str | None, what: str) -> int | list[str]:
    """OmegaConf resolver ``${dcc_folder_classes:${dataset.root},count|names}``."""
    names = read_classes(root)
    return len(names) if what == "count" else list(names)


def read_palette(root: str | Path) -> np.ndarray | None:
    """``[K, 3]`` uint8 colours of ``<root>/palette.txt`` ("r g b" per line), or None when there is none."""
    path = Path(str(root)).expanduser() / "palette.txt"
    if not path.is_file():
        return None
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        tokens = line.split("#", 1)[0].replace(",", " ").split()
        if not tokens:
            continue
        try:
            rgb = [int(t) for t in tokens]
        except ValueError:
            rgb = []
        if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
            raise LayoutError(f"{path}:{number}: expected 'r g b' with values 0..255, got {line.strip()!r}")
        rows.append(rgb)
    return np.asarray(rows, dtype=np.uint8).reshape(-1, 3)


def _stems(folder: Path, suffixes: tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
    """``{stem: file name}`` of the files in ``folder`` with one of ``suffixes`` and the stems that occur twice."""
    found: dict[str, str] = {}
    twice = []
    for name in sorted(list_dir(folder)):
        stem, dot, suffix = name.rpartition(".")
        if not dot or "." + suffix.lower() not in suffixes:
            continue
        if stem in found:
            twice.append(f"{folder / found[stem]} and {folder / name} share the name {stem!r}")
            continue
        found[stem] = name
    return found, twice


def _split(base: Path, split: str, problems: list[str]) -> tuple[list[tuple[str, str | None]], list[str]]:
    images, twice = _stems(base / "images" / split, IMAGE_SUFFIXES)
    masks, _ = _stems(base / "masks" / split, (MASK_SUFFIX,))
    problems += twice
    problems += [f"{base / 'masks' / split / masks[s]}: mask without an image (no images/{split}/{s}.jpg|png)"
                 for s in sorted(set(masks) - set(images))]
    ids = sorted(images)
    entries = [(f"images/{split}/{images[s]}", f"masks/{split}/{masks[s]}" if s in masks else None) for s in ids]
    return entries, ids


def load_folder(root: str | Path | None, *, num_classes: int, ignore_index: int = 255) -> tuple[FileSource, FileSource]:
    """(train, val) sources under ``root``. Each carries ``layout_problems``: masks without images and
    images that share a name (reported by the check command; training refuses to start on them)."""
    train, val, _ = load_folder_splits(root, num_classes=num_classes, ignore_index=ignore_index)
    return train, val


def load_folder_splits(root: str | Path | None, *, num_classes: int,
                       ignore_index: int = 255) -> tuple[FileSource, FileSource, FileSource | None]:
    """(train, val, test) sources under ``root``: test is None without ``images/test`` (every test image needs a
    mask in ``masks/test``, like a validation image)."""
    names = read_classes(root)
    base = Path(str(root)).expanduser()
    if len(names) != num_classes:
        raise LayoutError(f"folder: {base / 'classes.txt'} names {len(names)} classes but dataset.num_classes="
                          f"{num_classes}; leave dataset.num_classes unset (it is read from classes.txt)")
    for sub in ("images/train", "images/val", "masks/val"):
        if not (base / sub).is_dir():
            raise _layout_error(f"missing {base / sub}", root)
    lut = identity_lut(num_classes, ignore_index)
    has_test = (base / "images" / "test").is_dir()
    if has_test and not (base / "masks" / "test").is_dir():
        raise _layout_error(f"missing {base / 'masks/test'} (images/test is there: every test image needs a mask)", root)
    sources = []
    for split in ("train", "val", "test") if has_test else ("train", "val"):
        problems: list[str] = []
        entries, ids = _split(base, split, problems)
        if not entries:
            raise _layout_error(f"no images (*.jpg, *.jpeg, *.png) in {base / 'images' / split}", root)
        if split != "train":
            unlabeled = [img for img, mask in entries if mask is None]
            if unlabeled:
                what = "validation" if split == "val" else "test"
                raise _layout_error(f"{len(unlabeled)} {what} images have no mask in {base / 'masks' / split}, "
                                    f"the first is {base / unlabeled[0]}", root)
        elif not any(mask is not None for _, mask in entries):
            raise _layout_error(f"no training image has a mask in {base / 'masks/train'} (nothing to learn from)", root)
        source = FileSource(base, entries, ids, luts=[lut], ignore_index=ignore_index)
        source.layout_problems = problems
        sources.append(source)
    return sources[0], sources[1], sources[2] if has_test else None


def experiment_name(root: str | Path | None) -> str:
    """``folder-<name of the root directory>``: the default MLflow experiment of a folder dataset, so that two
    datasets' runs are not mixed in one experiment (and one run directory tree)."""
    if root in (None, "", "None"):
        return "folder"
    name = Path(str(root)).expanduser().resolve().name
    return "folder-" + (re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "root")


def fingerprint(root: str | Path) -> str:
    """The identity of a folder dataset: its resolved root, ``classes.txt`` and every file of ``images/*`` and
    ``masks/*`` by name and size (a stat per file, no reads). Part of the run directory's hash: the same command
    with another root (or files added, removed or replaced) is another run, never the first one's result."""
    base = Path(str(root)).expanduser().resolve()
    digest = hashlib.sha256(str(base).encode())
    classes = base / "classes.txt"
    digest.update(classes.read_bytes() if classes.is_file() else b"")
    for kind in ("images", "masks"):
        top = base / kind
        for folder in sorted(p for p in top.iterdir() if p.is_dir()) if top.is_dir() else []:
            with os.scandir(folder) as entries:
                for entry in sorted(entries, key=lambda e: e.name):
                    if entry.is_file():
                        digest.update(f"{kind}/{folder.name}/{entry.name}:{entry.stat().st_size}\n".encode())
    return digest.hexdigest()[:16]


def _check_entry(source: FileSource, i: int) -> tuple[tuple[int, int] | None, str | None]:
    """``((width, height) of the image or None, problem or None)`` of item ``i``: the image's header and, for a
    labeled item, its whole mask (values and size)."""
    from PIL import Image

    path = source.image_path(i)
    try:
        with Image.open(path) as im:
            size = im.size
    except Exception as exc:  # noqa: BLE001 - PIL raises several types for a damaged file
        return None, f"{path}: cannot read image ({type(exc).__name__}: {exc})"
    if source.label_path(i) is None:
        return size, None
    try:
        mask = source.read_label(i)
    except DataError as exc:  # names the file and what is wrong
        return size, str(exc)
    except Exception as exc:  # noqa: BLE001
        return size, f"{source.label_path(i)}: cannot read label ({type(exc).__name__}: {exc})"
    if mask is not None and (mask.shape[1], mask.shape[0]) != size:
        return size, (f"{source.label_path(i)}: label is {mask.shape[1]}x{mask.shape[0]} but its image {path} is "
                      f"{size[0]}x{size[1]}")
    return size, None


def scan(sources: dict[str, FileSource | None], *, largest_side: int) -> list[str]:
    """Check every file of a folder dataset before a run starts, as ``python -m dcc.data.check`` would: images by
    their headers, masks whole (values, size). Raises :class:`DataError` with the count and the first problem;
    returns warnings (images far larger than the training resolution). A clean result is remembered under
    ``$DCC_CACHE/folder-checks/<key of every file's path, size and modification time>``, so a data set is read
    once, not at every start, and again whenever a file changes."""
    from concurrent.futures import ThreadPoolExecutor

    key = hashlib.sha256()
    for source in sources.values():
        for i in range(len(source) if source is not None else 0):
            for path in (source.image_path(i), source.label_path(i)):
                if path is not None:
                    st = path.stat()
                    key.update(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    cache = Path(os.environ.get("DCC_CACHE") or Path.home() / ".cache" / "dcc").expanduser() / "folder-checks"
    done = cache / key.hexdigest()[:24]
    if done.exists():
        return json.loads(done.read_text())
    problems, big = [], []
    with ThreadPoolExecutor(max_workers=4) as pool:
        for name, source in sources.items():
            if source is None:
                continue
            for i, (size, problem) in enumerate(pool.map(lambda i, s=source: _check_entry(s, i), range(len(source)))):
                if problem:
                    problems.append(problem)
                elif size is not None and max(size) > largest_side:
                    big.append((max(size), str(source.image_path(i))))
    if problems:
        raise DataError(f"{len(problems)} broken files in the dataset, the first: {problems[0]} "
                        "(python -m dcc.data.check lists them all)")
    warnings = []
    if big:
        side, path = max(big)
        warnings.append(f"{len(big)} images are far larger than the training resolution (longest side over "
                        f"{largest_side} px; the largest, {path}, is {side} px): each is decoded whole at every draw, "
                        "which costs time and memory; downscale them once (the masks with nearest-neighbour)")
    cache.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(warnings))
    return warnings
