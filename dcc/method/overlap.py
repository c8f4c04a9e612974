"""Align the feature cells of two overlapping crops (CAC's context pair).

View N is the crop of side ``c`` at pixel offset ``offsetN`` (y, x) of the same image, possibly
flipped horizontally. Its feature map has one cell per ``stride`` x ``stride`` block of the crop.
Because the offsets differ by multiples of ``stride``, view-1 cell (i, j) covers exactly the
pixels of view-2 cell (i + dy, j + dx) with (dy, dx) = (offset1 - offset2) / stride.

When the scaled image is smaller than the crop, the crop holds bottom-right padding. As in the
authors' code, only cells that lie fully inside the real image are overlap cells (anchors): each
view's ``extent`` (h, w) says that rows [0, h) and columns [0, w) of its unflipped crop are image
content, so cell (i, j) counts when ``(i + 1) * stride <= h`` and ``(j + 1) * stride <= w``.
Negatives are not restricted here (the authors draw them from every cell, padding included).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["overlap_pairs", "unflip"]


def unflip(feat: Tensor, flip: Tensor) -> Tensor:
    """Flip ``feat`` [B, C, h, w] back horizontally where ``flip`` [B] (bool) is True."""
    return torch.where(flip.view(-1, 1, 1, 1), feat.flip(-1), feat)


def _cell_shift(offset1: Tensor, offset2: Tensor, stride: int) -> Tensor:
    """(offset1 - offset2) / stride as long [B, 2]; offsets must differ by multiples of stride."""
    return torch.div(offset1.long() - offset2.long(), stride, rounding_mode="floor")


def overlap_pairs(
    feat1: Tensor,
    feat2: Tensor,
    offset1: Tensor,
    offset2: Tensor,
    flip1: Tensor,
    flip2: Tensor,
    stride: int,
    extent1: Tensor | None = None,
    extent2: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gather the feature cells that cover the same image pixels, inside the real image, in both views.

    Args:
        feat1: view-1 features [B, C, h, w] at ``stride`` (h = w = crop_size / stride), as computed
            on the (possibly flipped) view.
        feat2: view-2 features [B, C, h, w].
        offset1: view-1 crop offsets [B, 2] (y, x) in pixels.
        offset2: view-2 crop offsets [B, 2]; ``offset1 - offset2`` must be a multiple of stride
            (not checked, to avoid a device sync).
        flip1: [B] bool, True where view 1 was flipped horizontally.
        flip2: [B] bool, same for view 2.
        stride: pixels per feature cell.
        extent1: view-1 content extent [B, 2] (h, w) in its unflipped crop (rows [0, h), columns
            [0, w) are image, the rest padding); None: the whole crop is image.
        extent2: same for view 2.

    Returns:
        (f1 [N, C], f2 [N, C], batch_index [N] long): row k of f1 and f2 are the cells of view 1
        and view 2 covering the same pixels, over every overlapping cell that is image content in
        both views (no padded cell), ordered by batch element then view-1 row-major cell position.
    """
    assert feat1.shape == feat2.shape, f"view feature shapes differ: {feat1.shape} vs {feat2.shape}"
    batch, _, h, w = feat1.shape
    device = feat1.device
    f1 = unflip(feat1, flip1.to(device)).permute(0, 2, 3, 1)  # [B, h, w, C]
    f2 = unflip(feat2, flip2.to(device)).permute(0, 2, 3, 1)
    shift = _cell_shift(offset1.to(device), offset2.to(device), stride)  # [B, 2]

    rows1 = torch.arange(h, device=device).view(1, h)
    cols1 = torch.arange(w, device=device).view(1, w)
    rows2 = rows1 + shift[:, :1]  # [B, h] view-2 row of each view-1 row
    cols2 = cols1 + shift[:, 1:]  # [B, w]
    row_ok = (rows2 >= 0) & (rows2 < h)  # [B, h]
    col_ok = (cols2 >= 0) & (cols2 < w)  # [B, w]
    for extent, rows, cols in ((extent1, rows1, cols1), (extent2, rows2, cols2)):
        if extent is not None:  # cells fully inside the real image
            extent = extent.to(device).long()
            row_ok = row_ok & ((rows + 1) * stride <= extent[:, :1])
            col_ok = col_ok & ((cols + 1) * stride <= extent[:, 1:])
    valid = row_ok.view(batch, h, 1) & col_ok.view(batch, 1, w)
    b, i, j = valid.nonzero(as_tuple=True)
    return f1[b, i, j], f2[b, rows2[b, i], cols2[b, j]], b
