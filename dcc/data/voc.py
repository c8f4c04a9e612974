"""Pascal VOC 2012 with the SBD-augmented labels, in the standard ``VOCdevkit/VOC2012`` layout.

Two protocols (``dataset.protocol``):

- ``aug``: the training pool is the augmented set (10,582 images: every SegmentationClassAug label
  that is not a val image) with SegmentationClassAug labels; any of them may be labeled.
- ``classic``: the same 10,582 training images, but only the 1,464 finely annotated train images
  (``ImageSets/Segmentation/train.txt``) carry labels, from SegmentationClass; the other 9,118 are
  unlabeled (and their labels are never read).

Validation is always the 1,449 images of ``val.txt`` with their SegmentationClass labels. The list of
the augmented set comes from ``ImageSets/Segmentation/train_aug.txt`` when present (ids or the
authors' pairs), else from the file names in SegmentationClassAug minus the val ids; items are sorted
by id.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from dcc.config import VocProtocol
from dcc.data.files import FileSource, LayoutError, identity_lut, list_dir, require_files, require_paths
from dcc.data.splits import read_list

log = logging.getLogger(__name__)

CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
NUM_TRAIN_AUG, NUM_TRAIN_FINE, NUM_VAL = 10582, 1464, 1449

LAYOUT = """\
  <dataset.root>/VOCdevkit/VOC2012/        (or dataset.root pointing at VOC2012 itself)
    JPEGImages/<id>.jpg                    17,125 images (VOCtrainval_11-May-2012.tar)
    SegmentationClass/<id>.png             fine palette labels of train + val (same tar)
    SegmentationClassAug/<id>.png          12,031 SBD-augmented labels (SegmentationClassAug.zip)
    ImageSets/Segmentation/train.txt       1,464 fine train ids
    ImageSets/Segmentation/val.txt         1,449 val ids
    ImageSets/Segmentation/train_aug.txt   optional: the 10,582 augmented ids"""
HINT = "Set dataset.root=/path/to/data or the environment variable DCC_VOC_ROOT (see the README, 'Using real data')."


def voc_dir(root: Path) -> Path:
    """The ``VOC2012`` directory under ``root`` (``root`` itself, ``root/VOC2012`` or ``root/VOCdevkit/VOC2012``)."""
    for candidate in (root / "VOCdevkit" / "VOC2012", root / "VOC2012", root):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    return root / "VOCdevkit" / "VOC2012"


def _ids(path: Path) -> list[str]:
    """Ids of a VOC list file (``2009_000898`` per line, or the authors' ``/JPEGImages/2009_000898.jpg ...`` pairs)."""
    return [Path(image).stem for image, _ in read_list(path)]


def load_voc(
    root: str | Path | None, *, protocol: VocProtocol, num_classes: int = 21, ignore_index: int = 255
) -> tuple[FileSource, FileSource]:
    """(train, val) sources of VOC under ``root``; fails naming the first missing directory, list or file."""
    if root is None or str(root) == "":
        raise LayoutError(f"voc: dataset.root is not set; expected layout:\n{LAYOUT}\n{HINT}")
    base = voc_dir(Path(str(root)).expanduser())
    sets = base / "ImageSets" / "Segmentation"
    aug_list = sets / "train_aug.txt"
    required = [base, base / "JPEGImages", base / "SegmentationClass", sets / "train.txt", sets / "val.txt"]
    if protocol is VocProtocol.aug or not aug_list.exists():
        required.append(base / "SegmentationClassAug")
    require_paths(required, dataset="voc", root=Path(str(root)), layout=LAYOUT, hint=HINT)

    val_ids = _ids(sets / "val.txt")
    fine_ids = _ids(sets / "train.txt")
    aug_dir = base / "SegmentationClassAug"
    val_set = set(val_ids)
    if aug_list.exists():
        aug_ids = _ids(aug_list)
        overlap = sum(i in val_set for i in aug_ids)
        if overlap:
            log.warning("voc: %d ids of %s are val images; they are left out of training", overlap, aug_list)
    else:  # SegmentationClassAug holds train_aug + val labels
        aug_ids = sorted(Path(name).stem for name in list_dir(aug_dir) if name.endswith(".png"))
    # Sorted, so that a generated split depends on (seed, index) only, not on the order of a list file;
    # the 1,464 fine images belong to the augmented set even if a custom list leaves some out.
    fine_set = set(fine_ids)
    aug_ids = sorted((set(aug_ids) - val_set) | fine_set)

    fine = np.array([i in fine_set for i in aug_ids], dtype=bool)
    if protocol is VocProtocol.aug:
        train_entries = [(f"JPEGImages/{i}.jpg", f"SegmentationClassAug/{i}.png") for i in aug_ids]
    else:
        train_entries = [
            (f"JPEGImages/{i}.jpg", f"SegmentationClass/{i}.png" if f else None) for i, f in zip(aug_ids, fine)
        ]
    val_entries = [(f"JPEGImages/{i}.jpg", f"SegmentationClass/{i}.png") for i in val_ids]
    require_files(base, (rel for entry in train_entries + val_entries for rel in entry), dataset="voc",
                  root=Path(str(root)), layout=LAYOUT, hint=HINT)

    lut = identity_lut(num_classes, ignore_index)
    train = FileSource(base, train_entries, aug_ids, luts=[lut], fine=fine, ignore_index=ignore_index)
    val = FileSource(base, val_entries, val_ids, luts=[lut], ignore_index=ignore_index)
    return train, val

