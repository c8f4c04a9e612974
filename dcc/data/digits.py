"""Embedded segmentation dataset: scenes of scikit-learn handwritten digits.

Each scene is a textured, coloured background with a few upscaled 8x8 digits pasted on it.
Class 0 is background and class ``d + 1`` is digit ``d`` (11 classes). Nothing is downloaded:
the digits ship with scikit-learn. Scenes are generated once per parameter set and cached as an
``.npz`` file whose name carries a hash of all the parameters.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from dcc.data.cache import read_npz
from dcc.data.datasets import ArraySource

__all__ = ["ArraySource", "NUM_CLASSES", "generate_digit_scenes", "load_digit_scenes"]

NUM_CLASSES = 11
"""Background plus the ten digits."""

# Bump when the generator's output changes so that stale caches are not reused.
_GENERATOR_VERSION = 2
# Fraction of the sklearn samples reserved for training scenes (the rest feed validation).
_TRAIN_FRACTION = 0.8
# A pixel belongs to a digit when its upscaled intensity (0..1) exceeds this.
_MASK_THRESHOLD = 0.35
# Blending opacity is intensity x gain, clipped to 1: soft edges, solid strokes.
_ALPHA_GAIN = 1.6
# Digit colour: the farthest from the local background among this many random candidates.
_COLOUR_CANDIDATES = 4


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


def _backgrounds(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """Return ``n`` textured colour backgrounds as float32 [n, size, size, 3] in 0..255.

    Each background blends two random colours with a pattern in [0, 1] chosen per scene among
    smooth noise, a linear gradient and stripes.
    """
    f32 = np.float32
    coords = np.arange(size, dtype=f32) / f32(size)
    yy, xx = np.meshgrid(coords, coords, indexing="ij")  # [S, S]

    # Smooth noise: a coarse random grid upscaled bilinearly.
    grid = 4
    up = _bilinear_matrix(size, grid).astype(f32)
    noise = np.einsum("ya,nab,xb->nyx", up, rng.random((n, grid, grid), dtype=f32), up)

    # Directional ramps shared by the gradient and stripe patterns.
    angle = rng.uniform(0.0, 2.0 * np.pi, size=(n, 1, 1)).astype(f32)
    ramp = np.cos(angle) * yy + np.sin(angle) * xx  # in [-sqrt2, sqrt2]
    gradient = (ramp + f32(np.sqrt(2.0))) / f32(2.0 * np.sqrt(2.0))
    freq = rng.uniform(2.0, 6.0, size=(n, 1, 1)).astype(f32)  # stripes per image side
    phase = rng.uniform(0.0, 2.0 * np.pi, size=(n, 1, 1)).astype(f32)
    stripes = f32(0.5) + f32(0.5) * np.sin(f32(2.0 * np.pi) * freq * ramp + phase)

    # Stripes (kind 2) made the demo too hard to learn from scratch within a CPU budget: off.
    kind = rng.integers(0, 2, size=(n, 1, 1))
    pattern = np.where(kind == 0, noise, np.where(kind == 1, gradient, stripes))

    colour_a = rng.uniform(0.0, 255.0, size=(n, 1, 1, 3)).astype(f32)
    colour_b = rng.uniform(0.0, 255.0, size=(n, 1, 1, 3)).astype(f32)
    return colour_a + (colour_b - colour_a) * pattern[..., None]


def _render_scenes(
    rng: np.random.Generator,
    digit_images: np.ndarray,
    digit_labels: np.ndarray,
    pool: np.ndarray,
    *,
    num_scenes: int,
    image_size: int,
    digits_per_image: tuple[int, int],
    digit_size: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render ``num_scenes`` scenes whose digits are drawn from the sklearn indices in ``pool``.

    Returns (images uint8 [N,S,S,3], masks uint8 [N,S,S], digit_ids int64 [D]) where ``digit_ids``
    lists the sklearn sample index of every digit pasted, in drawing order.
    """
    size = image_size
    lo_count, hi_count = digits_per_image
    lo_side, hi_side = digit_size
    assert 1 <= lo_count <= hi_count, f"bad digits_per_image {digits_per_image}"
    assert 2 <= lo_side <= hi_side <= size, f"bad digit_size {digit_size} for image {size}"

    images = _backgrounds(rng, num_scenes, size)
    masks = np.zeros((num_scenes, size, size), dtype=np.uint8)

    # Every per-digit random draw happens up front, vectorised.
    counts = rng.integers(lo_count, hi_count + 1, size=num_scenes)
    scene_of = np.repeat(np.arange(num_scenes), counts)
    total = scene_of.size
    ids = pool[rng.integers(0, pool.size, size=total)]
    sides = rng.integers(lo_side, hi_side + 1, size=total)
    tops = (rng.random(total) * (size - sides + 1)).astype(np.int64)
    lefts = (rng.random(total) * (size - sides + 1)).astype(np.int64)
    candidates = rng.uniform(0.0, 255.0, size=(total, _COLOUR_CANDIDATES, 3))

    # Upscaled intensity (0..1) of every digit, grouped by side to reuse interpolation matrices.
    intensities: list[np.ndarray | None] = [None] * total
    for side in np.unique(sides):
        sel = np.flatnonzero(sides == side)
        mat = _bilinear_matrix(int(side), 8)
        up = np.einsum("ya,nab,xb->nyx", mat, digit_images[ids[sel]] / 16.0, mat)
        for k, idx in enumerate(sel):
            intensities[idx] = up[k]

    # Paste in order so later digits overwrite earlier ones (a few thousand small slices).
    for k in range(total):
        n, y, x, s = scene_of[k], tops[k], lefts[k], sides[k]
        inten = intensities[k]
        patch = images[n, y : y + s, x : x + s]
        local = patch.mean(axis=(0, 1))
        colour = candidates[k, np.argmax(((candidates[k] - local) ** 2).sum(-1))]
        alpha = np.clip(inten * _ALPHA_GAIN, 0.0, 1.0).astype(np.float32)[..., None]
        images[n, y : y + s, x : x + s] = patch * (1.0 - alpha) + colour * alpha
        region = masks[n, y : y + s, x : x + s]
        region[inten > _MASK_THRESHOLD] = digit_labels[ids[k]] + 1

    sigma = rng.uniform(2.0, 6.0, size=(num_scenes, 1, 1, 1)).astype(np.float32)
    images = images + sigma * rng.standard_normal(images.shape, dtype=np.float32)
    return np.clip(np.rint(images), 0, 255).astype(np.uint8), masks, ids.astype(np.int64)


