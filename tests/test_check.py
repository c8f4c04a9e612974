"""The dataset check command: counts, class histogram, and every broken file named in one pass."""

from __future__ import annotations

import numpy as np
from PIL import Image

from dcc.data.check import main
from tests.realdata import VOC_EXTRA, VOC_FINE, VOC_VAL, make_voc, voc_label


def test_clean_tree_reports_counts_and_histogram(tmp_path, capsys):
    root = make_voc(tmp_path / "voc")
    assert main(["--quiet", "dataset=voc", f"dataset.root={root}"]) == 0
    out = capsys.readouterr().out
    assert "train: 12 images, 12 labels, 0 problems" in out and "val: 3 images, 3 labels, 0 problems" in out
    assert "train: 12 images, the published set has 10582" in out
    assert "train: 4 images of the fine set (published: 1464)" in out
    assert "split 1_8: 2 labeled" in out and "no problems found" in out
    # hand count of the training labels: files 0..11 in generation order are exactly the training set
    hist = sum(np.bincount(voc_label(k).ravel(), minlength=256) for k in range(len(VOC_FINE + VOC_EXTRA)))
    row = next(line for line in out.splitlines() if " aeroplane " in line)
    assert row.split()[2] == str(hist[1])
    ignore = next(line for line in out.splitlines() if "(ignore)" in line)
    assert ignore.split()[3] == str(hist[255])


def test_every_problem_is_named_at_once(tmp_path, capsys):
    root = make_voc(tmp_path / "voc")
    base = root / "VOCdevkit" / "VOC2012"
    corrupt = base / "JPEGImages" / f"{VOC_EXTRA[0]}.jpg"
    corrupt.write_bytes(b"\xff\xd8 not really a jpeg")
    out_of_range = base / "SegmentationClassAug" / f"{VOC_EXTRA[1]}.png"
    label = voc_label(0)
    label[5, 5] = 99
    Image.fromarray(label).save(out_of_range)
    wrong_size = base / "SegmentationClass" / f"{VOC_VAL[0]}.png"
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(wrong_size)
    assert main(["--quiet", "--workers", "2", "dataset=voc", f"dataset.root={root}"]) == 1
    out = capsys.readouterr().out
    assert "3 problems:" in out
    assert f"{corrupt}: cannot read image" in out
    assert f"{out_of_range}: label values outside the class range (1 pixels with values 99" in out
    assert f"{wrong_size}: label is 20x20 but its image" in out
    assert "train: 12 images, 12 labels, 2 problems" in out and "val: 3 images, 3 labels, 1 problems" in out


def test_missing_root_exits_non_zero_with_the_layout(tmp_path, capsys):
    assert main(["--quiet", "dataset=voc", f"dataset.root={tmp_path / 'absent'}"]) == 1
    out = capsys.readouterr().out
    assert f"voc: missing {tmp_path / 'absent' / 'VOCdevkit' / 'VOC2012'}" in out
    assert "SegmentationClassAug/<id>.png" in out and "1 problems:" in out
