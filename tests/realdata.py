"""Miniature Pascal VOC and Cityscapes trees in the real layouts, with generated images and labels.

Labels are drawn so that each file's content is known to the tests: VOC labels are a few horizontal
bands of classes plus a 255 border row; Cityscapes labelIds use raw ids whose train ids are known.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from dcc.engine.visualize import palette

H, W = 40, 48  # image size of every generated file

VOC_FINE = ["2007_000032", "2007_000039", "2008_000002", "2009_000898"]  # train.txt (fine)
VOC_EXTRA = [f"2011_{i:06d}" for i in range(8)]  # SBD-only training images
VOC_VAL = ["2007_000033", "2008_000009", "2010_000001"]


def voc_label(index: int) -> np.ndarray:
    """Bands of classes (index-dependent) and a 255 boundary row: values in 0..20 and 255."""
    rows = np.arange(H)[:, None].repeat(W, 1)
    label = ((rows // 10 + index) % 21).astype(np.uint8)
    label[H // 2] = 255
    return label


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def _palette_png(label: np.ndarray, path: Path) -> None:
    im = Image.frombytes("P", (label.shape[1], label.shape[0]), np.ascontiguousarray(label).tobytes())
    im.putpalette(palette().reshape(-1).tolist())
    im.save(path)


def make_voc(root: Path, *, with_aug_list: str | None = None) -> Path:
    """``root/VOCdevkit/VOC2012`` with JPEGImages, SegmentationClass (palette), SegmentationClassAug
    (grayscale), ImageSets/Segmentation/{train,val}.txt; ``with_aug_list`` = "ids" or "pairs" adds train_aug.txt."""
    base = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    all_ids = VOC_FINE + VOC_EXTRA + VOC_VAL
    for k, i in enumerate(all_ids):
        Image.fromarray(_image(k)).save(base / "JPEGImages" / f"{i}.jpg", quality=95)
        Image.fromarray(voc_label(k)).save(base / "SegmentationClassAug" / f"{i}.png")
        if i in VOC_FINE or i in VOC_VAL:
            _palette_png(voc_label(k), base / "SegmentationClass" / f"{i}.png")
    sets = base / "ImageSets" / "Segmentation"
    (sets / "train.txt").write_text("".join(f"{i}\n" for i in VOC_FINE))
    (sets / "val.txt").write_text("".join(f"{i}\n" for i in VOC_VAL))
    train_aug = sorted(VOC_FINE + VOC_EXTRA)
    if with_aug_list == "ids":
        (sets / "train_aug.txt").write_text("".join(f"{i}\n" for i in train_aug))
    elif with_aug_list == "pairs":
        (sets / "train_aug.txt").write_text(
            "".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in train_aug))
    return root


CITY_TRAIN = {"aachen": 3, "bochum": 2}
CITY_VAL = {"frankfurt": 2}
# raw labelIds and the train id each becomes: road, sidewalk, car, bicycle, void (0), parking (void)
CITY_IDS = np.array([7, 8, 26, 33, 0, 9], dtype=np.uint8)
CITY_TRAIN_IDS = np.array([0, 1, 13, 18, 255, 255], dtype=np.uint8)


def city_bands(index: int) -> np.ndarray:
    """Which entry of CITY_IDS each pixel of file ``index`` holds: horizontal bands of 7 rows."""
    rows = np.arange(H)[:, None].repeat(W, 1)
    return (rows // 7 + index) % len(CITY_IDS)


def city_label_ids(index: int) -> np.ndarray:
    """The labelIds image of file ``index``."""
    return CITY_IDS[city_bands(index)]


def city_names(split: str) -> list[str]:
    cities = CITY_TRAIN if split == "train" else CITY_VAL
    return [f"{c}_{s:06d}_000019" for c, n in sorted(cities.items()) for s in range(n)]


def make_cityscapes(root: Path, *, train_ids_for: tuple[str, ...] = ()) -> Path:
    """``leftImg8bit/{train,val}/<city>/*_leftImg8bit.png`` and ``gtFine/.../*_gtFine_labelIds.png``;
    items named in ``train_ids_for`` also get a ``_gtFine_labelTrainIds.png`` (with the mapped values)."""
    k = 0
    for split in ("train", "val"):
        for name in city_names(split):
            city = name.split("_")[0]
            img_dir, gt_dir = root / "leftImg8bit" / split / city, root / "gtFine" / split / city
            img_dir.mkdir(parents=True, exist_ok=True)
            gt_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_image(100 + k)).save(img_dir / f"{name}_leftImg8bit.png")
            ids = city_label_ids(k)
            Image.fromarray(ids).save(gt_dir / f"{name}_gtFine_labelIds.png")
            if name in train_ids_for:
                Image.fromarray(CITY_TRAIN_IDS[city_bands(k)]).save(gt_dir / f"{name}_gtFine_labelTrainIds.png")
            k += 1
    return root


# Overrides for a few-step CPU training run on a miniature tree.
TINY_REAL = [
    "backbone=resnet18",
    "segnet.channels=32",
    "segnet.low_level_channels=16",
    "dataset.base_size=48",
    "dataset.crop_size=32",
    "trainer.batch_size=2",
    "trainer.unlabeled_batch_size=2",
    "trainer.max_steps=2",
    "trainer.eval_every=2",
    "trainer.log_every=1",
    "trainer.checkpoint_every=2",
    "trainer.num_workers=0",
    "trainer.progress=false",
    "trainer.num_vis=1",
    "loss.start_step=1",
    "loss.selected_num=16",
    "logger=none",
]


FOLDER_CLASSES = ["background", "road", "tree top", "car-park"]
FOLDER_PALETTE = [(0, 0, 0), (128, 64, 128), (0, 200, 0), (250, 170, 30)]
FOLDER_LABELED = [f"lab_{i:02d}" for i in range(6)]  # train images with masks (even: grayscale, odd: palette PNG)
FOLDER_UNLABELED = [f"raw_{i:02d}" for i in range(3)]  # train images without a mask
FOLDER_VAL = [f"val_{i:02d}" for i in range(3)]


def folder_label(index: int) -> np.ndarray:
    """Bands of the 4 classes (index-dependent) and a 255 boundary row."""
    rows = np.arange(H)[:, None].repeat(W, 1)
    label = ((rows // 8 + index) % len(FOLDER_CLASSES)).astype(np.uint8)
    label[H // 2] = 255
    return label


def make_folder(root: Path, *, palette_file: bool = True) -> Path:
    """A ``dataset=folder`` tree: classes.txt, palette.txt, labeled (grayscale and palette masks, .jpg and .png
    images), unlabeled-only and validation images. Label ``k`` of the generation order is ``folder_label(k)``."""
    for sub in ("images/train", "masks/train", "images/val", "masks/val"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in FOLDER_CLASSES) + "\n")
    if palette_file:
        (root / "palette.txt").write_text("".join(f"{r} {g} {b}\n" for r, g, b in FOLDER_PALETTE))
    k = 0
    for name in FOLDER_LABELED + FOLDER_UNLABELED:
        suffix = ".jpg" if k % 3 == 0 else ".png"
        Image.fromarray(_image(200 + k)).save(root / "images/train" / f"{name}{suffix}")
        if name in FOLDER_LABELED:
            if k % 2:
                _palette_png(folder_label(k), root / "masks/train" / f"{name}.png")
            else:
                Image.fromarray(folder_label(k)).save(root / "masks/train" / f"{name}.png")
        k += 1
    for name in FOLDER_VAL:
        Image.fromarray(_image(200 + k)).save(root / "images/val" / f"{name}.png")
        _palette_png(folder_label(k), root / "masks/val" / f"{name}.png")
        k += 1
    return root
