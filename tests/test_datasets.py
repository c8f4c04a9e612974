"""Tests of the labeled dataset and the unlabeled context-pair dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dcc.data.datasets import ArraySource, LabeledDataset, UnlabeledPairDataset, crop_iou

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
ZERO_MEAN = (0.0, 0.0, 0.0)
UNIT_STD = (1.0, 1.0, 1.0)
NO_PHOTO = dict(color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)


def coordinate_source(n: int = 3, size: int = 64) -> ArraySource:
    """Images whose pixels encode (y, x) and masks derived from the same code."""
    yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    image = np.stack([yy * 3, xx * 3, (yy * 7 + xx * 13) % 256], axis=-1).astype(np.uint8)
    images = np.stack([np.roll(image, k, axis=1) for k in range(n)])
    masks = (images[..., 2] % 11).astype(np.uint8)
    return ArraySource(images, masks)


def random_source(n: int = 4, size: int = 32) -> ArraySource:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    masks = rng.integers(0, 11, size=(n, size, size), dtype=np.uint8)
    return ArraySource(images, masks)


def to_pixels(view: torch.Tensor) -> torch.Tensor:
    """Undo a zero-mean / unit-std normalisation back to integer pixel values."""
    return (view * 255).round().long()


def test_labeled_train_shapes_padding_and_labels() -> None:
    torch.manual_seed(0)
    # Long side 16..32 < crop 40: every sample is padded bottom-right.
    ds = LabeledDataset(random_source(), [0, 1, 2, 3], train=True, crop_size=40, base_size=32,
                        scale_range=(0.5, 1.0), mean=MEAN, std=STD, color_jitter_p=0.5)
    assert len(ds) == 4
    for k in range(8):
        image, mask = ds[k % 4]
        assert image.shape == (3, 40, 40) and image.dtype == torch.float32
        assert mask.shape == (40, 40) and mask.dtype == torch.int64
        assert type(image) is torch.Tensor and type(mask) is torch.Tensor
        values = set(mask.unique().tolist())
        assert 255 in values and values <= set(range(11)) | {255}
        # Padding: mean colour (about zero after normalisation) exactly where the label is ignored.
        pad = mask == 255
        assert image[:, pad].abs().max() < 0.02
        assert image[:, ~pad].abs().max() > 0.5


def test_labeled_train_image_and_mask_move_together() -> None:
    torch.manual_seed(1)
    ds = LabeledDataset(coordinate_source(), [0, 1, 2], train=True, crop_size=24, base_size=64,
                        scale_range=(1.0, 1.0), mean=ZERO_MEAN, std=UNIT_STD)
    flipped = 0
    for k in range(20):
        image, mask = ds[k % 3]
        pixels = to_pixels(image)
        assert torch.equal(mask, pixels[2] % 11)
        # x (channel 1) runs left to right unless the crop was flipped; rows share one y.
        dx = pixels[1, :, 1:] - pixels[1, :, :-1]
        flipped += bool((dx.median() < 0).item())
        assert (pixels[0] == pixels[0, :, :1]).all()
    assert 0 < flipped < 20


def test_labeled_train_resize_scale() -> None:
    torch.manual_seed(2)
    source = random_source(size=32)
    ds = LabeledDataset(source, [0], train=True, crop_size=64, base_size=32, scale_range=(2.0, 2.0),
                        mean=MEAN, std=STD, flip=False)
    image, mask = ds[0]
    # Long side 64 = crop: no padding, and nearest-neighbour labels are the 2x upsampled source.
    assert not (mask == 255).any()
    expected = torch.from_numpy(source.masks[0]).long().repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert torch.equal(mask, expected)


def test_labeled_eval_native() -> None:
    source = random_source(size=29)
    ds = LabeledDataset(source, [2], train=False, crop_size=16, base_size=64, scale_range=(0.5, 2.0),
                        mean=MEAN, std=STD)
    image, mask = ds[0]
    assert image.shape == (3, 29, 29) and mask.shape == (29, 29) and mask.dtype == torch.int64
    expected = (torch.from_numpy(source.images[2]).permute(2, 0, 1) / 255.0 - torch.tensor(MEAN)[:, None, None])
    expected = expected / torch.tensor(STD)[:, None, None]
    torch.testing.assert_close(image, expected)
    assert torch.equal(mask, torch.from_numpy(source.masks[2]).long())


def pair_dataset(**overrides) -> UnlabeledPairDataset:
    kwargs = dict(crop_size=32, base_size=64, scale_range=(0.8, 1.5), stride=8, mean=MEAN, std=STD)
    kwargs.update(overrides)
    return UnlabeledPairDataset(ArraySource(coordinate_source().images), [0, 1, 2], **kwargs)


def test_pair_output_format() -> None:
    torch.manual_seed(3)
    item = pair_dataset()[1]
    assert item["view1"].shape == item["view2"].shape == (3, 32, 32)
    assert item["view1"].dtype == item["view2"].dtype == torch.float32
    for key in ("offset1", "offset2", "extent1", "extent2"):
        assert item[key].shape == (2,) and item[key].dtype == torch.int64
    for key in ("flip1", "flip2"):
        assert item[key].shape == () and item[key].dtype == torch.bool
    assert item["index"].dtype == torch.int64 and item["index"].shape == () and int(item["index"]) == 1
    batch = torch.utils.data.default_collate([item, item])
    assert batch["view1"].shape == (2, 3, 32, 32) and batch["flip1"].shape == (2,)


def test_pair_offsets_stride_and_iou_range() -> None:
    torch.manual_seed(4)
    ds = pair_dataset(iou_range=(0.3, 0.7), **NO_PHOTO)
    ious, shifted = [], 0
    for k in range(150):
        item = ds[k % 3]
        diff = item["offset1"] - item["offset2"]
        assert (diff % 8 == 0).all()
        assert (item["offset1"] >= 0).all() and (item["offset2"] >= 0).all()
        shifted += bool((diff != 0).any())
        ious.append(float(crop_iou(item["offset1"], item["offset2"], 32)))
    ious = np.array(ious)
    # Each pair meets the IoU range unless it fell back to identical crops (IoU 1).
    assert ((ious >= 0.3) & (ious <= 0.7) | (ious == 1.0)).all()
    assert (ious <= 0.7).mean() > 0.9 and shifted > 130


def test_pair_no_context_uses_same_crop() -> None:
    torch.manual_seed(5)
    ds = pair_dataset(context=False, flip=False, **NO_PHOTO)
    for k in range(20):
        item = ds[k % 3]
        assert torch.equal(item["offset1"], item["offset2"])
        assert torch.equal(item["view1"], item["view2"])


def test_pair_geometry_overlap_pixels_identical() -> None:
    """Once flips are undone, both views show the same image pixels wherever the crops overlap."""
    torch.manual_seed(6)
    ds = pair_dataset(mean=ZERO_MEAN, std=UNIT_STD, **NO_PHOTO)
    flips = set()
    for k in range(40):
        item = ds[k % 3]
        views = []
        for n in ("1", "2"):
            view = item["view" + n]
            views.append(view.flip(-1) if item["flip" + n] else view)
            flips.add(bool(item["flip" + n]))
        (y1, x1), (y2, x2) = item["offset1"].tolist(), item["offset2"].tolist()
        top, left = max(y1, y2), max(x1, x2)
        bottom, right = min(y1, y2) + 32, min(x1, x2) + 32
        assert bottom > top and right > left
        a = views[0][:, top - y1 : bottom - y1, left - x1 : right - x1]
        b = views[1][:, top - y2 : bottom - y2, left - x2 : right - x2]
        assert torch.equal(a, b)
    assert flips == {True, False}


def test_pair_offsets_locate_crops_in_the_image() -> None:
    """Without resizing, view N (unflipped) is exactly the source image at offsetN."""
    torch.manual_seed(7)
    ds = pair_dataset(scale_range=(1.0, 1.0), mean=ZERO_MEAN, std=UNIT_STD, **NO_PHOTO)
    source = coordinate_source()
    for k in range(20):
        item = ds[k % 3]
        image = torch.from_numpy(source.images[k % 3]).permute(2, 0, 1).long()
        for n in ("1", "2"):
            view = item["view" + n].flip(-1) if item["flip" + n] else item["view" + n]
            y, x = item["offset" + n].tolist()
            assert torch.equal(to_pixels(view), image[:, y : y + 32, x : x + 32])


def test_pair_padding_and_reproducibility() -> None:
    ds = pair_dataset(base_size=20, scale_range=(1.0, 1.0), flip=False, mean=MEAN, std=STD, **NO_PHOTO)
    item = ds[0]
    # Resized to 20x20 and padded to 32: the only crop is at (0, 0); the pad is the mean colour.
    assert item["offset1"].tolist() == item["offset2"].tolist() == [0, 0]
    assert item["view1"][:, 20:, :].abs().max() < 0.02 and item["view1"][:, :, 20:].abs().max() < 0.02
    assert item["extent1"].tolist() == item["extent2"].tolist() == [20, 20]  # image content of each crop

    ds = pair_dataset()
    torch.manual_seed(8)
    first = [ds[k] for k in range(3)]
    torch.manual_seed(8)
    second = [ds[k] for k in range(3)]
    for a, b in zip(first, second):
        for key in a:
            assert torch.equal(a[key], b[key])


def test_pair_photometric_views_differ() -> None:
    torch.manual_seed(9)
    ds = pair_dataset(context=False, flip=False, color_jitter_p=1.0, grayscale_p=0.0, blur_p=1.0)
    item = ds[0]
    assert not torch.equal(item["view1"], item["view2"])


def test_pair_requires_crop_multiple_of_stride() -> None:
    with pytest.raises(AssertionError, match="multiple of stride"):
        pair_dataset(crop_size=30)
