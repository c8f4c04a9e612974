"""Paper presets: every released hyperparameter, and parameter counts equal to a hand count of the authors' nets."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationResolutionError

from dcc.engine.job import summary
from dcc.config import validate
from tests.conftest import ROOT, compose_cfg

PRESETS = ["voc_deeplabv3plus_r50", "voc_deeplabv3plus_r101", "voc_pspnet_r50", "cityscapes_deeplabv3plus_r50",
           "voc_table5_r50_semi", "voc_table5_r50_weakly", "voc_table5_vgg16_semi", "voc_table5_vgg16_weakly"]


def conv(cin: int, cout: int, k: int = 1, bias: bool = False) -> int:
    return cin * cout * k * k + (cout if bias else 0)


def bn(c: int) -> int:
    return 2 * c  # weight and bias


def resnet(blocks: list[int], deep_stem: bool = False) -> int:
    """Bottleneck ResNet without its fc layer, from the architecture description."""
    if deep_stem:  # 3x3 convs 64-64-128
        total = conv(3, 64, 3) + bn(64) + conv(64, 64, 3) + bn(64) + conv(64, 128, 3) + bn(128)
        cin = 128
    else:  # 7x7 conv 64
        total = conv(3, 64, 7) + bn(64)
        cin = 64
    for width, n in zip((64, 128, 256, 512), blocks):
        for b in range(n):
            total += conv(cin, width) + bn(width) + conv(width, width, 3) + bn(width) + conv(width, 4 * width) + bn(4 * width)
            if b == 0:
                total += conv(cin, 4 * width) + bn(4 * width)  # downsample
            cin = 4 * width
    return total


def vgg16() -> int:
    """The 13 biased 3x3 convolutions of VGG-16 (no fully connected layers)."""
    widths = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    return sum(conv(cin, cout, 3, bias=True) for cin, cout in zip([3] + widths[:-1], widths))


def deeplabv3plus_head(high: int = 2048, low: int = 256) -> int:
    aspp = conv(high, 256) + bn(256) + 3 * (conv(high, 256, 3) + bn(256)) + conv(high, 256) + bn(256)  # + pooling
    aspp += conv(5 * 256, 256) + bn(256)
    decoder = conv(low, 48) + bn(48) + conv(304, 256, 3) + bn(256) + conv(256, 256, 3) + bn(256)
    return aspp + decoder


def psp_head() -> int:
    return 4 * (conv(2048, 512) + bn(512)) + conv(4096, 512, 3) + bn(512)


def projector(c: int) -> int:
    return conv(c, c, bias=True) + conv(c, 128, bias=True)


R50, R101 = [3, 4, 6, 3], [3, 4, 23, 3]
EXPECTED = {  # (backbone, head + classifier + projector)
    "voc_deeplabv3plus_r50": (resnet(R50), deeplabv3plus_head() + conv(256, 21, bias=True) + projector(256)),
    "voc_deeplabv3plus_r101": (resnet(R101), deeplabv3plus_head() + conv(256, 21, bias=True) + projector(256)),
    "voc_pspnet_r50": (resnet(R50, deep_stem=True), psp_head() + conv(512, 21, bias=True) + projector(512)),
    "cityscapes_deeplabv3plus_r50": (resnet(R50), deeplabv3plus_head() + conv(256, 19, bias=True) + projector(256)),
    "voc_table5_r50_semi": (resnet(R50), deeplabv3plus_head() + conv(256, 21, bias=True) + projector(256)),
    # + C_w: a linear layer from the pooled 256-d features to the 20 foreground classes
    "voc_table5_r50_weakly": (resnet(R50), deeplabv3plus_head() + conv(256, 21, bias=True) + projector(256) + 256 * 20 + 20),
    "voc_table5_vgg16_semi": (vgg16(), deeplabv3plus_head(512, 256) + conv(256, 21, bias=True) + projector(256)),
    "voc_table5_vgg16_weakly": (vgg16(), deeplabv3plus_head(512, 256) + conv(256, 21, bias=True) + projector(256)
                                + 256 * 20 + 20),
}


def test_hand_count_of_the_plain_resnets_matches_the_published_sizes():
    # torchvision: resnet50 25,557,032 and resnet101 44,549,160 parameters, of which the fc layer is 2,049,000;
    # vgg16 138,357,544, of which the three fully connected layers are 123,642,856
    assert resnet(R50) == 25_557_032 - 2_049_000 and resnet(R101) == 44_549_160 - 2_049_000
    assert vgg16() == 138_357_544 - 123_642_856


EXTENSIONS = ["voc_deeplabv3plus_dinov2_s"]  # our settings beyond the paper (tested below)
OURS = ["digits_cpu", "none"]  # the CPU demo (the default) and no preset (tests/test_presets.py)


def test_every_preset_is_listed():
    assert sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")) == sorted(PRESETS + EXTENSIONS + OURS)


@pytest.mark.parametrize("preset", PRESETS + EXTENSIONS + OURS)
def test_every_preset_says_its_name(preset):
    """``preset`` in --cfg job and MLflow params names the experiment a run started from (the paper's presets inherit
    from voc_deeplabv3plus_r50, so each must set its own)."""
    assert compose_cfg([f"experiment={preset}"]).preset == preset


def test_dinov2_preset_keeps_cac_and_takes_unimatch_v2_encoder_settings():
    import timm

    cfg = compose_cfg(["experiment=voc_deeplabv3plus_dinov2_s", "backbone.weights=null", "task=summary"])
    validate(cfg)
    for key, value in COMMON.items():
        if not key.startswith("optim.") and key != "eval.pad_multiple":
            assert _get(cfg, key) == value, key
    expected = {"backbone.name": "vit_small_patch14_dinov2", "dataset.crop_size": 592, "optim.name": "adamw",
                "optim.lr": 2e-4, "optim.backbone_lr_mult": 0.025, "optim.weight_decay": 0.01, "optim.poly_power": 0.9,
                "segnet.name": "deeplabv3plus", "segnet.output_stride": 16, "dataset.name": "voc", "eval.pad_multiple": 16}
    for key, value in expected.items():
        assert _get(cfg, key) == value, key
    assert cfg.optim.lr * cfg.optim.backbone_lr_mult == pytest.approx(5e-6)  # UniMatch V2's encoder lr
    assert cfg.dataset.crop_size // 16 * 14 == 518  # the ViT's input side, UniMatch V2's crop
    vit = sum(p.numel() for p in timm.create_model("vit_small_patch14_dinov2", num_classes=0).parameters())
    pyramid = (384 * 192 * 4 + 192) + 2 * 192 + (192 * 96 * 4 + 96)  # stride 4: two 2x2 transposed convs
    counts = dict(item.split("=") for item in summary(cfg).removeprefix("params: ").split())
    assert int(counts["backbone"]) == vit + pyramid
    assert int(counts["total"]) == vit + pyramid + deeplabv3plus_head(384, 96) + conv(256, 21, bias=True) + projector(256)


@pytest.mark.parametrize("preset", PRESETS)
def test_summary_reports_the_authors_parameter_counts(preset):
    cfg = compose_cfg([f"experiment={preset}", "backbone.weights=null", "task=summary"])
    validate(cfg)
    backbone, rest = EXPECTED[preset]
    counts = dict(item.split("=") for item in summary(cfg).removeprefix("params: ").split())
    assert int(counts["backbone"]) == backbone
    assert int(counts["total"]) == backbone + rest
    assert int(counts.get("weak_classifier", 0)) == (256 * 20 + 20 if preset.endswith("weakly") else 0)


COMMON = {
    "optim.name": "sgd", "optim.momentum": 0.9, "optim.weight_decay": 1e-4, "optim.backbone_lr_mult": 0.1,
    "optim.poly_power": 0.9, "trainer.max_steps": 92560, "trainer.batch_size": 8, "trainer.unlabeled_batch_size": 8,
    "trainer.eval_every": 1157, "trainer.seed": 42, "loss.weight": 0.1, "loss.temperature": 0.1,
    "loss.pos_threshold": 0.75, "loss.start_step": 5 * 1157, "loss.proj_dim": 128, "loss.method": "cac",
    "loss.preset": "ablation_viii", "dataset.labeled_scale": [0.5, 2.0], "dataset.unlabeled_scale": [0.8, 2.0],
    "dataset.iou_range": [0.1, 1.0], "dataset.unlabeled_color_jitter_p": 0.8, "dataset.unlabeled_grayscale_p": 0.2,
    "dataset.unlabeled_blur_p": 0.5, "dataset.blur_kernel": 5, "eval.mode": "whole", "eval.pad_multiple": 8,
    "segnet.consistency_stride": 8, "segnet.align_corners": True, "trainer.view_bn": "per_view",
}
SPECIFIC = {
    "voc_deeplabv3plus_r50": {"optim.lr": 0.01, "dataset.crop_size": 320, "dataset.base_size": 400,
                              "dataset.color_jitter_p": 0.0, "loss.selected_num": 12800, "loss.bank_steps": 1,
                              "segnet.output_stride": 16, "segnet.multi_grid": [1, 2, 4], "dataset.protocol": "aug",
                              "backbone.name": "resnet50"},
    "voc_deeplabv3plus_r101": {"optim.lr": 0.01, "dataset.crop_size": 320, "loss.bank_steps": 2,
                               "backbone.name": "resnet101", "dataset.protocol": "aug"},
    "voc_pspnet_r50": {"optim.lr": 0.01, "dataset.crop_size": 320, "segnet.output_stride": 8, "segnet.name": "pspnet",
                       "dataset.protocol": "classic", "split.name": "full", "segnet.bins": [1, 2, 3, 6],
                       "backbone.kwargs": {"stem_type": "deep", "stem_width": 64}},
    "voc_table5_r50_semi": {"dataset.protocol": "classic", "split.name": "full", "backbone.name": "resnet50",
                            "segnet.name": "deeplabv3plus", "segnet.output_stride": 16, "loss.weak": False,
                            "dataset.image_labels": False},
    "voc_table5_r50_weakly": {"dataset.protocol": "classic", "split.name": "full", "backbone.name": "resnet50",
                              "loss.preset": "weakly", "loss.weak": True, "loss.weak_weight": 0.4,
                              "dataset.image_labels": True, "dataset.image_label_source": "masks"},
    "voc_table5_vgg16_semi": {"dataset.protocol": "classic", "split.name": "full", "backbone.name": "vgg16",
                              "segnet.output_stride": 8, "segnet.aspp_rates": [12, 24, 36], "loss.weak": False},
    "voc_table5_vgg16_weakly": {"dataset.protocol": "classic", "split.name": "full", "backbone.name": "vgg16",
                                "segnet.output_stride": 8, "loss.preset": "weakly", "loss.weak": True,
                                "dataset.image_labels": True},
    "cityscapes_deeplabv3plus_r50": {"optim.lr": 0.1, "dataset.crop_size": 720, "dataset.base_size": 2048,
                                     "dataset.color_jitter_p": 1.0, "loss.selected_num": 64800, "loss.bank_steps": 0,
                                     "dataset.num_classes": 19},
}


def _get(cfg, key):
    """The value at ``key`` as plain Python (enums as their names, lists and dicts as containers)."""
    value = OmegaConf.select(cfg, key)
    if isinstance(value, Enum):
        return value.name
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_set_the_released_hyperparameters(preset):
    cfg = compose_cfg([f"experiment={preset}", "backbone.weights=null"])
    for key, value in {**COMMON, **SPECIFIC[preset]}.items():
        assert _get(cfg, key) == value, (preset, key)
    # the split of the command line wins over a preset's default split
    assert compose_cfg([f"experiment={preset}", "backbone.weights=null", "split='1_8'"]).split.name == "1_8"


def test_presets_require_the_imagenet_weights(monkeypatch):
    monkeypatch.delenv("DCC_RESNET50_WEIGHTS", raising=False)
    cfg = compose_cfg(["experiment=voc_deeplabv3plus_r50"])
    with pytest.raises(InterpolationResolutionError, match="DCC_RESNET50_WEIGHTS"):
        _ = cfg.backbone.weights
    monkeypatch.setenv("DCC_RESNET50_WEIGHTS", "/weights/resnet50.pth")
    assert compose_cfg(["experiment=voc_deeplabv3plus_r50"]).backbone.weights == str(Path("/weights/resnet50.pth"))
