"""timm backbones as multi-scale feature extractors, with local weight loading (nothing is downloaded).

:func:`build_backbone` picks the implementation: plain ViTs and the DINOv2 family go through
:mod:`dcc.method.models.vit` (a simple feature pyramid on the transformer's tokens), VGG is dilated
(:mod:`dcc.method.models.vgg`), every other timm model must build with ``features_only`` at the configured
``output_stride``. :func:`check_backbone` tries that on the meta device when the config is validated,
so that a backbone the project cannot use fails at start, naming the families that work.
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Any, Mapping, Sequence

import timm
import torch
from torch import nn

from dcc.method.models.vgg import dilate_vgg, is_vgg
from dcc.method.models.vit import ViTBackbone, is_vit
from dcc.method.models.weights import WeightsError, hub_offline, load_local_weights

log = logging.getLogger(__name__)

def _apply_multi_grid(model: nn.Module, multi_grid: Sequence[int], output_stride: int) -> None:
    """DeepLab multi-grid: the 3x3 convs of the last stage get dilation (32 / output_stride) x (1, 2, 4).

    ResNet family only (timm names the stage ``layer4``); other backbones are left as they are.
    """
    stage = getattr(model, "layer4", None)
    if stage is None or all(g == 1 for g in multi_grid):
        return
    for block, grid in zip(stage, multi_grid):
        conv = getattr(block, "conv2", None)
        if not isinstance(conv, nn.Conv2d) or conv.kernel_size != (3, 3):
            continue
        base = max(32 // output_stride, 1)
        conv.dilation = (base * grid, base * grid)
        conv.padding = (base * grid, base * grid)


class Backbone(nn.Module):
    """A timm model with ``features_only`` at a given output stride (VGG: dilated, see :mod:`dcc.method.models.vgg`).

    ``forward`` returns ``(low, high)``: the stride-4 features (for the DeepLabv3+ decoder) and the
    last stage's features at ``output_stride``.
    """

    def __init__(
        self,
        name: str,
        *,
        output_stride: int,
        multi_grid: Sequence[int] = (1, 1, 1),
        weights: str | None = None,
        pretrained: bool = False,
        allow_download: bool = False,
        kwargs: Mapping[str, Any] | None = None,
        vit_blocks: Sequence[int] = (),
    ) -> None:
        super().__init__()
        if vit_blocks:
            raise ValueError(f"backbone.vit_blocks={list(vit_blocks)} only applies to ViT backbones, not {name!r}")
        extra = dict(kwargs or {})
        vgg = is_vgg(name)
        if vgg:  # timm's VGG has no output_stride: stride-4 tap and the last map, dilated below
            extra.setdefault("out_indices", (2, 5))
        elif output_stride != 32:
            extra["output_stride"] = output_stride
        try:
            with hub_offline(pretrained and not allow_download):
                self.body = timm.create_model(name, features_only=True, pretrained=pretrained, **extra)
        except (RuntimeError, OSError) as exc:  # OSError: the hub's "not in the local cache"
            if pretrained:
                raise WeightsError(
                    f"backbone.pretrained=true: timm could not load {name!r} weights from its local cache "
                    f"({exc}); set backbone.weights=PATH to a local file, or backbone.allow_download=true"
                ) from exc
            raise
        _apply_multi_grid(self.body, multi_grid, output_stride)
        reached = dilate_vgg(self.body, output_stride) if vgg else None
        if weights:
            self.weights_report = load_local_weights(self.body, weights)
        reductions = self.body.feature_info.reduction()
        channels = self.body.feature_info.channels()
        low = [i for i, r in enumerate(reductions) if r == 4]
        self.low_index = low[0] if low else 0
        self.high_index = len(reductions) - 1
        self.low_stride = reductions[self.low_index]
        self.low_channels = channels[self.low_index]
        self.high_channels = channels[self.high_index]
        self.output_stride = reached or reductions[self.high_index]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.body(x)
        return feats[self.low_index], feats[self.high_index]


# Families verified to build with features_only at output stride 8 and 16 with a stride-4 level
# (tests/test_vit.py::test_backbone_families builds one model of each); the message of a rejected backbone.
WORKING_FAMILIES = (
    "ResNet / ResNeXt / ResNeSt / Res2Net (resnet50, resnext50_32x4d, resnest50d, res2net50_26w_4s), "
    "RegNet (regnety_016), ConvNeXt / ConvNeXt-V2 (convnext_tiny), EfficientNet / EfficientNet-V2 / MixNet / "
    "MobileNetV3 (efficientnet_b0, tf_efficientnetv2_s, mobilenetv3_large_100), Xception (xception65), "
    "NFNet (nfnet_f0), CSPNet (cspresnet50), RepVGG / MobileViT (repvgg_a2, mobilevit_s), VGG (vgg16, dilated), "
    "and plain ViTs / DeiT / DINOv2 through a feature pyramid (vit_small_patch16_224, deit_small_patch16_224, "
    "vit_small_patch14_dinov2, vit_small_patch14_reg4_dinov2)"
)


def build_backbone(name: str, **options: Any) -> nn.Module:
    """The backbone for timm model ``name``: :class:`dcc.method.models.vit.ViTBackbone` for plain ViTs and the DINOv2
    family, else :class:`Backbone`. Both return ``(low, high)`` features and expose ``low_stride``,
    ``low_channels``, ``high_channels``, ``output_stride`` and ``body`` (the pretrained part)."""
    if is_vit(name):
        return ViTBackbone(name, **options)
    return Backbone(name, **options)


def check_backbone(name: str, *, output_stride: int, segnet: str, kwargs: Mapping[str, Any] | None = None,
                   vit_blocks: Sequence[int] = ()) -> str | None:
    """None when ``name`` builds as a backbone for ``segnet`` at ``output_stride``, else the reason (one message
    naming the backbone and the families that work). Builds on the meta device: no memory, no weights."""
    return _check_cached(name, output_stride, segnet, json.dumps(dict(kwargs or {}), sort_keys=True, default=str),
                         tuple(vit_blocks))


@functools.lru_cache(maxsize=64)
def _check_cached(name: str, output_stride: int, segnet: str, kwargs_json: str, vit_blocks: tuple[int, ...]) -> str | None:
    works = f"Backbones that work: {WORKING_FAMILIES}."
    if not timm.is_model(name):
        return f"backbone.name={name!r} is not a timm model (see timm.list_models()). {works}"
    if vit_blocks and not is_vit(name):
        return f"backbone.vit_blocks={list(vit_blocks)} only applies to ViT backbones, not {name!r}"
    build = functools.partial(build_backbone, name, output_stride=output_stride, kwargs=json.loads(kwargs_json),
                              vit_blocks=list(vit_blocks))
    try:
        try:
            with torch.device("meta"):
                model = build()
        except NotImplementedError as exc:  # an operator without a meta kernel in this torch (seen: aten::_unique2
            if "meta" not in str(exc).lower():  # building RegNetX under torch 2.11): build it for real on the CPU
                raise
            model = build()
    except Exception as exc:  # noqa: BLE001 - any construction failure means the backbone is unusable
        return (f"backbone.name={name!r} cannot be used as a segmentation backbone at segnet.output_stride="
                f"{output_stride} ({type(exc).__name__}{': ' + str(exc).splitlines()[0][:200] if str(exc) else ''}). {works}")
    if model.output_stride != output_stride:
        return (f"backbone.name={name!r} reaches output stride {model.output_stride}, not segnet.output_stride="
                f"{output_stride}. {works}")
    if segnet == "deeplabv3plus" and model.low_stride != 4:
        return (f"backbone.name={name!r} has no stride-4 features for the DeepLabv3+ decoder (its first level is at "
                f"stride {model.low_stride}). {works}")
    return None
