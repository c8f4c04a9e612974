"""Model construction from the ``segnet`` / ``backbone`` / ``loss`` config groups."""

from __future__ import annotations

from dcc.config import Config, Method, SegNetName, choice, plain
from dcc.method.models.backbone import Backbone, build_backbone
from dcc.method.models.weights import WeightsError, load_local_weights
from dcc.method.models.heads import DeepLabV3PlusHead, PSPHead
from dcc.method.models.segmentor import Projector, Segmentor

__all__ = ["Backbone", "Segmentor", "Projector", "WeightsError", "build_model", "load_local_weights"]


def build_model(cfg: Config, *, backbone_weights: str | None = None) -> Segmentor:
    """The segmentor of ``cfg`` (its segnet, backbone, loss and dataset groups); ``backbone_weights`` (a local file) replaces ``backbone.weights`` when given
    (training passes the embedded benchmark's pretrained backbone, :mod:`dcc.data.digits_pretrain`)."""
    seg, bb = cfg.segnet, cfg.backbone
    name = choice(seg.name, SegNetName)
    backbone = build_backbone(
        bb.name,
        output_stride=seg.output_stride,
        multi_grid=list(seg.multi_grid),
        weights=backbone_weights or bb.weights,
        pretrained=bb.pretrained,
        allow_download=bb.allow_download,
        kwargs=plain(bb.kwargs),
        vit_blocks=list(bb.get("vit_blocks") or []),
    )
    if name is SegNetName.deeplabv3plus:
        head = DeepLabV3PlusHead(
            backbone.low_channels,
            backbone.high_channels,
            channels=seg.channels,
            rates=list(seg.aspp_rates),
            low_level_channels=seg.low_level_channels,
            dropout=seg.dropout,
            align_corners=seg.align_corners,
        )
    else:
        head = PSPHead(
            backbone.high_channels, channels=seg.channels, bins=list(seg.bins), stride=backbone.output_stride,
            dropout=seg.dropout, align_corners=seg.align_corners,
        )
    uses_projector = choice(cfg.loss.method, Method) is Method.cac and cfg.loss.proj
    return Segmentor(
        backbone,
        head,
        cfg.dataset.num_classes,
        classifier_dropout=seg.classifier_dropout,
        proj_dim=cfg.loss.proj_dim if uses_projector else None,
        consistency_stride=seg.consistency_stride,
        weak_classes=cfg.dataset.num_classes - 1 if cfg.loss.get("weak") else 0,  # C_w over the foreground classes
        align_corners=seg.align_corners,
    )
