"""Cityscapes (fine annotations): 2,975 train and 500 val images, 19 train ids, 255 ignored.

Images are ``leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png``; labels are
``gtFine/{train,val}/<city>/<name>_gtFine_labelTrainIds.png`` when present (created by
cityscapesscripts' ``createTrainIdLabelImgs``), else ``<name>_gtFine_labelIds.png`` mapped to the train
ids on the fly with the official table.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dcc.data.files import INVALID, FileSource, LayoutError, identity_lut, list_dir, require_files, require_paths

CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
NUM_TRAIN, NUM_VAL = 2975, 500

# labelIds -> train ids (cityscapesscripts/helpers/labels.py): id: trainId for the 19 evaluated classes;
# ids 0-33 not listed here are void (255); values above 33 never occur in a labelIds PNG.
_TRAIN_IDS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
    27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
NUM_LABEL_IDS = 34

LAYOUT = """\
  <dataset.root>/
    leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png           (leftImg8bit_trainvaltest.zip)
    gtFine/{train,val}/<city>/<name>_gtFine_labelIds.png            (gtFine_trainvaltest.zip)
      or <name>_gtFine_labelTrainIds.png (used when present)"""
HINT = "Set dataset.root=/path/to/cityscapes or the environment variable DCC_CITYSCAPES_ROOT (see the README, 'Using real data')."

IMAGE_SUFFIX = "_leftImg8bit.png"
TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds.png"
LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"


def label_ids_lut(ignore_index: int = 255) -> np.ndarray:
    """256-entry table: labelIds value -> train id (void ids -> ``ignore_index``, values > 33 invalid)."""
    lut = np.full(256, INVALID, dtype=np.int16)
    lut[:NUM_LABEL_IDS] = ignore_index
    for label_id, train_id in _TRAIN_IDS.items():
        lut[label_id] = train_id
    return lut


def _split_entries(root: Path, split: str) -> tuple[list[tuple[str, str]], list[str], list[int]]:
    """Entries, ids and table indices (0: labelTrainIds, 1: labelIds) of one split, sorted by city and name."""
    entries, ids, tables = [], [], []
    image_dir = root / "leftImg8bit" / split
    for city in sorted(p.name for p in image_dir.iterdir() if p.is_dir()):
        labels = list_dir(root / "gtFine" / split / city)
        for name in sorted(n for n in list_dir(image_dir / city) if n.endswith(IMAGE_SUFFIX)):
            stem = name[: -len(IMAGE_SUFFIX)]
            use_train_ids = stem + TRAIN_IDS_SUFFIX in labels
            label = stem + (TRAIN_IDS_SUFFIX if use_train_ids else LABEL_IDS_SUFFIX)
            entries.append((f"leftImg8bit/{split}/{city}/{name}", f"gtFine/{split}/{city}/{label}"))
            ids.append(stem)
            tables.append(0 if use_train_ids else 1)
    return entries, ids, tables


def load_cityscapes(
    root: str | Path | None, *, num_classes: int = 19, ignore_index: int = 255
) -> tuple[FileSource, FileSource]:
    """(train, val) sources under ``root``; fails naming the first missing directory or label file."""
    if root is None or str(root) == "":
        raise LayoutError(f"cityscapes: dataset.root is not set; expected layout:\n{LAYOUT}\n{HINT}")
    base = Path(str(root)).expanduser()
    required = [base / sub / split for sub in ("leftImg8bit", "gtFine") for split in ("train", "val")]
    require_paths(required, dataset="cityscapes", root=base, layout=LAYOUT, hint=HINT)
    luts = [identity_lut(num_classes, ignore_index), label_ids_lut(ignore_index)]
    sources = []
    for split in ("train", "val"):
        entries, ids, tables = _split_entries(base, split)
        if not entries:
            raise LayoutError(
                f"cityscapes: no *{IMAGE_SUFFIX} under {base / 'leftImg8bit' / split}/<city>/\n"
                f"(dataset.root={base}; expected layout:\n{LAYOUT}\n)\n{HINT}"
            )
        require_files(base, (label for _, label in entries), dataset="cityscapes", root=base, layout=LAYOUT,
                      hint=HINT)
        sources.append(FileSource(base, entries, ids, luts=luts, lut_index=tables, ignore_index=ignore_index))
    return sources[0], sources[1]
