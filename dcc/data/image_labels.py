"""Image-level labels for the weakly-supervised setting (paper Table 5): which foreground classes each image contains.

A label vector has one entry per foreground class (``num_classes - 1``: background, class 0, is never a
target, and neither is the ignore value). Sources:

- ``masks``: the classes present in the image's segmentation mask. For VOC this reads the SBD-augmented
  ``SegmentationClassAug/<id>.png`` (falling back to ``SegmentationClass``), so that the 9,118 images that
  are unlabeled under ``dataset.protocol=classic`` get the labels the SBD annotations imply; for the
  embedded digits it is the digits visible in each scene.
- ``xml`` (VOC): the object names of ``Annotations/<id>.xml`` (boxes, so also objects too small or too
  occluded to appear in a mask).

VOC labels are computed once per (tree, source, list of ids) and cached as ``.npy`` under
``$DCC_CACHE/image_labels`` (default ``~/.cache/dcc``); an image whose mask holds only background and
ignore gets an all-zero vector.
"""

from __future__ import annotations

import hashlib
import logging
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dcc.config import DatasetName, ImageLabelSource, choice
from dcc.data.files import DataError, read_raw_label

log = logging.getLogger(__name__)


def labels_from_masks(masks: np.ndarray, num_classes: int) -> np.ndarray:
    """float32 ``[N, num_classes - 1]``: 1 where foreground class ``c + 1`` occurs in mask ``n`` ([N, H, W]).

    Values outside ``1..num_classes-1`` (background 0, the ignore value) are left out.
    """
    masks = np.asarray(masks).reshape(len(masks), -1).astype(np.int64)
    present = np.zeros((len(masks), num_classes + 1), dtype=bool)
    rows = np.broadcast_to(np.arange(len(masks))[:, None], masks.shape)
    present[rows, np.minimum(masks, num_classes)] = True  # anything >= num_classes lands in the spare column
    return present[:, 1:num_classes].astype(np.float32)


def labels_from_voc_xml(path: Path, class_names: Sequence[str]) -> np.ndarray:
    """float32 ``[len(class_names) - 1]`` from the ``<object><name>`` entries of one VOC annotation file."""
    try:
        names = [obj.findtext("name", "").strip() for obj in ET.parse(path).getroot().iter("object")]
    except (ET.ParseError, OSError) as exc:
        raise DataError(f"{path}: cannot read the VOC annotation ({exc})") from exc
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted({n for n in names if n not in index})
    if unknown:
        raise DataError(f"{path}: unknown object names {unknown} (expected VOC classes {list(class_names[1:])})")
    out = np.zeros(len(class_names) - 1, dtype=np.float32)
    out[[index[n] - 1 for n in names if index[n] > 0]] = 1.0
    return out


def _cache_file(kind: str, key: str) -> Path:
    root = Path(os.environ.get("DCC_CACHE") or Path.home() / ".cache" / "dcc").expanduser()
    return root / "image_labels" / f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npy"


def voc_image_labels(base: Path, ids: Sequence[str], source: ImageLabelSource, class_names: Sequence[str],
                     ignore_index: int = 255) -> np.ndarray:
    """Labels of the VOC images ``ids`` under ``base`` (the ``VOC2012`` directory), cached once."""
    cache = _cache_file(f"voc-{source.name}", f"{Path(base).resolve()}|{source.name}|{'|'.join(ids)}")
    if cache.exists():
        labels = np.load(cache)
        if labels.shape == (len(ids), len(class_names) - 1):
            return labels
    num_classes = len(class_names)
    rows = []
    for image_id in ids:
        if source is ImageLabelSource.xml:
            rows.append(labels_from_voc_xml(base / "Annotations" / f"{image_id}.xml", class_names))
            continue
        path = next((p for p in (base / "SegmentationClassAug" / f"{image_id}.png",
                                 base / "SegmentationClass" / f"{image_id}.png") if p.exists()), None)
        if path is None:
            raise DataError(f"voc image labels: no mask for {image_id} in SegmentationClassAug/ or SegmentationClass/ "
                            f"under {base} (use dataset.image_label_source=xml to read Annotations/ instead)")
        raw = read_raw_label(path)
        bad = (raw >= num_classes) & (raw != ignore_index)
        if bad.any():
            raise DataError(f"{path}: label values {sorted(set(np.unique(raw[bad]).tolist()))[:10]} outside the "
                            f"{num_classes} classes and {ignore_index} = ignore")
        rows.append(labels_from_masks(raw[None], num_classes)[0])
    labels = np.stack(rows) if rows else np.zeros((0, num_classes - 1), np.float32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, labels)
    os.replace(tmp, cache)
    log.info("voc image labels (%s) of %d images cached in %s", source.name, len(ids), cache)
    return labels


def mask_image_labels(train: Any, num_classes: int) -> np.ndarray:
    """Labels of every image of a :class:`~dcc.data.files.FileSource` from its own mask (``dataset=folder``),
    cached once per (root, files, modification times); an image without a mask has no image-level label."""
    missing = [train.entries[i][0] for i, has in enumerate(train.has_label()) if not has]
    if missing:
        raise DataError(
            f"dataset.image_labels=true: {len(missing)} training images have no mask to take image-level labels from, "
            f"e.g. {train.root / missing[0]} (the weakly-supervised setting needs a mask, or turn it off with "
            "loss.weak=false / dataset.image_labels=false)")
    paths = [train.label_path(i) for i in range(len(train))]
    key = f"{Path(train.root).resolve()}|{num_classes}|" + "|".join(f"{p.name}:{p.stat().st_mtime_ns}" for p in paths)
    cache = _cache_file("folder-masks", key)
    if cache.exists():
        labels = np.load(cache)
        if labels.shape == (len(train), num_classes - 1):
            return labels
    labels = np.stack([labels_from_masks(train.read_label(i)[None], num_classes)[0] for i in range(len(train))])
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, labels)
    os.replace(tmp, cache)
    return labels


def load_image_labels(cfg: Any, train: Any) -> np.ndarray:
    """float32 ``[len(train), num_classes - 1]``: the image-level labels of every training image."""
    ds = cfg.dataset
    name = choice(ds.name, DatasetName)
    source = choice(ds.image_label_source, ImageLabelSource)
    if name is DatasetName.digits:
        return labels_from_masks(train.masks, ds.num_classes)
    if name is DatasetName.folder:
        return mask_image_labels(train, ds.num_classes)
    if name is DatasetName.voc:
        from dcc.data.voc import CLASSES

        names = list(ds.class_names) or list(CLASSES)
        return voc_image_labels(train.root, train.ids, source, names, ds.ignore_index)
    raise DataError(f"dataset.image_labels=true: dataset={name.name} has no image-level labels (voc and digits have)")
