"""task=predict: palette PNG masks from a checkpoint over a folder or the validation set."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dcc.engine.checkpoint import save_atomic
from dcc.config import ConfigError, validate
from dcc.engine.evaluate import predict_whole
from dcc.method.models import build_model
from dcc.engine.predict import run_predict
from dcc.engine.visualize import palette
from tests.conftest import compose_cfg
from tests.realdata import VOC_VAL, make_voc

SMALL = ["backbone=resnet18", "segnet.channels=32", "segnet.low_level_channels=16", "experiment=none", "dataset=voc"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(compose_cfg(SMALL))
    path = tmp_path_factory.mktemp("ckpt") / "last.pt"
    save_atomic({"model": model.state_dict(), "step": 3}, path)
    return path, model.eval()


def test_folder_predictions_are_palette_pngs_of_the_model_argmax(checkpoint, tmp_path):
    path, model = checkpoint
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    images = {"a": np.random.default_rng(1).integers(0, 256, (37, 50, 3), np.uint8),
              "sub/b": np.random.default_rng(2).integers(0, 256, (24, 24, 3), np.uint8)}
    for name, image in images.items():
        Image.fromarray(image).save(folder / f"{name}.png")
    (folder / "notes.txt").write_text("not an image")
    cfg = compose_cfg(SMALL + ["task=predict", f"predict.checkpoint={path}", f"predict.input={folder}",
                               "predict.output=masks", "trainer.device=cpu"])
    validate(cfg)
    written = run_predict(cfg, launch_dir=tmp_path)
    assert sorted(p.relative_to(tmp_path / "masks").as_posix() for p in written) == ["a.png", "sub/b.png"]
    mean, std = torch.tensor(cfg.dataset.mean).view(1, 3, 1, 1), torch.tensor(cfg.dataset.std).view(1, 3, 1, 1)
    for name, image in images.items():
        im = Image.open(tmp_path / "masks" / f"{name}.png")
        assert im.mode == "P" and im.size == (image.shape[1], image.shape[0])
        assert np.array_equal(np.asarray(im.getpalette()[:63]).reshape(21, 3), palette()[:21])
        x = (torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255 - mean) / std
        with torch.no_grad():
            expected = predict_whole(model, x).argmax(1)[0].numpy()
        assert np.array_equal(np.asarray(im), expected)


def test_validation_set_predictions_are_named_by_id(checkpoint, tmp_path):
    path, _ = checkpoint
    root = make_voc(tmp_path / "voc")
    cfg = compose_cfg(SMALL + ["task=predict", f"predict.checkpoint={path}", f"dataset.root={root}",
                               f"predict.output={tmp_path / 'val_masks'}", "eval=slide", "eval.crop_size=32",
                               "eval.stride=16", "trainer.device=cpu"])
    written = run_predict(cfg, launch_dir=tmp_path / "elsewhere")
    assert sorted(p.name for p in written) == sorted(f"{i}.png" for i in VOC_VAL)
    assert all(Image.open(p).size == (48, 40) for p in written)


def test_predict_errors(checkpoint, tmp_path):
    path, _ = checkpoint
    with pytest.raises(ConfigError, match="predict.checkpoint=PATH"):
        validate(compose_cfg(SMALL + ["task=predict"]))
    wrong = compose_cfg(SMALL + ["task=predict", f"predict.checkpoint={path}", "dataset.num_classes=5",
                                 f"predict.input={tmp_path}", "dataset.class_names=[]"])
    with pytest.raises(RuntimeError, match=rf"{path} does not fit the configured model .*num_classes=5"):
        run_predict(wrong, launch_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="predict.checkpoint: no such file"):
        run_predict(compose_cfg(SMALL + [f"predict.checkpoint={tmp_path / 'nope.pt'}"]), launch_dir=tmp_path)


@pytest.mark.parametrize("config_loss", ["suponly", "ablation_viii"])
def test_training_only_heads_need_not_match(tmp_path, config_loss):
    """A weakly run's checkpoint (projector and C_w) predicts under a config without C_w or without any
    auxiliary head: the segmentation weights are what counts, and they are loaded exactly."""
    torch.manual_seed(0)
    model = build_model(compose_cfg(SMALL + ["loss=weakly"]))
    path = tmp_path / "last.pt"
    save_atomic({"model": model.state_dict()}, path)
    cfg = compose_cfg(SMALL + [f"loss={config_loss}", "trainer.device=cpu"])
    from dcc.engine.predict import load_model

    loaded = load_model(cfg, path, torch.device("cpu"))
    assert loaded.weak_classifier is None
    for key, value in loaded.state_dict().items():
        if not key.startswith("projector."):
            torch.testing.assert_close(value, model.state_dict()[key], msg=key)
