"""Segmentation heads of the authors' code: DeepLabv3+ (ASPP + decoder) and PSPNet (pyramid pooling).

Both map backbone features ``(low, high)`` to one feature map that the classifier and the projector
share: DeepLabv3+ 256-d at stride 4, PSPNet 512-d at the backbone stride (8). Every bilinear resize
(ASPP image pooling, decoder upsampling, PSP pooled branches) uses ``align_corners`` (config key
``segnet.align_corners``; the authors' code: True).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu(cin: int, cout: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three 3x3 atrous branches and image pooling, fused by 1x1."""

    def __init__(self, cin: int, cout: int, rates: Sequence[int], dropout: float, align_corners: bool = True) -> None:
        super().__init__()
        self.align_corners = align_corners
        self.branches = nn.ModuleList(
            [conv_bn_relu(cin, cout, 1)] + [conv_bn_relu(cin, cout, 3, dilation=r) for r in rates]
        )
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_bn_relu(cin, cout, 1))
        self.project = nn.Sequential(
            conv_bn_relu(cout * (len(rates) + 2), cout, 1), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.interpolate(self.image_pool(x), size=x.shape[-2:], mode="bilinear", align_corners=self.align_corners)
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


class DeepLabV3PlusHead(nn.Module):
    """ASPP on the last stage, 48-d low-level projection, two 3x3 convs: output at stride 4."""

    def __init__(
        self,
        low_channels: int,
        high_channels: int,
        *,
        channels: int = 256,
        rates: Sequence[int] = (6, 12, 18),
        low_level_channels: int = 48,
        dropout: float = 0.5,
        align_corners: bool = True,
    ) -> None:
        super().__init__()
        self.align_corners = align_corners
        self.aspp = ASPP(high_channels, channels, rates, dropout, align_corners)
        self.low_proj = conv_bn_relu(low_channels, low_level_channels, 1)
        self.fuse = nn.Sequential(
            conv_bn_relu(channels + low_level_channels, channels, 3),
            nn.Dropout(dropout),
            conv_bn_relu(channels, channels, 3),
        )
        self.out_channels = channels
        self.stride = 4

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        x = self.aspp(high)
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=self.align_corners)
        return self.fuse(torch.cat([x, self.low_proj(low)], dim=1))


class PSPHead(nn.Module):
    """Pyramid pooling (bins 1/2/3/6, each 1x1 to C/4) concatenated with the input, then 3x3 to 512."""

    def __init__(
        self, high_channels: int, *, channels: int = 512, bins: Sequence[int] = (1, 2, 3, 6), stride: int = 8,
        dropout: float = 0.0, align_corners: bool = True,
    ) -> None:
        super().__init__()
        self.align_corners = align_corners
        branch = high_channels // len(bins)
        self.stages = nn.ModuleList(
            [nn.Sequential(nn.AdaptiveAvgPool2d(b), conv_bn_relu(high_channels, branch, 1)) for b in bins]
        )
        self.bottleneck = nn.Sequential(
            conv_bn_relu(high_channels + branch * len(bins), channels, 3), nn.Dropout(dropout)
        )
        self.out_channels = channels
        self.stride = stride

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        size = high.shape[-2:]
        pooled = [
            F.interpolate(stage(high), size=size, mode="bilinear", align_corners=self.align_corners)
            for stage in self.stages
        ]
        return self.bottleneck(torch.cat([high, *pooled], dim=1))
