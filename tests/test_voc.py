"""Pascal VOC on a miniature tree in the real layout: protocols, label reading, errors, a 2-step run."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from dcc.config import VocProtocol
from dcc.data.build import build_data, load_sources
from dcc.data.files import DataError, LayoutError
from dcc.data.voc import load_voc
from tests.conftest import compose_cfg
from tests.realdata import TINY_REAL, VOC_EXTRA, VOC_FINE, VOC_VAL, make_voc, voc_label


@pytest.fixture
def voc_root(tmp_path):
    return make_voc(tmp_path / "voc")


def _voc_cfg(root, *extra):
    return compose_cfg(["experiment=none", "dataset=voc", f"dataset.root={root}", *extra])


def test_aug_protocol_counts_labels_and_fine_set(voc_root):
    train, val = load_voc(voc_root, protocol=VocProtocol.aug)
    assert len(train) == len(VOC_FINE) + len(VOC_EXTRA) and len(val) == len(VOC_VAL)
    assert train.ids == sorted(VOC_FINE + VOC_EXTRA)  # derived from SegmentationClassAug minus val
    assert train.entries[0] == (f"JPEGImages/{train.ids[0]}.jpg", f"SegmentationClassAug/{train.ids[0]}.png")
    assert val.entries[0] == (f"JPEGImages/{VOC_VAL[0]}.jpg", f"SegmentationClass/{VOC_VAL[0]}.png")
    assert [i for i, f in zip(train.ids, train.fine) if f] == sorted(VOC_FINE)
    assert train.has_label().all()


def test_palette_and_grayscale_labels_read_as_class_indices(voc_root):
    train, val = load_voc(voc_root, protocol=VocProtocol.aug)
    k = (VOC_FINE + VOC_EXTRA + VOC_VAL).index(VOC_VAL[1])  # generation index of this file
    raw = Image.open(val.label_path(1))
    assert raw.mode == "P" and np.asarray(raw.convert("RGB"))[0, 0].any()  # stored colours are not indices
    image, mask = val.load(1)
    assert image.shape == (40, 48, 3) and image.dtype == np.uint8
    assert np.array_equal(mask, voc_label(k))  # indices 0..20 and 255 exactly
    _, mask = train.load(train.ids.index(VOC_EXTRA[0]))
    assert np.array_equal(mask, voc_label(len(VOC_FINE)))


def test_classic_protocol_labels_only_the_fine_images(voc_root):
    cfg = _voc_cfg(voc_root, "dataset.protocol=classic", "split=full")
    data = build_data(cfg)
    fine = sorted(data.train.ids.index(i) for i in VOC_FINE)
    assert data.labeled.tolist() == fine
    assert sorted(data.unlabeled.tolist()) == sorted(set(range(len(data.train))) - set(fine))
    labeled_entry = data.train.entries[fine[0]]
    assert labeled_entry[1].startswith("SegmentationClass/")  # the fine annotation, not the SBD one
    image, mask = data.train.load(int(data.unlabeled[0]))
    assert mask is None and image.shape == (40, 48, 3)  # unlabeled labels are never read
    # a fraction of the classic pool draws from the fine images only
    half = build_data(_voc_cfg(voc_root, "dataset.protocol=classic", "split='1_4'"))
    assert len(half.labeled) == 1 and set(half.labeled.tolist()) <= set(fine)


@pytest.mark.parametrize("fmt", ["ids", "pairs"])
def test_train_aug_list_file_in_both_formats(tmp_path, fmt):
    root = make_voc(tmp_path / "voc", with_aug_list=fmt)
    # drop an extra image from the list: the training set follows the list, not the folder
    sets = root / "VOCdevkit/VOC2012/ImageSets/Segmentation"
    lines = [ln for ln in (sets / "train_aug.txt").read_text().splitlines() if VOC_EXTRA[-1] not in ln]
    (sets / "train_aug.txt").write_text("\n".join(lines) + "\n")
    train, _ = load_voc(root, protocol=VocProtocol.aug)
    assert train.ids == sorted(VOC_FINE + VOC_EXTRA[:-1])


def test_missing_root_names_layout_and_first_missing_path(tmp_path):
    with pytest.raises(LayoutError) as err:
        load_sources(_voc_cfg(tmp_path / "nowhere").dataset)
    msg = str(err.value)
    assert "missing " + str(tmp_path / "nowhere" / "VOCdevkit" / "VOC2012") in msg
    assert "SegmentationClassAug/<id>.png" in msg and "DCC_VOC_ROOT" in msg
    with pytest.raises(LayoutError, match="(?s)dataset.root is not set.*DCC_VOC_ROOT"):
        load_voc(None, protocol=VocProtocol.aug)


def test_incomplete_root_names_the_first_missing_file(voc_root):
    base = voc_root / "VOCdevkit" / "VOC2012"
    (base / "ImageSets/Segmentation/val.txt").unlink()
    with pytest.raises(LayoutError, match=r"missing .*ImageSets/Segmentation/val\.txt"):
        load_voc(voc_root, protocol=VocProtocol.aug)
    make_voc(voc_root)
    (base / "JPEGImages" / f"{VOC_EXTRA[2]}.jpg").unlink()
    (base / "JPEGImages" / f"{VOC_EXTRA[3]}.jpg").unlink()
    with pytest.raises(LayoutError, match=rf"2 listed files are missing, the first is .*JPEGImages/{VOC_EXTRA[2]}\.jpg"):
        load_voc(voc_root, protocol=VocProtocol.aug)
    # classic reads no SBD labels: deleting SegmentationClassAug is fine once train_aug.txt lists the images
    make_voc(voc_root, with_aug_list="ids")
    shutil.rmtree(base / "SegmentationClassAug")
    train, _ = load_voc(voc_root, protocol=VocProtocol.classic)
    assert len(train) == len(VOC_FINE) + len(VOC_EXTRA)
    with pytest.raises(LayoutError, match="missing .*SegmentationClassAug"):
        load_voc(voc_root, protocol=VocProtocol.aug)


def test_corrupt_image_and_out_of_range_label_name_the_file(voc_root):
    train, _ = load_voc(voc_root, protocol=VocProtocol.aug)
    bad_image = train.image_path(3)
    bad_image.write_bytes(bad_image.read_bytes()[:200])  # truncated JPEG
    with pytest.raises(DataError, match=rf"{bad_image}: cannot read image"):
        train.load(3)
    label = voc_label(0)
    label[0, :5] = 21  # one past the last class
    label[1, 0] = 200
    Image.fromarray(label).save(train.label_path(4))
    with pytest.raises(DataError, match=rf"{train.label_path(4)}: label values outside .*6 pixels with values 21, 200"):
        train.load(4)
    Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(train.label_path(5))  # an RGB rendering
    with pytest.raises(DataError, match=rf"{train.label_path(5)}: label PNG has mode RGB"):
        train.load(5)


def test_two_training_steps_on_voc(voc_root, tmp_path):
    from dcc.engine.job import run

    cfg = _voc_cfg(voc_root, *TINY_REAL, "split='1_4'", f"trainer.runs_root={tmp_path / 'runs'}")
    miou = run(cfg, launch_dir=tmp_path)
    assert 0.0 <= miou <= 100.0  # in %


def test_protocol_is_a_voc_option_only():
    from dcc.config import ConfigError, validate

    with pytest.raises(ConfigError, match="dataset.protocol=classic only exists for dataset=voc"):
        validate(compose_cfg(["experiment=none", "dataset=cityscapes", "dataset.protocol=classic"]))
    validate(compose_cfg(["experiment=none", "dataset=voc", "dataset.protocol=classic"]))