def generate_digit_scenes(
    *,
    num_train: int,
    num_val: int,
    image_size: int,
    digits_per_image: tuple[int, int],
    digit_size: tuple[int, int],
    seed: int,
) -> dict[str, np.ndarray]:
    """Generate train and validation digit scenes in memory (no cache); see ``load_digit_scenes``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    digit_images = bunch.images.astype(np.float64)  # [1797, 8, 8], values 0..16
    digit_labels = bunch.target.astype(np.int64)

    split_seq, train_seq, val_seq = np.random.SeedSequence(seed).spawn(3)
    order = np.random.default_rng(split_seq).permutation(len(digit_labels))
    cut = int(round(_TRAIN_FRACTION * len(order)))
    pools = {"train": order[:cut], "val": order[cut:]}

    out: dict[str, np.ndarray] = {}
    for split, seq, count in (("train", train_seq, num_train), ("val", val_seq, num_val)):
        images, masks, ids = _render_scenes(
            np.random.default_rng(seq),
            digit_images,
            digit_labels,
            pools[split],
            num_scenes=count,
            image_size=image_size,
            digits_per_image=tuple(digits_per_image),
            digit_size=tuple(digit_size),
        )
        out[f"{split}_images"] = images
        out[f"{split}_masks"] = masks
        out[f"{split}_digit_ids"] = ids
    return out


def _cache_path(cache_dir: Path, params: dict[str, object]) -> Path:
    """Return the cache file for ``params`` (the name holds a hash of params and generator version)."""
    key = json.dumps({**params, "version": _GENERATOR_VERSION}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir / f"digit_scenes_{digest}.npz"


def load_digit_scenes(
    cache_dir: str | os.PathLike,
    *,
    num_train: int,
    num_val: int,
    image_size: int,
    digits_per_image: tuple[int, int],
    digit_size: tuple[int, int],
    seed: int,
) -> dict[str, np.ndarray]:
    """Return digit scenes, generating them once and caching them in ``cache_dir``.

    Args:
        cache_dir: directory of the ``.npz`` cache (created if missing).
        num_train: number of training scenes.
        num_val: number of validation scenes.
        image_size: side of the square scenes in pixels.
        digits_per_image: inclusive range of the number of digits per scene.
        digit_size: inclusive range of a digit's side in pixels.
        seed: seed of everything random; the same parameters give identical arrays.

    Returns:
        ``train_images`` / ``val_images`` uint8 [N, H, W, 3], ``train_masks`` / ``val_masks``
        uint8 [N, H, W] (0 background, d + 1 digit d), and ``train_digit_ids`` /
        ``val_digit_ids`` int64: the sklearn sample index of every digit pasted in that split.
        Train and validation digits come from disjoint sklearn samples (an 80/20 seeded split).
    """
    params = {
        "num_train": int(num_train),
        "num_val": int(num_val),
        "image_size": int(image_size),
        "digits_per_image": [int(v) for v in digits_per_image],
        "digit_size": [int(v) for v in digit_size],
        "seed": int(seed),
    }
    directory = Path(cache_dir)
    path = _cache_path(directory, params)
    if (cached := read_npz(path)) is not None:  # a damaged cache is named, deleted and regenerated
        return cached

    arrays = generate_digit_scenes(
        num_train=params["num_train"],
        num_val=params["num_val"],
        image_size=params["image_size"],
        digits_per_image=tuple(params["digits_per_image"]),
        digit_size=tuple(params["digit_size"]),
        seed=params["seed"],
    )
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez_compressed(handle, **arrays)
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)
        raise
    return arrays
