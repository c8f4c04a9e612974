"""Datasets over a generic "source" of images and masks, with the authors' augmentations.

A source is any object with ``__len__`` and ``load(i) -> (image uint8 [H, W, 3], mask uint8
[H, W] or None)``. ``LabeledDataset`` yields augmented (image, mask) pairs; ``UnlabeledPairDataset``
yields two overlapping crops of one unlabeled image plus the geometry needed to align them.
All randomness comes from torch's global RNG; the loaders of :mod:`dcc.data.build` seed it per item from
(run seed, position in the sample stream) before each item is drawn, which is what makes a run reproducible
and resumable, whatever the number of workers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = ["ArraySource", "LabeledDataset", "Source", "UnlabeledPairDataset", "crop_iou"]


class Source(Protocol):
    """Anything that serves (image, mask) pairs by index."""

    def __len__(self) -> int: ...

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray | None]: ...


class ArraySource:
    """A source backed by in-memory arrays: images uint8 [N, H, W, 3], masks uint8 [N, H, W]."""

    def __init__(self, images: np.ndarray, masks: np.ndarray | None = None) -> None:
        """Wrap ``images`` (and optional ``masks`` with matching N, H, W)."""
        assert images.ndim == 4 and images.shape[-1] == 3, f"images must be [N,H,W,3], got {images.shape}"
        if masks is not None:
            assert masks.shape == images.shape[:3], f"masks {masks.shape} vs images {images.shape}"
        self.images = images
        self.masks = masks

    def __len__(self) -> int:
        """Number of images."""
        return len(self.images)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Return image ``i`` [H, W, 3] uint8 and its mask [H, W] uint8 (None when unlabeled)."""
        return self.images[i], None if self.masks is None else self.masks[i]


def crop_iou(offset1: Tensor, offset2: Tensor, crop_size: int) -> Tensor:
    """IoU of square crops of side ``crop_size`` at (y, x) offsets [..., 2]; returns [...] float."""
    overlap = (crop_size - (offset1 - offset2).abs()).clamp(min=0).prod(dim=-1).double()
    return overlap / (2.0 * crop_size * crop_size - overlap)


def _to_tv(image: np.ndarray, mask: np.ndarray | None) -> tuple[tv_tensors.Image, tv_tensors.Mask | None]:
    """Convert numpy arrays to torchvision tv_tensors (image [3, H, W] uint8, mask [H, W] int64)."""
    img = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))
    if mask is None:
        return img, None
    return img, tv_tensors.Mask(torch.from_numpy(np.asarray(mask)).long())


def _random_long_side(base_size: int, scale_range: tuple[float, float]) -> int:
    """Draw the long side as a random integer in [scale_range[0], scale_range[1]] x base_size."""
    low = int(scale_range[0] * base_size)
    high = max(low, int(scale_range[1] * base_size))
    return int(torch.randint(low, high + 1, ()).item())


