"""dataset=folder: your own images and masks; classes.txt sets the classes, masks decide the labeled pool."""

from __future__ import annotations

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from dcc.config import ConfigError, validate
from dcc.data.build import build_data
from dcc.data.check import main as check_main
from dcc.data.files import DataError, LayoutError
from dcc.data.folder import load_folder, read_classes, read_palette
from tests.conftest import compose_cfg
from tests.realdata import (FOLDER_CLASSES, FOLDER_LABELED, FOLDER_PALETTE, FOLDER_UNLABELED, FOLDER_VAL, TINY_REAL,
                            folder_label, make_folder)


@pytest.fixture
def folder_root(tmp_path):
    return make_folder(tmp_path / "mydata")


def _cfg(root, *extra):
    return compose_cfg(["experiment=none", "dataset=folder", f"dataset.root={root}", *extra])


def test_classes_file_sets_num_classes_and_names(folder_root):
    cfg = _cfg(folder_root)
    validate(cfg)
    assert cfg.dataset.num_classes == 4 and list(cfg.dataset.class_names) == FOLDER_CLASSES
    assert read_classes(folder_root) == FOLDER_CLASSES  # the trailing blank line is ignored
    (folder_root / "classes.txt").write_text("a\nb\nc\n")
    assert _cfg(folder_root).dataset.num_classes == 3  # re-read when the file changes


def test_labeled_pool_is_the_images_with_masks(folder_root):
    train, val = load_folder(folder_root, num_classes=4)
    assert train.ids == sorted(FOLDER_LABELED + FOLDER_UNLABELED) and val.ids == FOLDER_VAL
    assert [train.ids[i] for i in np.flatnonzero(train.has_label())] == FOLDER_LABELED
    # grayscale and palette masks both read as class indices
    for k, name in enumerate(FOLDER_LABELED):
        image, mask = train.load(train.ids.index(name))
        assert image.shape == (40, 48, 3) and np.array_equal(mask, folder_label(k))
    data = build_data(_cfg(folder_root, "split='1_4'"))
    assert len(data.labeled) == 2  # round(6 / 4) of the 6 masked images
    assert set(data.labeled) <= set(np.flatnonzero(train.has_label()))
    assert set(data.unlabeled) == set(range(len(train))) - set(data.labeled)
    full = build_data(_cfg(folder_root, "split=full"))
    assert [train.ids[i] for i in full.labeled] == FOLDER_LABELED
    assert [train.ids[i] for i in full.unlabeled] == FOLDER_UNLABELED


