"""Cityscapes on a miniature tree in the real layout: counts, labelIds -> train ids, errors, a 2-step run."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dcc.data.build import load_sources
from dcc.data.cityscapes import label_ids_lut, load_cityscapes
from dcc.data.files import DataError, LayoutError
from tests.conftest import compose_cfg
from tests.realdata import CITY_TRAIN_IDS, TINY_REAL, city_bands, city_label_ids, city_names, make_cityscapes


def test_official_label_ids_table():
    lut = label_ids_lut()
    # the 19 evaluated classes in train-id order, by their labelIds
    assert [int(np.flatnonzero(lut == t)[0]) for t in range(19)] == [
        7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
    assert (lut[:34] != 255).sum() == 19 and (lut[34:] == -1).all()  # other ids are void, > 33 impossible


def test_counts_order_and_label_mapping(tmp_path):
    root = make_cityscapes(tmp_path / "cs", train_ids_for=(city_names("train")[1],))
    train, val = load_cityscapes(root)
    assert train.ids == city_names("train") and val.ids == city_names("val")
    assert train.entries[0] == (
        "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png",
        "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png",
    )
    assert train.entries[1][1].endswith("_gtFine_labelTrainIds.png")  # used when present
    for i in range(3):
        image, mask = train.load(i)
        assert image.shape == (40, 48, 3)
        # every raw id became its train id (void ids -> 255)
        assert np.array_equal(mask, CITY_TRAIN_IDS[city_bands(i)])
        assert set(np.unique(mask)) == {0, 1, 13, 18, 255}


def test_missing_directories_and_labels_are_named(tmp_path):
    with pytest.raises(LayoutError, match=r"(?s)missing .*nowhere/leftImg8bit/train.*gtFine/\{train,val\}.*DCC_CITYSCAPES_ROOT"):
        load_sources(compose_cfg(["experiment=none", "dataset=cityscapes", f"dataset.root={tmp_path / 'nowhere'}"]).dataset)
    root = make_cityscapes(tmp_path / "cs")
    name = city_names("val")[1]
    (root / "gtFine/val/frankfurt" / f"{name}_gtFine_labelIds.png").unlink()
    with pytest.raises(LayoutError, match=rf"1 listed files are missing, the first is .*{name}_gtFine_labelIds\.png"):
        load_cityscapes(root)


def test_impossible_label_id_and_corrupt_image_name_the_file(tmp_path):
    root = make_cityscapes(tmp_path / "cs")
    train, _ = load_cityscapes(root)
    ids = city_label_ids(0)
    ids[3, 3] = 34  # above the largest labelId
    Image.fromarray(ids).save(train.label_path(0))
    with pytest.raises(DataError, match=rf"{train.label_path(0)}: label values outside .*1 pixels with values 34"):
        train.load(0)
    train.image_path(1).write_bytes(b"not a png")
    with pytest.raises(DataError, match=rf"{train.image_path(1)}: cannot read image"):
        train.load(1)


def test_two_training_steps_on_cityscapes(tmp_path):
    from dcc.engine.job import run

    root = make_cityscapes(tmp_path / "cs")
    cfg = compose_cfg(["experiment=none", "dataset=cityscapes", f"dataset.root={root}", *TINY_REAL, "split='1_4'",
                       f"trainer.runs_root={tmp_path / 'runs'}"])
    assert 0.0 <= run(cfg, launch_dir=tmp_path) <= 100.0  # in %