def _resize(image: Tensor, mask: Tensor | None, long_side: int) -> tuple[Tensor, Tensor | None]:
    """Resize so the long side is ``long_side`` (bicubic image, nearest mask); aspect kept."""
    h, w = image.shape[-2:]
    scale = long_side / max(h, w)
    size = [max(1, int(round(h * scale))), max(1, int(round(w * scale)))]
    if size == [h, w]:
        return image, mask
    image = F.resize(image, size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    if mask is not None:
        mask = F.resize(mask, size, interpolation=v2.InterpolationMode.NEAREST_EXACT)
    return image, mask


def _pad_to(image: Tensor, mask: Tensor | None, size: int, fill: Sequence[int], ignore_index: int
            ) -> tuple[Tensor, Tensor | None]:
    """Pad bottom-right to at least ``size`` x ``size``: image with ``fill`` colour, mask with ignore."""
    h, w = image.shape[-2:]
    ph, pw = max(size - h, 0), max(size - w, 0)
    if ph == 0 and pw == 0:
        return image, mask
    padded = torch.tensor(fill, dtype=image.dtype).view(3, 1, 1).expand(3, h + ph, w + pw).clone()
    padded[:, :h, :w] = image
    image = tv_tensors.wrap(padded, like=image) if isinstance(image, tv_tensors.Image) else padded
    if mask is not None:
        mask = F.pad(mask, [0, 0, pw, ph], fill=ignore_index)
    return image, mask


def _mean_fill(mean: Sequence[float]) -> list[int]:
    """The uint8 colour that normalises to (about) zero."""
    return [int(round(255.0 * m)) for m in mean]


def _normalise(image: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 [3, H, W] -> float32 normalised plain tensor."""
    image = F.to_dtype(image, torch.float32, scale=True)
    return F.normalize(image, mean=list(mean), std=list(std)).as_subclass(Tensor)


def _coin(p: float) -> bool:
    """True with probability ``p`` (torch RNG)."""
    return p > 0.0 and bool(torch.rand(()) < p)


class LabeledDataset(Dataset):
    """Labeled images with the authors' augmentation (train) or at native size (eval).

    Train: resize (long side random in scale_range x base_size; bicubic image, nearest mask),
    Gaussian blur with probability ``blur_p``, color jitter with probability ``color_jitter_p``, grayscale with
    probability ``grayscale_p`` (blur and grayscale: 0 unless asked, e.g. self-training's pseudo-labeled images with
    the unlabeled views' augmentation), pad bottom-right to the crop (image with the mean colour, mask with
    ``ignore_index``), random crop, horizontal flip with p=0.5, normalise.
    Eval: the native image normalised and its mask.
    """

    def __init__(
        self,
        source: Source,
        indices: Sequence[int],
        *,
        train: bool,
        crop_size: int,
        base_size: int,
        scale_range: tuple[float, float],
        mean: Sequence[float],
        std: Sequence[float],
        flip: bool = True,
        color_jitter_p: float = 0.0,
        ignore_index: int = 255,
        grayscale_p: float = 0.0,
        blur_p: float = 0.0,
        blur_kernel: int = 5,
    ) -> None:
        """See the module docstring; ``mean``/``std`` are in 0..1 units, per RGB channel."""
        self.source = source
        self.indices = [int(i) for i in indices]
        self.train = train
        self.crop_size = crop_size
        self.base_size = base_size
        self.scale_range = scale_range
        self.mean = list(mean)
        self.std = list(std)
        self.flip = flip
        self.color_jitter_p = color_jitter_p
        self.ignore_index = ignore_index
        self.grayscale_p, self.blur_p = grayscale_p, blur_p
        self.jitter = v2.ColorJitter(0.4, 0.4, 0.4, 0.1)
        self.blur = v2.GaussianBlur(blur_kernel, sigma=(0.1, 2.0))

    def __len__(self) -> int:
        """Number of labeled images."""
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[Tensor, Tensor]:
        """Return (image float32 [3, h, w], mask int64 [h, w]); h = w = crop_size in train mode."""
        image_np, mask_np = self.source.load(self.indices[item])
        assert mask_np is not None, f"source item {self.indices[item]} has no mask"
        image, mask = _to_tv(image_np, mask_np)
        if self.train:
            image, mask = _resize(image, mask, _random_long_side(self.base_size, self.scale_range))
            # Photometric changes before padding so that padded pixels stay the mean colour (zero once normalised);
            # a probability of 0 draws nothing, so the default stream is that of the jitter alone.
            if _coin(self.blur_p):
                image = self.blur(image)
            if _coin(self.color_jitter_p):
                image = self.jitter(image)
            if _coin(self.grayscale_p):
                image = F.rgb_to_grayscale(image, num_output_channels=3)
            image, mask = _pad_to(image, mask, self.crop_size, _mean_fill(self.mean), self.ignore_index)
            h, w = image.shape[-2:]
            y = int(torch.randint(0, h - self.crop_size + 1, ()).item())
            x = int(torch.randint(0, w - self.crop_size + 1, ()).item())
            image = F.crop(image, y, x, self.crop_size, self.crop_size)
            mask = F.crop(mask, y, x, self.crop_size, self.crop_size)
            if self.flip and _coin(0.5):
                image, mask = F.horizontal_flip(image), F.horizontal_flip(mask)
        return _normalise(image, self.mean, self.std), mask.as_subclass(Tensor).long()


class UnlabeledPairDataset(Dataset):
    """Two overlapping, independently augmented crops of one unlabeled image (CAC's context pair).

    The crops' offsets differ by a multiple of ``stride`` so that their stride-aligned feature
    cells coincide; ``dcc.method.overlap.overlap_pairs`` aligns them using the returned geometry. When the
    scaled image is smaller than the crop it is padded bottom-right; each view's ``extent`` tells
    which part of the crop is image content, so that padded cells never become anchors.
    """

    def __init__(
        self,
        source: Source,
        indices: Sequence[int],
        *,
        crop_size: int,
        base_size: int,
        scale_range: tuple[float, float],
        stride: int,
        iou_range: tuple[float, float] = (0.1, 1.0),
        context: bool = True,
        mean: Sequence[float],
        std: Sequence[float],
        flip: bool = True,
        color_jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        blur_p: float = 0.5,
        blur_kernel: int = 5,
        max_tries: int = 50,
        image_labels: np.ndarray | None = None,
        with_masks: bool = False,
        ignore_index: int = 255,
    ) -> None:
        """See the class docstring; ``context=False`` makes both views the same crop. ``image_labels``
        (float ``[len(source), K]``, indexed by source item) adds each image's image-level label vector.
        ``with_masks`` adds each view's ground truth (``mask1``/``mask2``, for diagnostics only; all
        ``ignore_index`` where the source has no label), cropped and flipped like the view; it draws no
        random number, so the views are the same with or without it."""
        assert crop_size % stride == 0, (
            f"crop_size ({crop_size}) must be a multiple of stride ({stride}) so feature cells align"
        )
        self.source = source
        self.indices = [int(i) for i in indices]
        self.crop_size = crop_size
        self.base_size = base_size
        self.scale_range = scale_range
        self.stride = stride
        self.iou_range = iou_range
        self.context = context
        self.mean = list(mean)
        self.std = list(std)
        self.flip = flip
        self.color_jitter_p = color_jitter_p
        self.grayscale_p = grayscale_p
        self.blur_p = blur_p
        self.max_tries = max_tries
        self.image_labels = None if image_labels is None else torch.as_tensor(np.asarray(image_labels, np.float32))
        self.with_masks = with_masks
        self.ignore_index = ignore_index
        self.jitter = v2.ColorJitter(0.4, 0.4, 0.4, 0.1)
        self.blur = v2.GaussianBlur(blur_kernel, sigma=(0.1, 2.0))

    def __len__(self) -> int:
        """Number of unlabeled images."""
        return len(self.indices)

    def _offsets(self, height: int, width: int) -> tuple[Tensor, Tensor]:
        """Draw two crop offsets (y, x) differing by multiples of stride with IoU in iou_range.

        All ``max_tries`` candidates are drawn at once; the first valid one wins, else both views
        take view 1's crop.
        """
        c, s = self.crop_size, self.stride
        limit = torch.tensor([height - c, width - c])
        offset1 = (torch.rand(2) * (limit + 1)).long().minimum(limit)
        if not self.context:
            return offset1, offset1.clone()
        # Multiples k of stride such that offset1 + k * stride stays inside [0, limit].
        k_low = -torch.div(offset1, s, rounding_mode="floor")
        k_high = torch.div(limit - offset1, s, rounding_mode="floor")
        span = k_high - k_low + 1
        k = k_low + (torch.rand(self.max_tries, 2) * span).long().minimum(span - 1)
        candidates = offset1 + k * s
        iou = crop_iou(offset1, candidates, c)
        ok = (iou >= self.iou_range[0]) & (iou <= self.iou_range[1])
        if not bool(ok.any()):
            return offset1, offset1.clone()
        return offset1, candidates[int(ok.nonzero()[0, 0])]

    def _view(self, image: Tensor, offset: Tensor) -> tuple[Tensor, bool]:
        """Crop at ``offset`` and apply one view's independent augmentation; returns (view, flipped)."""
        view = F.crop(image, int(offset[0]), int(offset[1]), self.crop_size, self.crop_size)
        flipped = self.flip and _coin(0.5)
        if flipped:
            view = F.horizontal_flip(view)
        if _coin(self.blur_p):
            view = self.blur(view)
        if _coin(self.color_jitter_p):
            view = self.jitter(view)
        if _coin(self.grayscale_p):
            view = F.rgb_to_grayscale(view, num_output_channels=3)
        return _normalise(view, self.mean, self.std), flipped

    def __getitem__(self, item: int) -> dict[str, Tensor]:
        """Return view1/view2 float32 [3, c, c], offset1/offset2 int64 [2] (y, x in the resized and
        padded image), extent1/extent2 int64 [2] (h, w: rows [0, h) and columns [0, w) of the view's
        crop, before its flip, are image content; the rest is bottom-right padding), flip1/flip2 bool []
        (view was flipped horizontally), index int64 [] and, with image labels, image_labels float32 [K]."""
        index = self.indices[item]
        image_np, mask_np = self.source.load(index)
        if self.with_masks and mask_np is None:
            mask_np = np.full(image_np.shape[:2], self.ignore_index, np.uint8)
        image, mask = _to_tv(image_np, mask_np if self.with_masks else None)
        image, mask = _resize(image, mask, _random_long_side(self.base_size, self.scale_range))
        size = torch.tensor(image.shape[-2:])  # the scaled image before padding
        image, mask = _pad_to(image, mask, self.crop_size, _mean_fill(self.mean), self.ignore_index)
        offset1, offset2 = self._offsets(*image.shape[-2:])
        view1, flip1 = self._view(image, offset1)
        view2, flip2 = self._view(image, offset2)
        item_out = {
            "view1": view1,
            "view2": view2,
            "offset1": offset1.long(),
            "offset2": offset2.long(),
            "extent1": (size - offset1).clamp(0, self.crop_size).long(),
            "extent2": (size - offset2).clamp(0, self.crop_size).long(),
            "flip1": torch.tensor(flip1),
            "flip2": torch.tensor(flip2),
            "index": torch.tensor(index, dtype=torch.long),
        }
        if self.image_labels is not None:
            item_out["image_labels"] = self.image_labels[index]
        if mask is not None:
            for name, offset, flipped in (("mask1", offset1, flip1), ("mask2", offset2, flip2)):
                crop = F.crop(mask, int(offset[0]), int(offset[1]), self.crop_size, self.crop_size)
                item_out[name] = (F.horizontal_flip(crop) if flipped else crop).as_subclass(Tensor).long()
        return item_out
