"""PNG grid of validation images, ground truth and predictions in a colour palette, with a legend of class names."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dcc.config import DatasetConfig


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


def dataset_palette(ds: DatasetConfig) -> np.ndarray:
    """``[256, 3]``: the VOC colour map, with ``<root>/palette.txt``'s colours first for ``dataset=folder``."""
    pal = palette()
    if str(ds.name) == "folder" and ds.root:
        from dcc.data.folder import read_palette

        own = read_palette(ds.root)
        if own is not None:
            pal[: min(len(own), 255)] = own[:255]
    return pal


def save_prediction_grid(
    samples: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], mean: Sequence[float], std: Sequence[float],
    path: str | Path, class_names: Sequence[str] | None = None, ignore_index: int = 255, pal: np.ndarray | None = None,
) -> Path:
    """Write :func:`prediction_grid` to ``path`` (PNG)."""
    fig = prediction_grid(samples, mean, std, class_names, ignore_index, pal)  # selects the Agg backend first
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def prediction_grid(
    samples: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], mean: Sequence[float], std: Sequence[float],
    class_names: Sequence[str] | None = None, ignore_index: int = 255, pal: np.ndarray | None = None,
) -> Any:
    """One row per sample: image, ground truth, prediction (colours ``pal``, default the VOC colour map); below
    them a legend of the colours of the classes that appear (named by ``class_names``, else ``class <index>``;
    ``ignore_index`` as "ignore")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    pal = palette() if pal is None else pal
    rows = max(len(samples), 1)
    present: set[int] = set()
    for _, target, pred in samples:
        present |= set(torch.cat([target.flatten(), pred.flatten()]).unique().tolist())
    legend_rows = -(-len(present) // 6)
    legend_h = 0.3 * legend_rows + 0.1  # inches below the images
    fig, axes = plt.subplots(rows, 3, figsize=(6, 2 * rows + legend_h), squeeze=False)
    for r, (image, target, pred) in enumerate(samples):
        img = image.float() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
        panels = [img.clamp(0, 1).permute(1, 2, 0).numpy(), pal[target.numpy()], pal[pred.numpy()]]
        for c, (panel, title) in enumerate(zip(panels, ("image", "ground truth", "prediction"))):
            axes[r, c].imshow(panel, interpolation="nearest")
            axes[r, c].set_axis_off()
            if r == 0:
                axes[r, c].set_title(title, fontsize=9)
    names = list(class_names or [])

    def label(i: int) -> str:
        if i == ignore_index:
            return "ignore"
        return names[i] if i < len(names) else f"class {i}"

    handles = [Patch(facecolor=pal[i] / 255.0, edgecolor="black", linewidth=0.3, label=label(i)) for i in sorted(present)]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, legend_h / (2 * rows + legend_h), 1, 1))
    return fig
