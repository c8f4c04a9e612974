"""Image and label files of a dataset tree: reading, label mapping and the errors that name the file.

A :class:`FileSource` is the ``Source`` of a real dataset (see ``dcc/data/datasets.py``): a list of
(image path, label path or None) pairs relative to a root. Labels are PNGs whose pixel values are
class indices (palette PNGs are read as their indices, not their colours); a per-file lookup table
maps raw values to class indices (e.g. Cityscapes labelIds -> train ids) and marks impossible values,
so that a label with values outside the class range fails naming the file and the values.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "DataError", "FileSource", "LayoutError", "identity_lut", "list_dir", "read_image", "read_raw_label",
    "require_files", "require_paths",
]

INVALID = -1  # lookup-table value of a raw label value that must not occur


class DataError(RuntimeError):
    """A dataset file that cannot be used (unreadable, wrong size, label values out of range); names the file."""


class LayoutError(DataError):
    """A dataset root that lacks a directory or file of the expected layout."""


def require_paths(paths: Iterable[Path], *, dataset: str, root: Path, layout: str, hint: str = "") -> None:
    """Raise :class:`LayoutError` naming the first path of ``paths`` that does not exist and the expected layout."""
    for path in paths:
        if not path.exists():
            raise LayoutError(
                f"{dataset}: missing {path}\n(dataset.root={root}; expected layout:\n{layout.rstrip()}\n)"
                + (f"\n{hint}" if hint else "")
            )


def require_files(
    base: Path, relative: Iterable[str | None], *, dataset: str, root: Path, layout: str, hint: str = ""
) -> None:
    """Every path of ``relative`` (under ``base``; None entries skipped) exists, checked with one directory
    listing per folder instead of one stat per file; otherwise names the first missing file and the count."""
    listings: dict[str, set[str]] = {}
    missing: list[str] = []
    for rel in relative:
        if rel is None:
            continue
        folder, _, name = rel.rpartition("/")
        if folder not in listings:
            listings[folder] = list_dir(base / folder)
        if name not in listings[folder]:
            missing.append(rel)
    if missing:
        raise LayoutError(
            f"{dataset}: {len(missing)} listed files are missing, the first is {base / missing[0]}\n"
            f"(dataset.root={root}; expected layout:\n{layout.rstrip()}\n)" + (f"\n{hint}" if hint else "")
        )


def list_dir(path: Path) -> set[str]:
    """Names in directory ``path`` (empty when it does not exist): one system call instead of a stat per file."""
    try:
        return set(os.listdir(path))
    except FileNotFoundError:
        return set()


def read_image(path: Path) -> np.ndarray:
    """RGB uint8 ``[H, W, 3]``; any decoding problem (corrupt, truncated, not an image) names the file."""
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))  # a writable copy (torch.from_numpy warns on read-only arrays)
    except (OSError, ValueError, SyntaxError) as exc:  # PIL raises these for unreadable/truncated files
        raise DataError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc


def read_raw_label(path: Path) -> np.ndarray:
    """The stored values of a single-channel (palette ``P``, ``L``) label PNG, uint8 ``[H, W]``.

    Palette PNGs (VOC's SegmentationClass) are read as their palette indices, never converted to colours.
    """
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L", "I", "I;16"):
                raise DataError(
                    f"{path}: label PNG has mode {im.mode}; expected class indices (a palette 'P' or grayscale "
                    "'L' PNG), not a colour rendering"
                )
            raw = np.asarray(im)
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{path}: cannot read label ({type(exc).__name__}: {exc})") from exc
    if raw.ndim != 2:
        raise DataError(f"{path}: label has shape {raw.shape}, expected [H, W]")
    if raw.dtype != np.uint8:
        if raw.min() < 0 or raw.max() > 255:
            raise DataError(f"{path}: label values {int(raw.min())}..{int(raw.max())} do not fit 0..255")
        raw = raw.astype(np.uint8)
    return raw


def identity_lut(num_classes: int, ignore_index: int) -> np.ndarray:
    """Lookup table that keeps 0..num_classes-1 and ``ignore_index`` and marks every other value invalid."""
    lut = np.full(256, INVALID, dtype=np.int16)
    lut[:num_classes] = np.arange(num_classes)
    lut[ignore_index] = ignore_index
    return lut


class FileSource:
    """(image, label) files under ``root``; item ``i`` is ``entries[i] = (image path, label path or None)``.

    ``ids`` name the items (e.g. ``2009_000898``), ``luts`` are raw-value -> class lookup tables and
    ``lut_index[i]`` picks item ``i``'s table. ``fine[i]`` marks items of a dataset's finely annotated
    subset (VOC's 1,464 train images); None when the dataset has no such subset.
    """

    def __init__(
        self,
        root: Path,
        entries: Sequence[tuple[str, str | None]],
        ids: Sequence[str],
        *,
        luts: Sequence[np.ndarray],
        lut_index: Sequence[int] | None = None,
        fine: np.ndarray | None = None,
        ignore_index: int = 255,
    ) -> None:
        assert len(entries) == len(ids), f"{len(entries)} entries vs {len(ids)} ids"
        self.root = Path(root)
        self.entries = [(str(img), None if lab is None else str(lab)) for img, lab in entries]
        self.ids = [str(i) for i in ids]
        self.luts = [np.asarray(t, dtype=np.int16) for t in luts]
        self.lut_index = np.zeros(len(entries), dtype=np.int8) if lut_index is None else np.asarray(lut_index, np.int8)
        self.fine = None if fine is None else np.asarray(fine, dtype=bool)
        self.ignore_index = ignore_index

    def __len__(self) -> int:
        return len(self.entries)

    def image_path(self, i: int) -> Path:
        return self.root / self.entries[i][0]

    def label_path(self, i: int) -> Path | None:
        label = self.entries[i][1]
        return None if label is None else self.root / label

    def has_label(self) -> np.ndarray:
        """bool ``[N]``: which items have a label file (the pool labeled images can be drawn from)."""
        return np.array([lab is not None for _, lab in self.entries], dtype=bool)

    def entry_line(self, i: int) -> str:
        """Item ``i`` in the authors' list format: ``/image_path /label_path`` (paths relative to the root)."""
        img, lab = self.entries[i]
        return f"/{img}" if lab is None else f"/{img} /{lab}"

    def read_image(self, i: int) -> np.ndarray:
        return read_image(self.image_path(i))

    def read_label(self, i: int) -> np.ndarray | None:
        """Class indices uint8 ``[H, W]`` (``ignore_index`` kept), or None for an item without a label."""
        path = self.label_path(i)
        if path is None:
            return None
        raw = read_raw_label(path)
        mapped = self.luts[int(self.lut_index[i])][raw]
        bad = mapped == INVALID
        if bad.any():
            values = np.unique(raw[bad])
            shown = ", ".join(str(v) for v in values[:10]) + (", ..." if len(values) > 10 else "")
            raise DataError(
                f"{path}: label values outside the class range ({bad.sum()} pixels with values {shown}; "
                f"allowed: the classes of this dataset and {self.ignore_index} = ignore)"
            )
        return mapped.astype(np.uint8)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        image = self.read_image(i)
        mask = self.read_label(i)
        if mask is not None and mask.shape != image.shape[:2]:
            raise DataError(
                f"{self.label_path(i)}: label is {mask.shape[1]}x{mask.shape[0]} but its image "
                f"{self.image_path(i)} is {image.shape[1]}x{image.shape[0]}"
            )
        return image, mask
