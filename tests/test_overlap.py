"""End-to-end geometry of aligning two overlapping, possibly flipped crops at a feature stride."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from dcc.method.overlap import overlap_pairs


def overlap_cell_count(
    offset1: Tensor, offset2: Tensor, crop_size: int, stride: int,
    extent1: Tensor | None = None, extent2: Tensor | None = None,
) -> Tensor:
    """The reference count of the tests: number of overlapping feature cells per pair, long [B], for crops of side ``crop_size`` (with
    extents: only cells inside the real image, as :func:`overlap_pairs` counts them)."""
    offset1, offset2 = offset1.long(), offset2.long()
    full = torch.full_like(offset1, crop_size)
    # the image rectangle covered by both crops' content, in image pixels, counted in whole cells of view 1
    end1 = offset1 + (full if extent1 is None else extent1.long())
    end2 = offset2 + (full if extent2 is None else extent2.long())
    span = torch.minimum(end1, end2) - torch.maximum(offset1, offset2)
    return torch.div(span.clamp(min=0), stride, rounding_mode="floor").prod(dim=-1)

STRIDE = 8
CROP = 32


def coordinate_image(height: int = 96, width: int = 96) -> torch.Tensor:
    """Image [3, H, W] whose channels are y, x and a hash of (y, x) (all small exact floats)."""
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    code = (yy * 31 + xx * 17) % 101
    return torch.stack([yy, xx, code]).float()


def make_pairs(image: torch.Tensor, offsets1: list, offsets2: list, flips1: list, flips2: list):
    """Cut the views, flip them, and pool them at STRIDE like a backbone would."""

    def views(offsets, flips):
        out = []
        for (y, x), f in zip(offsets, flips):
            crop = image[:, y : y + CROP, x : x + CROP]
            out.append(crop.flip(-1) if f else crop)
        return F.avg_pool2d(torch.stack(out), STRIDE)

    return (
        views(offsets1, flips1),
        views(offsets2, flips2),
        torch.tensor(offsets1),
        torch.tensor(offsets2),
        torch.tensor(flips1),
        torch.tensor(flips2),
    )


def expected_cells(o1, o2) -> list[tuple[int, int]]:
    """Brute force: image-pixel top-left corners of cells present in both crops, row-major."""
    cells1 = {(o1[0] + STRIDE * i, o1[1] + STRIDE * j) for i in range(CROP // STRIDE) for j in range(CROP // STRIDE)}
    cells2 = {(o2[0] + STRIDE * i, o2[1] + STRIDE * j) for i in range(CROP // STRIDE) for j in range(CROP // STRIDE)}
    return sorted(cells1 & cells2)


def test_batch_of_pairs_aligns_exactly() -> None:
    image = coordinate_image()
    offsets1 = [[3, 5], [0, 0], [20, 41], [10, 10], [0, 60], [40, 7]]
    offsets2 = [[19, 13], [24, 8], [4, 25], [10, 10], [16, 36], [8, 31]]
    flips1 = [False, True, False, True, True, False]
    flips2 = [False, False, True, True, False, True]
    feat1, feat2, o1, o2, fl1, fl2 = make_pairs(image, offsets1, offsets2, flips1, flips2)

    f1, f2, batch_index = overlap_pairs(feat1, feat2, o1, o2, fl1, fl2, STRIDE)
    counts = overlap_cell_count(o1, o2, CROP, STRIDE)

    assert f1.shape == f2.shape == (len(batch_index), 3)
    assert batch_index.dtype == torch.long
    torch.testing.assert_close(f1, f2, rtol=0, atol=0)
    assert torch.equal(torch.bincount(batch_index, minlength=len(offsets1)), counts)
    assert counts.tolist() == [len(expected_cells(a, b)) for a, b in zip(offsets1, offsets2)]
    # The rows are the right image cells: pooled (y, x) = cell corner + (STRIDE - 1) / 2.
    for b, (a, c) in enumerate(zip(offsets1, offsets2)):
        corners = (f1[batch_index == b, :2] - (STRIDE - 1) / 2).round().long().tolist()
        assert sorted(map(tuple, corners)) == expected_cells(a, c)


def test_equal_offsets_different_flips() -> None:
    image = coordinate_image()
    feat1, feat2, o1, o2, fl1, fl2 = make_pairs(image, [[8, 16]], [[8, 16]], [True], [False])
    # Without undoing the flip, the two maps disagree.
    assert not torch.equal(feat1, feat2)
    f1, f2, batch_index = overlap_pairs(feat1, feat2, o1, o2, fl1, fl2, STRIDE)
    assert len(f1) == (CROP // STRIDE) ** 2 == int(overlap_cell_count(o1, o2, CROP, STRIDE)[0])
    torch.testing.assert_close(f1, f2, rtol=0, atol=0)
    torch.testing.assert_close(f1, feat2[0].flatten(1).T, rtol=0, atol=0)
    assert torch.equal(batch_index, torch.zeros(len(f1), dtype=torch.long))


def test_disjoint_crops_give_no_rows_and_any_channel_count() -> None:
    image = coordinate_image()
    feat1, feat2, o1, o2, fl1, fl2 = make_pairs(image, [[0, 0]], [[32, 8]], [False], [True])
    f1, f2, batch_index = overlap_pairs(feat1, feat2, o1, o2, fl1, fl2, STRIDE)
    assert f1.shape == (0, 3) and f2.shape == (0, 3) and batch_index.numel() == 0
    assert overlap_cell_count(o1, o2, CROP, STRIDE).tolist() == [0]

    wide = torch.randn(2, 70, 4, 4)
    f1, f2, _ = overlap_pairs(wide, wide, torch.tensor([[0, 0], [0, 0]]), torch.tensor([[8, 0], [0, 0]]),
                              torch.tensor([False, False]), torch.tensor([False, False]), STRIDE)
    assert f1.shape == (12 + 16, 70)
    # Pair 0: view-1 rows 1..3 meet view-2 rows 0..2.
    torch.testing.assert_close(f1[:12], wide[0, :, 1:, :].permute(1, 2, 0).reshape(12, 70))
    torch.testing.assert_close(f2[:12], wide[0, :, :3, :].permute(1, 2, 0).reshape(12, 70))


def test_gradients_flow_to_both_views() -> None:
    feat1 = torch.randn(2, 5, 4, 4, requires_grad=True)
    feat2 = torch.randn(2, 5, 4, 4, requires_grad=True)
    off1, off2 = torch.tensor([[8, 0], [0, 16]]), torch.tensor([[0, 8], [0, 0]])
    f1, f2, _ = overlap_pairs(feat1, feat2, off1, off2, torch.tensor([True, False]),
                              torch.tensor([False, True]), STRIDE)
    (f1.sum() + 2 * f2.sum()).backward()
    assert len(f1) == 3 * 3 + 4 * 2
    assert feat1.grad.sum() == 5 * len(f1) and feat2.grad.sum() == 2 * 5 * len(f2)
    # Pair 0, view 1 (flipped, cell shift (+1, -1)): original rows 0..2 and cols 1..3,
    # i.e. cols 0..2 of the flipped map that the network saw.
    expected = torch.zeros(4, 4)
    expected[:3, :3] = 1
    assert torch.equal(feat1.grad[0, 0], expected)


def _cell_corners(offsets: torch.Tensor, flips: torch.Tensor, cells: int) -> torch.Tensor:
    """What a network computes on each view, made explicit: feature [B, 2, cells, cells] whose cell holds the
    image-pixel (y, x) corner of the stride cell it covers, laid out as the (possibly flipped) view shows it."""
    idx = torch.arange(cells) * STRIDE
    yy = offsets[:, 0].view(-1, 1, 1) + idx.view(1, -1, 1)
    xx = offsets[:, 1].view(-1, 1, 1) + idx.view(1, 1, -1)
    feat = torch.stack([yy.expand(-1, cells, cells), xx.expand(-1, cells, cells)], 1).float()
    return torch.where(flips.view(-1, 1, 1, 1), feat.flip(-1), feat)


def _pair_batch(image_hw: tuple[int, int], long_side: int, crop: int, seed: int, n: int = 6) -> dict:
    """n pairs of one image of ``image_hw`` scaled to ``long_side`` through the real dataset (flips on)."""
    from dcc.data.datasets import ArraySource, UnlabeledPairDataset

    image = torch.randint(0, 256, (1, *image_hw, 3), dtype=torch.uint8).numpy()
    ds = UnlabeledPairDataset(ArraySource(image), [0], crop_size=crop, base_size=long_side, scale_range=(1.0, 1.0),
                              stride=STRIDE, mean=(0.5,) * 3, std=(0.25,) * 3, color_jitter_p=0.0, grayscale_p=0.0,
                              blur_p=0.0)
    torch.manual_seed(seed)
    return torch.utils.data.default_collate([ds[0] for _ in range(n)])


def _overlap_of(batch: dict, crop: int):
    cells = crop // STRIDE
    feat1 = _cell_corners(batch["offset1"], batch["flip1"], cells)
    feat2 = _cell_corners(batch["offset2"], batch["flip2"], cells)
    return overlap_pairs(feat1, feat2, batch["offset1"], batch["offset2"], batch["flip1"], batch["flip2"], STRIDE,
                         batch["extent1"], batch["extent2"])


def test_padded_cells_are_never_anchors_300x450_scaled_to_320():
    """The issue's geometry: 300 x 450 scaled to a 320 long side is 213 x 320, padded to the 320 crop. Only the
    26 x 40 cells fully inside the 213 rows of image are overlap cells (1,040, not 40 x 40 = 1,600)."""
    batch = _pair_batch((300, 450), 320, 320, seed=0)
    assert batch["offset1"].tolist() == batch["offset2"].tolist() == [[0, 0]] * 6  # the only crop position
    assert batch["extent1"].tolist() == batch["extent2"].tolist() == [[213, 320]] * 6
    assert {bool(f) for f in batch["flip1"]} | {bool(f) for f in batch["flip2"]} == {False, True}
    f1, f2, index = _overlap_of(batch, 320)
    assert torch.bincount(index).tolist() == [26 * 40] * 6
    assert overlap_cell_count(batch["offset1"], batch["offset2"], 320, STRIDE, batch["extent1"],
                              batch["extent2"]).tolist() == [1040] * 6
    assert torch.equal(f1, f2)  # rows cover the same cells, flips undone
    assert int(f1[:, 0].max()) + STRIDE <= 213  # none in the padding (rows 213..319)
    assert sorted(set(f1[:, 0].long().tolist())) == list(range(0, 26 * STRIDE, STRIDE))
    # without the extents, the padded cells would be counted
    nofill = overlap_pairs(*(_cell_corners(batch[f"offset{v}"], batch[f"flip{v}"], 40) for v in (1, 2)),
                           batch["offset1"], batch["offset2"], batch["flip1"], batch["flip2"], STRIDE)
    assert len(nofill[0]) == 6 * 1600


@pytest.mark.parametrize("image_hw, long_side, padded", [((200, 600), 300, True), ((600, 200), 300, True),
                                                          ((300, 300), 150, True), ((256, 512), 640, False)])
def test_overlap_is_every_shared_cell_inside_the_image(image_hw, long_side, padded):
    """Shifted, flipped crops of padded (and unpadded) images: the overlap is exactly, by brute force, the cells
    present in both crops' grids that lie fully inside the scaled image."""
    batch = _pair_batch(image_hw, long_side, 160, seed=1, n=12)
    scale = long_side / max(image_hw)
    h, w = (round(s * scale) for s in image_hw)
    assert bool((batch["extent1"] < 160).any()) == padded  # 100 x 300, 300 x 100, 150 x 150 (not multiples of 8)
    f1, f2, index = _overlap_of(batch, 160)
    assert torch.equal(f1, f2)
    counts = overlap_cell_count(batch["offset1"], batch["offset2"], 160, STRIDE, batch["extent1"], batch["extent2"])
    assert torch.equal(torch.bincount(index, minlength=12), counts)
    shifted = 0
    for b in range(12):
        (y1, x1), (y2, x2) = batch["offset1"][b].tolist(), batch["offset2"][b].tolist()
        shifted += (y1, x1) != (y2, x2)
        grid = lambda y, x: {(y + STRIDE * i, x + STRIDE * j) for i in range(20) for j in range(20)}  # noqa: E731
        inside = {(y, x) for y, x in grid(y1, x1) & grid(y2, x2) if y + STRIDE <= h and x + STRIDE <= w}
        assert sorted(map(tuple, f1[index == b].long().tolist())) == sorted(inside), b
    assert shifted > 0 or max(h, w) < 160  # a crop larger than the image in both sides has one position
