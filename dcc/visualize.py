"""PNG grid of validation images, ground truth and predictions in a colour palette."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch


def palette(num_colors: int = 256) -> np.ndarray:
    """The Pascal VOC colour map (bit-interleaved), ``[num_colors, 3]`` uint8; index 255 is ignore."""
    idx = np.arange(num_colors)
    pal = np.zeros((num_colors, 3), dtype=np.int64)
    for shift in range(8):
        for channel in range(3):
            pal[:, channel] |= ((idx >> channel) & 1) << (7 - shift)
        idx = idx >> 3
    pal[255] = (224, 224, 192)
    return pal.astype(np.uint8)


def dataset_palette(cfg: Any) -> np.ndarray:
    """``[256, 3]``: the VOC colour map, with ``<root>/palette.txt``'s colours first for ``dataset=folder``."""
    pal = palette()
    if str(cfg.dataset.name) == "folder" and cfg.dataset.root:
        from dcc.data.folder import read_palette

        own = read_palette(cfg.dataset.root)
        if own is not None:
            pal[: min(len(own), 255)] = own[:255]
    return pal


def save_prediction_grid(
    samples: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], mean: Sequence[float], std: Sequence[float],
    path: str | Path, pal: np.ndarray | None = None,
) -> Path:
    """One row per sample: image, ground truth, prediction (colours ``pal``, default the VOC colour map)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pal = palette() if pal is None else pal
    rows = max(len(samples), 1)
    fig, axes = plt.subplots(rows, 3, figsize=(6, 2 * rows), squeeze=False)
    for r, (image, target, pred) in enumerate(samples):
        img = image.float() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
        panels = [img.clamp(0, 1).permute(1, 2, 0).numpy(), pal[target.numpy()], pal[pred.numpy()]]
        for c, (panel, title) in enumerate(zip(panels, ("image", "ground truth", "prediction"))):
            axes[r, c].imshow(panel, interpolation="nearest")
            axes[r, c].set_axis_off()
            if r == 0:
                axes[r, c].set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
