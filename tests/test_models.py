"""Segmentation networks: shapes and strides, projector, parameter groups, local weight loading, summary."""

from __future__ import annotations

import os

import timm
import torch

import pytest

from dcc.engine.job import summary
from dcc.method.models import WeightsError, build_model, load_local_weights
from tests.conftest import compose_cfg

SMALL = ["backbone=resnet18", "segnet.channels=32", "segnet.low_level_channels=16"]


@pytest.mark.parametrize("segnet, feat_stride", [("deeplabv3plus", 4), ("pspnet", 8)])
def test_outputs_and_consistency_features(segnet, feat_stride):
    cfg = compose_cfg(SMALL + [f"segnet={segnet}", "segnet.channels=32"])
    model = build_model(cfg).eval()
    x = torch.randn(2, 3, 64, 64)
    feats = model.features(x)
    assert feats.shape == (2, 32, 64 // feat_stride, 64 // feat_stride)
    assert model(x).shape == (2, 11, 64, 64)
    phi, logits = model.consistency_outputs(feats)
    assert phi.shape == (2, cfg.loss.proj_dim, 8, 8) and logits.shape == (2, 11, 8, 8)
    assert torch.allclose(phi.norm(dim=1), torch.ones(2, 8, 8), atol=1e-5)  # L2-normalised
    assert not logits.requires_grad  # pseudo-labels carry no gradient
    # the logits are the classifier on the stride-8 features, without dropout
    pooled = torch.nn.functional.avg_pool2d(feats, 8 // feat_stride) if feat_stride < 8 else feats
    assert torch.allclose(logits, model.classifier(pooled), atol=1e-5)


def test_deeplab_backbone_stride_and_multi_grid():
    cfg = compose_cfg(["backbone=resnet50", "segnet.channels=32", "segnet.multi_grid=[1,2,4]",
                       "segnet.output_stride=16"])  # the paper's stride (the digits preset picks 8)
    model = build_model(cfg)
    assert model.backbone.output_stride == 16
    dil = [block.conv2.dilation[0] for block in model.backbone.body.layer4]
    assert dil == [2, 4, 8]  # layer4 dilation 2 x multi-grid (1, 2, 4)
    low, high = model.backbone(torch.randn(1, 3, 64, 64))
    assert low.shape[1:] == (256, 16, 16) and high.shape[1:] == (2048, 4, 4)


def test_projector_only_with_cac_and_proj():
    assert build_model(compose_cfg(SMALL)).projector is not None
    assert build_model(compose_cfg(SMALL + ["loss=ablation_vii"])).projector is None
    assert build_model(compose_cfg(SMALL + ["loss=suponly"])).projector is None
    counts = build_model(compose_cfg(SMALL)).param_counts()
    assert counts["projector"] == (32 * 32 + 32) + (32 * 128 + 128)


def test_param_groups_split_backbone_from_the_rest():
    model = build_model(compose_cfg(SMALL))
    backbone, rest = model.param_groups()
    assert sum(p.numel() for p in backbone) == sum(p.numel() for p in model.backbone.parameters())
    assert len(backbone) + len(rest) == len(list(model.parameters()))


def test_summary_line_matches_the_model():
    cfg = compose_cfg(["task=summary", "segnet=pspnet", "backbone=resnet50"])
    counts = build_model(cfg).param_counts()
    assert summary(cfg) == f"params: total={counts['total']} backbone={counts['backbone']} projector={counts['projector']}"
    assert counts["backbone"] == sum(p.numel() for p in timm.create_model("resnet50", features_only=True).parameters())


def test_local_weights_torchvision_format(tmp_path):
    """An ImageNet classifier checkpoint (wrapped, with a DDP prefix) loads into the features_only backbone."""
    source = timm.create_model("resnet18", num_classes=1000)
    state = {"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}
    path = tmp_path / "r18.pth"
    torch.save(state, path)
    cfg = compose_cfg(SMALL + [f"backbone.weights={path}"])
    model = build_model(cfg)
    assert torch.equal(model.backbone.body.conv1.weight, source.conv1.weight)
    report = model.backbone.weights_report
    assert report["missing"] == [] and sorted(report["unexpected"]) == ["fc.bias", "fc.weight"]


def test_local_weights_errors(tmp_path):
    body = timm.create_model("resnet18", features_only=True)
    with pytest.raises(WeightsError, match="no such file"):
        load_local_weights(body, tmp_path / "missing.pth")
    wrong = tmp_path / "wrong.pth"
    torch.save(timm.create_model("resnet50").state_dict(), wrong)
    with pytest.raises(WeightsError, match="shape mismatch"):
        load_local_weights(body, wrong)
    unrelated = tmp_path / "unrelated.pth"
    torch.save({"foo.weight": torch.zeros(2)}, unrelated)
    with pytest.raises(WeightsError, match="none of its"):
        load_local_weights(body, unrelated)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read"):
        load_local_weights(body, corrupt)


def _bilinear_calls(monkeypatch) -> list:
    """Patch F.interpolate to record the align_corners of every bilinear resize (then resize as asked)."""
    calls, original = [], torch.nn.functional.interpolate

    def spy(*args, **kwargs):
        if kwargs.get("mode") == "bilinear":
            calls.append(kwargs.get("align_corners"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "interpolate", spy)
    return calls


@pytest.mark.parametrize("segnet, resizes", [("deeplabv3plus", 3), ("pspnet", 5)])
@pytest.mark.parametrize("align", [True, False])
def test_every_bilinear_resize_follows_segnet_align_corners(monkeypatch, segnet, resizes, align):
    """ASPP pooling + decoder + logits (DeepLabv3+), four pooled bins + logits (PSPNet), in training, whole-image
    and sliding-window evaluation alike (prediction calls the same ``predict``)."""
    from dcc.engine.evaluate import predict

    model = build_model(compose_cfg(SMALL + [f"segnet={segnet}", f"segnet.align_corners={align}"])).eval()
    calls = _bilinear_calls(monkeypatch)
    x = torch.randn(1, 3, 40, 56)
    model(x)
    assert calls == [align] * resizes
    predict(model, x, mode="whole")
    predict(model, x, mode="slide", crop_size=32, stride=16)
    assert len(calls) > 2 * resizes and set(calls) == {align}


def test_align_corners_is_the_authors_by_default_and_changes_the_output():
    cfg = compose_cfg(SMALL)
    assert cfg.segnet.align_corners is True  # digits preset (the demo) and every paper preset
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        a = model(x)
        for m in model.modules():
            if hasattr(m, "align_corners"):
                m.align_corners = False
        b = model(x)
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["resnet10t", "vit_tiny_patch16_224"])
def test_pretrained_without_download_asks_the_hub_cache_only_for_that_call_and_names_the_backbone(monkeypatch, name):
    """backbone.pretrained=true without allow_download: timm's download runs with the hub's offline switch on
    (the module switch: the hub reads HF_HUB_OFFLINE only when imported), and nothing is left behind: not the
    switch, not the environment variable (which child processes would inherit)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    from dcc.method.models.backbone import build_backbone

    seen = []

    def create_model(*args, pretrained=False, **kwargs):
        seen.append((pretrained, constants.HF_HUB_OFFLINE))
        if pretrained:
            raise LocalEntryNotFoundError("not in the local cache")  # what the hub raises offline
        return real(*args, **kwargs)

    real = timm.create_model
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(timm, "create_model", create_model)
    with pytest.raises(WeightsError, match=f"timm could not load '{name}' weights from its local cache"):
        build_backbone(name, output_stride=32, pretrained=True)
    assert seen == [(True, True)] and constants.HF_HUB_OFFLINE is False and "HF_HUB_OFFLINE" not in os.environ
    build_backbone(name, output_stride=32, pretrained=False)  # no weights asked: the switch is left alone
    assert seen[-1] == (False, False)
