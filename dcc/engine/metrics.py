"""Confusion-matrix metrics accumulated over a whole evaluation set (255 ignored), and the mean average
precision of the weakly-supervised image classifier."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def percent(fraction: float) -> float:
    """A share (mIoU, IoU, pixel accuracy, mAP) as the project shows it everywhere: in % (MLflow metrics, the
    console, run descriptions, Optuna values, reports). Inside a run (checkpoints, ``result.json``) it stays a
    fraction of 1."""
    return 100.0 * fraction


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


def present_classes(target: Tensor, num_classes: int) -> Tensor:
    """float ``[B, num_classes - 1]``: which foreground classes (1..K-1) occur in each mask ``[B, H, W]``
    (background and the ignore value are left out): an evaluation image's image-level label."""
    flat = target.reshape(len(target), -1).long().clamp(max=num_classes)  # ignore (255) -> spare column
    present = torch.zeros(len(target), num_classes + 1, device=target.device)
    present.scatter_(1, flat, 1.0)
    return present[:, 1:num_classes]


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean over classes of the average precision of ``scores`` ``[N, K]`` for ``targets`` ``[N, K]`` in {0, 1}
    (scikit-learn's AP: precision averaged over the recall steps), over the classes with at least one positive;
    nan when no class has one."""
    from sklearn.metrics import average_precision_score

    keep = np.asarray(targets).sum(0) > 0
    if not keep.any():
        return float("nan")
    return float(average_precision_score(np.asarray(targets)[:, keep], np.asarray(scores)[:, keep], average="macro"))
