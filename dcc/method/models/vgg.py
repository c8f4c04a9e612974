"""VGG at output stride 8 or 16, DeepLab-LargeFOV style, for the VGG-16 rows of Table 5.

timm builds VGG only at stride 32 (``output_stride`` is rejected). :func:`dilate_vgg` takes timm's
``features_only`` VGG and, for every max-pool that would take the stride past ``output_stride``, makes
it a 3x3 pool with stride 1 and padding 1 (shape-preserving, as in DeepLab-LargeFOV's pool4 / pool5);
each 3x3 convolution after such a pool gets the dilation (and padding) that keeps its receptive field,
2 after one removed stride-2 step, 4 after two. At stride 8: pool4 and pool5 become stride 1 and
conv5_1..conv5_3 are dilated by 2 (there is no conv after pool5), so the last map is conv5_3 pooled,
512 channels at stride 8. The module names are unchanged, so ImageNet weights load as usual.
"""

from __future__ import annotations

from torch import nn


def is_vgg(name: str) -> bool:
    return name.split(".")[0].startswith("vgg")


def dilate_vgg(body: nn.Module, output_stride: int) -> int:
    """Rewrite ``body`` (timm ``features_only`` VGG, modules in forward order) in place to ``output_stride``.

    Returns the output stride reached. Raises ValueError for a stride VGG cannot give (not 8, 16 or 32).
    """
    if output_stride not in (8, 16, 32):
        raise ValueError(f"VGG supports output strides 8, 16 and 32, got {output_stride}")
    stride, dilation = 1, 1
    for module in body.modules():
        if isinstance(module, nn.MaxPool2d):
            if stride * 2 <= output_stride:
                stride *= 2
            else:  # keep the resolution; what comes next sees the image at twice the sampling step
                module.kernel_size, module.stride, module.padding = 3, 1, 1
                dilation *= 2
        elif isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3) and dilation > 1:
            module.dilation = (dilation, dilation)
            module.padding = (dilation, dilation)
    return stride
