"""Whole-image evaluation (the authors' protocol): native resolution, reflect-padded bottom-right to a
multiple of the stride, single scale, confusion matrix accumulated over the whole set."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dcc.metrics import confusion_matrix, scores


def predict_whole(model: nn.Module, image: torch.Tensor, multiple: int = 8) -> torch.Tensor:
    """Logits ``[B, K, H, W]`` for images ``[B, 3, H, W]`` padded (reflect, bottom-right) to ``multiple``."""
    h, w = image.shape[-2:]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h), mode="reflect")
    return model(image)[..., :h, :w]


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Any, num_classes: int, device: torch.device, *, ignore_index: int = 255,
    autocast: Any = None, keep: int = 0,
) -> dict[str, Any]:
    """Returns mIoU, pixel accuracy, per-class IoU, and the first ``keep`` (image, target, prediction) triples."""
    was_training = model.training
    model.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for image, target in loader:
        image, target = image.to(device, non_blocking=True), target.to(device, non_blocking=True)
        if autocast is not None:
            with autocast():
                logits = predict_whole(model, image)
        else:
            logits = predict_whole(model, image)
        pred = logits.argmax(1)
        conf += confusion_matrix(pred, target, num_classes, ignore_index)
        for i in range(min(len(image), keep - len(kept))):
            kept.append((image[i].cpu(), target[i].cpu(), pred[i].cpu()))
    model.train(was_training)
    result = scores(conf.cpu())
    result["samples"] = kept
    return result
