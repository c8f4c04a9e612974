"""The weakly-supervised setting (Table 5): image-level labels, C_w and its loss (Eq. 10-11), weak mAP, VGG-16."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from torch import nn

from dcc.engine.job import run
from dcc.config import ConfigError, ImageLabelSource, validate
from dcc.data.build import build_data, unlabeled_loader
from dcc.data.files import DataError
from dcc.data.image_labels import labels_from_masks, voc_image_labels
from dcc.data.voc import CLASSES
from dcc.method.losses import weak_classification_loss
from dcc.engine.metrics import mean_average_precision, present_classes
from dcc.method.models import build_model
from dcc.method.models.backbone import Backbone
from tests.conftest import compose_cfg
from tests.realdata import TINY_REAL, VOC_EXTRA, VOC_FINE, make_voc, voc_label


def _expected(label: np.ndarray) -> np.ndarray:
    out = np.zeros(20, np.float32)
    for c in np.unique(label):
        if 0 < c < 21:
            out[c - 1] = 1
    return out


@pytest.fixture
def voc_root(tmp_path, monkeypatch):
    monkeypatch.setenv("DCC_CACHE", str(tmp_path / "cache"))
    return make_voc(tmp_path / "voc")


def test_voc_image_labels_from_augmented_masks_including_background_only_image(voc_root):
    base = voc_root / "VOCdevkit" / "VOC2012"
    empty = np.zeros((40, 48), np.uint8)
    empty[::7] = 255  # background and ignore only
    Image.fromarray(empty).save(base / "SegmentationClassAug" / f"{VOC_EXTRA[0]}.png")
    ids = sorted(VOC_FINE + VOC_EXTRA)
    labels = voc_image_labels(base, ids, ImageLabelSource.masks, CLASSES)
    order = VOC_FINE + VOC_EXTRA  # make_voc's index k of each id
    for row, image_id in zip(labels, ids):
        want = np.zeros(20, np.float32) if image_id == VOC_EXTRA[0] else _expected(voc_label(order.index(image_id)))
        np.testing.assert_array_equal(row, want, err_msg=image_id)
    # cached: a second call reads the .npy even when the masks are gone
    (base / "SegmentationClassAug" / f"{VOC_EXTRA[1]}.png").unlink()
    np.testing.assert_array_equal(voc_image_labels(base, ids, ImageLabelSource.masks, CLASSES), labels)


def test_voc_image_labels_from_xml_annotations(voc_root):
    base = voc_root / "VOCdevkit" / "VOC2012"
    (base / "Annotations").mkdir()
    objects = {VOC_FINE[0]: ["person", "horse", "person"], VOC_FINE[1]: []}
    for image_id, names in objects.items():
        body = "".join(f"<object><name>{n}</name><bndbox/></object>" for n in names)
        (base / "Annotations" / f"{image_id}.xml").write_text(f"<annotation>{body}</annotation>")
    labels = voc_image_labels(base, list(objects), ImageLabelSource.xml, CLASSES)
    want = np.zeros((2, 20), np.float32)
    want[0, [CLASSES.index("person") - 1, CLASSES.index("horse") - 1]] = 1
    np.testing.assert_array_equal(labels, want)
    (base / "Annotations" / f"{VOC_FINE[2]}.xml").write_text("<annotation><object><name>unicorn</name></object></annotation>")
    with pytest.raises(DataError, match="unicorn"):
        voc_image_labels(base, [VOC_FINE[2]], ImageLabelSource.xml, CLASSES)


def test_classic_protocol_unlabeled_images_get_image_labels_in_their_batches(voc_root):
    cfg = compose_cfg(["experiment=none", "dataset=voc", f"dataset.root={voc_root}", "dataset.protocol=classic", "split=full",
                       "loss=weakly"] + TINY_REAL)
    validate(cfg)
    data = build_data(cfg)
    assert data.image_labels is not None and data.image_labels.shape == (len(data.train), 20)
    # the 8 SBD-only images are unlabeled under classic, yet their image labels come from SegmentationClassAug
    assert len(data.unlabeled) == len(VOC_EXTRA)
    batch = next(iter(unlabeled_loader(cfg.dataset, cfg.trainer, data.train, data.unlabeled, stride=cfg.segnet.consistency_stride,
                                       context=cfg.loss.context, start_step=0, device=torch.device("cpu"),
                                       image_labels=data.image_labels)))
    order = VOC_FINE + VOC_EXTRA
    for index, row in zip(batch["index"].tolist(), batch["image_labels"]):
        np.testing.assert_array_equal(row.numpy(), _expected(voc_label(order.index(data.train.ids[index]))))


def test_digit_image_labels_are_the_digits_in_each_scene():
    masks = np.zeros((3, 8, 8), np.uint8)
    masks[0, :2, :2] = 3  # digit 2
    masks[0, 5:, 5:] = 10  # digit 9
    masks[1, 0, 0] = 255
    masks[2] = 1
    labels = labels_from_masks(masks, 11)
    want = np.zeros((3, 10), np.float32)
    want[0, [2, 9]] = 1
    want[2, 0] = 1
    np.testing.assert_array_equal(labels, want)
    np.testing.assert_array_equal(present_classes(torch.from_numpy(masks), 11).numpy(), want)


def test_weak_loss_is_mean_binary_cross_entropy_over_classes_and_both_views():
    logits1 = torch.tensor([[0.0, 2.0], [-1.0, 0.5]])
    logits2 = torch.tensor([[1.0, -3.0], [0.0, 0.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # second image: no foreground class at all

    def bce(z, y):
        return -(y * math.log(1 / (1 + math.exp(-z))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-z))))

    per_view = [
        sum(bce(float(z), float(y)) for z, y in zip(lg.flatten(), targets.flatten())) / 4 for lg in (logits1, logits2)
    ]
    assert float(weak_classification_loss(logits1, logits2, targets)) == pytest.approx(0.5 * sum(per_view), rel=1e-6)


def test_weak_classifier_is_global_pooling_then_linear_and_gets_gradient(tiny_overrides):
    cfg = compose_cfg(tiny_overrides + ["loss=weakly"])
    model = build_model(cfg)
    assert isinstance(model.weak_classifier, nn.Linear) and model.weak_classifier.out_features == 10
    feats = model.features(torch.randn(2, 3, 32, 32))
    logits = model.weak_logits(feats)
    manual = feats.mean((2, 3)) @ model.weak_classifier.weight.T + model.weak_classifier.bias
    torch.testing.assert_close(logits, manual)
    weak_classification_loss(logits[:1], logits[1:], torch.ones(1, 10)).backward()
    assert model.weak_classifier.weight.grad.abs().sum() > 0
    assert next(model.backbone.parameters()).grad is not None  # L_w also trains the encoder
    assert build_model(compose_cfg(tiny_overrides)).weak_classifier is None


def test_mean_average_precision_on_known_scores():
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0]])
    scores = np.array([[0.9, 0.1, 0.5], [0.8, 0.7, 0.2], [0.3, 0.6, 0.1]])
    # class 0: ranking 0.9(+) 0.8(-) 0.3(+) -> AP = (1 + 2/3) / 2; class 1: 0.7(+) 0.6(+) 0.1(-) -> AP 1;
    # class 2 has no positive and is left out
    assert mean_average_precision(scores, targets) == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2)
    assert math.isnan(mean_average_precision(scores, np.zeros_like(targets)))


def test_config_rejects_weak_without_image_labels_or_on_cityscapes(tiny_overrides):
    with pytest.raises(ConfigError, match="dataset.image_labels=true"):
        validate(compose_cfg(tiny_overrides + ["loss=weakly", "dataset.image_labels=false"]))
    with pytest.raises(ConfigError, match="cityscapes has no image-level labels"):
        validate(compose_cfg(["experiment=none", "dataset=cityscapes", "loss=weakly"]))
    with pytest.raises(ConfigError, match="xml"):
        validate(compose_cfg(tiny_overrides + ["loss=weakly", "dataset.image_label_source=xml"]))
    with pytest.raises(ConfigError, match="loss.method=cac"):
        validate(compose_cfg(tiny_overrides + ["loss=suponly", "loss.weak=true"]))
    with pytest.raises(ConfigError, match="weak_weight"):
        validate(compose_cfg(tiny_overrides + ["loss=weakly", "loss.weak_weight=-1"]))
    assert compose_cfg(tiny_overrides + ["loss=weakly"]).dataset.image_labels is True  # follows loss.weak


@pytest.mark.parametrize("output_stride", [8, 16])
def test_vgg16_dilated_to_the_output_stride_keeps_imagenet_weights(tmp_path, output_stride):
    backbone = Backbone("vgg16", output_stride=output_stride)
    low, high = backbone(torch.randn(1, 3, 64, 64))
    assert backbone.output_stride == output_stride and backbone.low_channels == 256 and backbone.high_channels == 512
    assert low.shape[-2:] == (16, 16) and high.shape[-2:] == (64 // output_stride,) * 2
    convs = [m for m in backbone.body.modules() if isinstance(m, nn.Conv2d)]
    pools = [m for m in backbone.body.modules() if isinstance(m, nn.MaxPool2d)]
    assert [p.stride for p in pools] == [2, 2, 2] + ([1, 1] if output_stride == 8 else [2, 1])
    assert [c.dilation[0] for c in convs[-3:]] == ([2, 2, 2] if output_stride == 8 else [1, 1, 1])
    # torchvision-format ImageNet weights (features.N.*, classifier.*) load into the flattened timm modules
    state = {k.replace("features_", "features.", 1): torch.randn_like(v) for k, v in backbone.body.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(4, 4)
    torch.save(state, tmp_path / "vgg16.pth")
    loaded = Backbone("vgg16", output_stride=output_stride, weights=str(tmp_path / "vgg16.pth"))
    assert loaded.weights_report["missing"] == [] and loaded.weights_report["unexpected"] == ["classifier.0.weight"]
    torch.testing.assert_close(loaded.body.features_28.weight, state["features.28.weight"])


@pytest.mark.parametrize("segnet", ["deeplabv3plus", "pspnet"])
def test_vgg16_feeds_both_heads_at_stride_8(tiny_overrides, segnet):
    over = tiny_overrides + ["backbone=vgg16", f"segnet={segnet}", "segnet.output_stride=8", "segnet.multi_grid=[1,1,1]"]
    if segnet == "pspnet":
        over += ["segnet.channels=32"]
    cfg = compose_cfg(over)
    validate(cfg)
    model = build_model(cfg)
    x = torch.randn(2, 3, 32, 32)
    feats = model.features(x)
    assert feats.shape[-1] == 32 // (4 if segnet == "deeplabv3plus" else 8)
    assert model(x).shape == (2, 11, 32, 32)


def test_few_step_weakly_run_logs_weak_loss_and_map(tiny_overrides, tmp_path):
    miou = run(compose_cfg(tiny_overrides + ["loss=weakly"]), launch_dir=tmp_path)
    assert 0.0 <= miou <= 100.0  # in %
    uri = next(o.split("=", 1)[1] for o in tiny_overrides if o.startswith("logger.tracking_uri="))
    client = MlflowClient(tracking_uri=uri)
    (r,) = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert r.info.status == "FINISHED" and r.data.tags["loss"] == "weakly"
    assert r.data.params["loss/weak"] == "True" and r.data.params["loss/weak_weight"] == "0.4"
    # L_w joins at loss.start_step with the unlabeled branch (start_step=2: logged at steps 3, 4, 6)
    assert [m.step for m in client.get_metric_history(r.info.run_id, "train/loss_w")] == [3, 4, 6]
    weak_map = client.get_metric_history(r.info.run_id, "val/weak_map")
    assert [m.step for m in weak_map] == [3, 6] and all(0.0 <= m.value <= 100.0 for m in weak_map)  # in %
