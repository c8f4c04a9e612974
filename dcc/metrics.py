"""Confusion-matrix metrics accumulated over a whole evaluation set (255 ignored)."""

from __future__ import annotations

import torch
from torch import Tensor


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """``[K, K]`` int64 counts, rows = ground truth, columns = prediction."""
    keep = target != ignore_index
    idx = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def scores(conf: Tensor) -> dict[str, object]:
    """mIoU over the classes that occur in the ground truth or the predictions, pixel accuracy, per-class IoU."""
    conf = conf.double()
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    iou = inter / union.clamp(min=1)
    present = union > 0
    return {
        "miou": float(iou[present].mean()) if bool(present.any()) else 0.0,
        "pixel_acc": float(inter.sum() / conf.sum().clamp(min=1)),
        "iou": [float(v) if p else float("nan") for v, p in zip(iou, present)],
    }
