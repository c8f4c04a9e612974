"""Plain ViTs and the DINOv2 family (timm) as DeepLabv3+ / PSPNet backbones, through a simple feature pyramid.

**Token grid.** A ViT has one token per ``patch x patch`` block of its input (16 for plain ViTs, 14 for
DINOv2). The image is first padded (bottom/right, zeros) to a multiple of the *token stride* ``t``
(16; 8 for patch sizes <= 8) and then resized by ``patch / t`` (DINOv2: 14/16 = 0.875; patch 16: no
resize), so that token ``(k, l)`` sees exactly the input pixels ``[t*k, t*k + t) x [t*l, t*l + t)``:
with bilinear resampling (``align_corners=False``) output pixel ``p`` samples input ``(p + 0.5) * t / patch
- 0.5``, and for ``p`` in ``[patch*k, patch*k + patch)`` this stays inside ``[t*k, t*k + t - 1]``. The
token grid is thus the exact stride-``t`` grid of the input, like a ResNet's stride-16 map, whatever
the patch size, and the position embeddings are interpolated to the grid by timm
(``dynamic_img_size=True``), so any input size works.

**Pyramid** (ViTDet's simple feature pyramid): from the token map at stride ``t``, stride ``t / 2^n`` by
``n`` 2x2 stride-2 transposed convolutions (channels halved each time; BN + GELU between them), and
stride ``t * 2^n`` by 2x2 max-pooling. A 2x2 stride-2 transposed convolution splits each cell into its
four children without overlap, so cell ``(i, j)`` of the stride-8 map covers pixels ``[8i, 8i + 8)`` and
is computed from the single token that contains them. The stride-4 level (DeepLabv3+'s low-level
features) comes from ``backbone.vit_blocks[0]``, the ``segnet.output_stride`` level (16 or 8; PSPNet: 8)
from the last entry (default: both from the last block, with the ViT's final norm).

**Consistency geometry.** The two unlabeled crops' offsets differ by multiples of 8, and the
consistency branch pairs their stride-8 cells (``dcc/method/overlap.py``). Each stride-8 cell is the
child of one token covering a 16x16 block that contains the cell's 8x8 pixels, so paired cells always
describe the same image pixels; when the offsets differ by a multiple of 16 the two tokens see the very
same pixels (the resampling is translation-equivariant on that grid). This is the geometry of a
ResNet at output stride 16 (``tests/test_vit.py`` checks it by receptive fields).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import timm
import torch
import torch.nn.functional as F
from torch import nn

from dcc.method.models.weights import WeightsError, hub_offline, load_local_weights

VIT_MODULES = ("vision_transformer", "deit")  # timm modules of the plain ViT class (DINOv2, DINO, DeiT, CLIP, ...)


def is_vit(name: str) -> bool:
    """Whether timm model ``name`` (pretrained tag allowed) is a plain ViT handled here."""
    from timm.models import get_arch_name, is_model_in_modules

    return timm.is_model(name) and is_model_in_modules(get_arch_name(name), list(VIT_MODULES))


def _resampler(dim: int, token_stride: int, stride: int) -> tuple[nn.Module, int]:
    """Module taking the token map (stride ``token_stride``, ``dim`` channels) to ``stride``, and its channels."""
    if stride == token_stride:
        return nn.Identity(), dim
    if stride > token_stride:
        return nn.Sequential(*[nn.MaxPool2d(2) for _ in range(int(math.log2(stride // token_stride)))]), dim
    layers: list[nn.Module] = []
    steps = int(math.log2(token_stride // stride))
    channels = dim
    for n in range(steps):
        layers.append(nn.ConvTranspose2d(channels, channels // 2, 2, stride=2))
        channels //= 2
        if n < steps - 1:
            layers += [nn.BatchNorm2d(channels), nn.GELU()]
    return nn.Sequential(*layers), channels


class ViTBackbone(nn.Module):
    """timm ViT + simple feature pyramid; ``forward(x)`` returns ``(low at stride 4, high at output_stride)``.

    ``body`` is the timm model (the pretrained part, trained at ``optim.backbone_lr_mult``); the pyramid
    layers are new and train with the head.
    """

    def __init__(
        self,
        name: str,
        *,
        output_stride: int,
        multi_grid: Sequence[int] = (1, 1, 1),  # noqa: ARG002 - a ResNet option, meaningless here
        weights: str | None = None,
        pretrained: bool = False,
        allow_download: bool = False,
        kwargs: Mapping[str, Any] | None = None,
        vit_blocks: Sequence[int] = (),
    ) -> None:
        super().__init__()
        extra = {"dynamic_img_size": True, **dict(kwargs or {}), "num_classes": 0}
        try:
            with hub_offline(pretrained and not allow_download):
                self.body = timm.create_model(name, pretrained=pretrained, **extra)
        except (RuntimeError, OSError) as exc:  # OSError: the hub's "not in the local cache"
            if pretrained:
                raise WeightsError(
                    f"backbone.pretrained=true: timm could not load {name!r} weights from its local cache "
                    f"({exc}); set backbone.weights=PATH to a local file, or backbone.allow_download=true"
                ) from exc
            raise
        ph, pw = self.body.patch_embed.patch_size
        if ph != pw:
            raise ValueError(f"{name}: non-square patches {ph}x{pw} are not supported")
        self.patch = ph
        self.token_stride = 8 if ph <= 8 else 16
        depth = len(self.body.blocks)
        blocks = list(vit_blocks) or [-1]
        if len(blocks) > 2 or not all(-depth <= b < depth for b in blocks):
            raise ValueError(f"backbone.vit_blocks={list(vit_blocks)}: one or two block indices in [-{depth}, {depth}) "
                             f"expected ({name} has {depth} blocks)")
        blocks = [b % depth for b in blocks]
        self.low_block, self.high_block = blocks[0], blocks[-1]
        dim = self.body.embed_dim
        self.pyramid_low, self.low_channels = _resampler(dim, self.token_stride, 4)
        self.pyramid_high, self.high_channels = _resampler(dim, self.token_stride, output_stride)
        self.low_stride = 4
        self.output_stride = output_stride
        if weights:
            from timm.models.vision_transformer import checkpoint_filter_fn

            self.weights_report = load_local_weights(self.body, weights,
                                                     convert=lambda state: checkpoint_filter_fn(state, self.body))

    def tokens_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` padded to a multiple of the token stride and resized so that one patch is one token-stride block."""
        t = self.token_stride
        h, w = x.shape[-2:]
        gh, gw = -(-h // t), -(-w // t)
        if (gh * t, gw * t) != (h, w):
            x = F.pad(x, (0, gw * t - w, 0, gh * t - h))
        if self.patch != t:
            x = F.interpolate(x, size=(gh * self.patch, gw * self.patch), mode="bilinear", align_corners=False)
        return x

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = x.shape[-2:]
        indices = sorted({self.low_block, self.high_block})
        maps = self.body.forward_intermediates(self.tokens_input(x), indices=indices, norm=True,
                                               intermediates_only=True)
        by_block = dict(zip(indices, maps))
        low = self.pyramid_low(by_block[self.low_block])
        high = self.pyramid_high(by_block[self.high_block])
        s = self.output_stride
        return low[..., : -(-h // 4), : -(-w // 4)], high[..., : -(-h // s), : -(-w // s)]