def test_labeled_list_and_image_labels(folder_root, tmp_path, monkeypatch):
    listed = tmp_path / "labeled.txt"
    listed.write_text(f"{FOLDER_LABELED[1]}\nimages/train/{FOLDER_LABELED[4]}.png\n")
    data = build_data(_cfg(folder_root, f"split.labeled_list={listed}"))
    assert [data.train.ids[i] for i in data.labeled] == [FOLDER_LABELED[1], FOLDER_LABELED[4]]
    listed.write_text(f"{FOLDER_UNLABELED[0]}\n")
    with pytest.raises(DataError, match="no mask in masks/train"):
        build_data(_cfg(folder_root, f"split.labeled_list={listed}"))
    # weakly-supervised: image-level labels from the masks; images without one cannot have them
    monkeypatch.setenv("DCC_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataError, match="3 training images have no mask"):
        build_data(_cfg(folder_root, "loss=weakly"))
    for name in FOLDER_UNLABELED:
        (folder_root / "images/train" / f"{name}.png").unlink(missing_ok=True)
        (folder_root / "images/train" / f"{name}.jpg").unlink(missing_ok=True)
    data = build_data(_cfg(folder_root, "loss=weakly"))
    expected = [sorted(set(np.unique(folder_label(k)).tolist()) - {0, 255}) for k in range(len(FOLDER_LABELED))]
    assert [np.flatnonzero(row).tolist() for row in data.image_labels] == [[c - 1 for c in e] for e in expected]


def test_wrong_root_and_bad_files_fail_naming_the_culprit(folder_root, tmp_path):
    with pytest.raises(ConfigError, match=r"folder: missing .*absent/classes.txt(.|\n)*masks/val/<name>.png"):
        validate(_cfg(tmp_path / "absent"))
    with pytest.raises(LayoutError, match="names 4 classes but dataset.num_classes=5"):
        build_data(_cfg(folder_root, "dataset.num_classes=5", "dataset.class_names=[]"))
    orphan = folder_root / "masks/train/ghost.png"
    Image.fromarray(folder_label(0)).save(orphan)
    with pytest.raises(DataError, match=rf"{orphan}: mask without an image"):
        build_data(_cfg(folder_root))
    orphan.unlink()
    (folder_root / "masks/val" / f"{FOLDER_VAL[1]}.png").unlink()
    with pytest.raises(LayoutError, match=rf"1 validation images have no mask .*{FOLDER_VAL[1]}.png"):
        build_data(_cfg(folder_root))
    (folder_root / "classes.txt").write_text("background\n\ncar\n")
    with pytest.raises(ConfigError, match=r"classes.txt:2: empty line"):
        validate(_cfg(folder_root))
    (folder_root / "classes.txt").write_text("background\ncar (parked)\n")
    with pytest.raises(ConfigError, match=r"class name 'car \(parked\)' may only hold"):
        validate(_cfg(folder_root))


def test_check_command_reports_counts_unlabeled_images_and_errors(folder_root, capsys):
    assert check_main(["--quiet", "dataset=folder", f"dataset.root={folder_root}"]) == 0
    out = capsys.readouterr().out
    assert "train: 9 images, 6 labels, 0 problems" in out and "val: 3 images, 3 labels, 0 problems" in out
    assert "train: 3 images without a label, used as unlabeled images only" in out
    assert "split 1_8: 1 labeled, 8 unlabeled" in out and "no problems found" in out
    hist = sum(np.bincount(folder_label(k).ravel(), minlength=256) for k in range(len(FOLDER_LABELED)))
    row = next(line for line in out.splitlines() if " tree top " in line)
    assert row.split()[3] == str(hist[2])  # "  2 tree top <count> <share>%"
    # a mask without its image, an out-of-range value and an unreadable image, all at once
    Image.fromarray(folder_label(0)).save(folder_root / "masks/train/ghost.png")
    bad = folder_label(1)
    bad[0, :3] = 7
    Image.fromarray(bad).save(folder_root / "masks/val" / f"{FOLDER_VAL[0]}.png")
    broken = next((folder_root / "images/train").glob(f"{FOLDER_UNLABELED[0]}.*"))
    broken.write_bytes(b"not a png")
    assert check_main(["--quiet", "dataset=folder", f"dataset.root={folder_root}"]) == 1
    out = capsys.readouterr().out
    assert "3 problems:" in out
    assert f"{folder_root / 'masks/train/ghost.png'}: mask without an image" in out
    assert f"{folder_root / 'masks/val' / FOLDER_VAL[0]}.png: label values outside the class range (3 pixels with values 7" in out
    assert f"{broken}: cannot read image" in out


def test_check_command_on_a_wrong_root_prints_the_layout(tmp_path, capsys):
    assert check_main(["--quiet", "dataset=folder", f"dataset.root={tmp_path / 'absent'}"]) == 1
    out = capsys.readouterr().out
    assert "folder: missing" in out and "images/train/<name>.jpg|png" in out


def test_palette_file_colours_predictions(folder_root, tmp_path):
    from dcc.engine.visualize import dataset_palette, palette

    assert read_palette(folder_root).tolist() == [list(c) for c in FOLDER_PALETTE]
    pal = dataset_palette(_cfg(folder_root).dataset)
    assert pal[:4].tolist() == [list(c) for c in FOLDER_PALETTE] and np.array_equal(pal[4:], palette()[4:])
    (folder_root / "palette.txt").unlink()
    assert np.array_equal(dataset_palette(_cfg(folder_root).dataset), palette())


@pytest.mark.slow
def test_two_training_steps_log_per_class_iou_under_the_class_names(folder_root, tmp_path):
    from dcc.engine.job import run

    db = tmp_path / "mlflow.db"
    overrides = [o for o in TINY_REAL if not o.startswith("logger")] + [
        f"logger.tracking_uri=sqlite:///{db}", f"trainer.runs_root={tmp_path / 'runs'}", "split='1_4'"]
    miou = run(_cfg(folder_root, *overrides), launch_dir=tmp_path)
    assert 0.0 <= miou <= 100.0  # in %
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    (r,) = client.search_runs([client.get_experiment_by_name("folder-mydata").experiment_id])
    assert r.info.status == "FINISHED" and r.data.params["dataset/num_classes"] == "4"
    logged = {k for k in r.data.metrics if k.startswith("val/iou/")}
    assert logged and logged <= {f"val/iou/{c}" for c in FOLDER_CLASSES}
    assert "val/iou/tree top" in logged  # bands of every class are in the validation masks
    assert r.data.params["split_manifest/num_labeled"] == "2" and r.data.params["split_manifest/num_unlabeled"] == "7"


def test_optional_test_split_needs_a_mask_for_every_image(folder_root):
    assert build_data(_cfg(folder_root)).test is None  # no images/test: no test split
    (folder_root / "images" / "test").mkdir()
    (folder_root / "masks" / "test").mkdir()
    for name in FOLDER_VAL:  # the validation files, copied as test images
        (folder_root / "images" / "test" / f"t_{name}.png").write_bytes(
            next((folder_root / "images" / "val").glob(f"{name}.*")).read_bytes())
        (folder_root / "masks" / "test" / f"t_{name}.png").write_bytes((folder_root / "masks" / "val" / f"{name}.png").read_bytes())
    data = build_data(_cfg(folder_root))
    assert data.test is not None and data.test.ids == [f"t_{n}" for n in FOLDER_VAL]
    np.testing.assert_array_equal(data.test.load(0)[1], data.val.load(0)[1])
    (folder_root / "masks" / "test" / f"t_{FOLDER_VAL[0]}.png").unlink()
    with pytest.raises(LayoutError, match="1 test images have no mask"):
        build_data(_cfg(folder_root))
