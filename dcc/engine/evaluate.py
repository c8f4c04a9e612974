"""Validation: whole-image (the authors' protocol) or sliding-window prediction, one confusion matrix over the set.

- ``whole``: native resolution, reflect-padded bottom-right to a multiple of the output stride, single
  scale, no flip.
- ``slide``: windows of ``crop_size`` every ``stride`` pixels (the last window of each row and column is
  aligned to the border), logits averaged where windows overlap; an image smaller than a window is
  zero-padded (the mean colour once normalised) bottom-right first.

Under torch.distributed each rank evaluates its own shard (``dcc.data.build.eval_loader``) and the
confusion matrices are summed over ranks before any score is computed.

A model with the image-level classifier C_w (weakly-supervised setting) is also scored as a multi-label
classifier: its logits on each whole validation image against the foreground classes of the image's
mask, as the mean average precision over classes (``weak_map``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from dcc import distributed as ddp
from dcc.config import EvalConfig
from dcc.engine.metrics import confusion_matrix, mean_average_precision, present_classes, scores

Model = Callable[[torch.Tensor], torch.Tensor]


def predict_whole(model: Model, image: torch.Tensor, multiple: int = 8) -> torch.Tensor:
    """Logits ``[B, K, H, W]`` for images ``[B, 3, H, W]`` padded (reflect, bottom-right) to ``multiple``."""
    h, w = image.shape[-2:]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    if pad_h or pad_w:
        mode = "reflect" if pad_h < h and pad_w < w else "replicate"  # reflect needs pad < size
        image = F.pad(image, (0, pad_w, 0, pad_h), mode=mode)
    return model(image)[..., :h, :w]


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Start offsets along one axis: every ``stride`` from 0, plus a last window flush with the end."""
    if size <= crop:
        return [0]
    starts = list(range(0, size - crop, stride))
    return starts + [size - crop]


def predict_slide(model: Model, image: torch.Tensor, crop_size: int, stride: int, batch: int = 4) -> torch.Tensor:
    """Logits ``[B, K, H, W]`` averaged over the sliding windows that cover each pixel."""
    b, _, h, w = image.shape
    ph, pw = max(crop_size - h, 0), max(crop_size - w, 0)
    if ph or pw:
        image = F.pad(image, (0, pw, 0, ph))
    H, W = image.shape[-2:]
    boxes = [(y, x) for y in window_starts(H, crop_size, stride) for x in window_starts(W, crop_size, stride)]
    total: torch.Tensor | None = None
    count = torch.zeros(1, 1, H, W, device=image.device)
    for first in range(0, len(boxes), batch):
        chunk = boxes[first:first + batch]
        crops = torch.cat([image[..., y:y + crop_size, x:x + crop_size] for y, x in chunk])  # [len(chunk) * B, 3, c, c]
        logits = model(crops).float().unflatten(0, (len(chunk), b))
        if total is None:
            total = image.new_zeros(b, logits.shape[2], H, W, dtype=torch.float32)
        for (y, x), window in zip(chunk, logits):
            total[..., y:y + crop_size, x:x + crop_size] += window
            count[..., y:y + crop_size, x:x + crop_size] += 1
    assert total is not None
    return (total / count)[..., :h, :w]


def eval_options(ev: EvalConfig) -> dict[str, Any]:
    """Keyword arguments of :func:`evaluate` from the ``eval`` config group."""
    return {"mode": str(ev.mode), "pad_multiple": int(ev.pad_multiple), "crop_size": int(ev.crop_size),
            "stride": int(ev.stride)}


def predict(model: Model, image: torch.Tensor, *, mode: str = "whole", pad_multiple: int = 8, crop_size: int = 512,
            stride: int = 341) -> torch.Tensor:
    """Logits at the input resolution with the given evaluation mode."""
    if mode == "whole":
        return predict_whole(model, image, pad_multiple)
    if mode == "slide":
        return predict_slide(model, image, crop_size, stride)
    raise ValueError(f"eval.mode must be whole or slide, got {mode!r}")


def weak_scores(model: Any, image: torch.Tensor, pad_multiple: int = 8) -> torch.Tensor:
    """C_w's logits ``[B, K_fg]`` on whole images (padded like :func:`predict_whole`)."""
    h, w = image.shape[-2:]
    pad_h, pad_w = (-h) % pad_multiple, (-w) % pad_multiple
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h), mode="reflect" if pad_h < h and pad_w < w else "replicate")
    return model.weak_logits(model.features(image)).float()


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Any, num_classes: int, device: torch.device, *, ignore_index: int = 255,
    autocast: Any = None, keep: int = 0, mode: str = "whole", pad_multiple: int = 8, crop_size: int = 512,
    stride: int = 341,
) -> dict[str, Any]:
    """mIoU, pixel accuracy and per-class IoU from the confusion matrix of the whole set (summed over
    ranks), the matrix itself, the mode / crop / stride used, this rank's first ``keep``
    (image, target, prediction) triples and, for a model with C_w, ``weak_map``."""
    was_training = model.training
    model.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    weak = getattr(model, "weak_classifier", None) is not None
    weak_out: list[torch.Tensor] = []
    weak_true: list[torch.Tensor] = []
    options = {"mode": mode, "pad_multiple": pad_multiple, "crop_size": crop_size, "stride": stride}
    for image, target in loader:
        image, target = image.to(device, non_blocking=True), target.to(device, non_blocking=True)
        if autocast is not None:
            with autocast():
                logits = predict(model, image, **options)
        else:
            logits = predict(model, image, **options)
        pred = logits.argmax(1)
        conf += confusion_matrix(pred, target, num_classes, ignore_index)
        if weak:
            weak_out.append(weak_scores(model, image, pad_multiple))
            weak_true.append(present_classes(target, num_classes))
        for i in range(min(len(image), keep - len(kept))):
            kept.append((image[i].cpu(), target[i].cpu(), pred[i].cpu()))
    model.train(was_training)
    conf = ddp.sum_over_ranks(conf).cpu()
    result = scores(conf)
    result["confusion"] = conf
    result["mode"] = mode
    if mode == "slide":
        result["crop_size"], result["stride"] = crop_size, stride
    else:
        result["pad_multiple"] = pad_multiple
    result["samples"] = kept
    if weak:
        outs = ddp.gather_rows(torch.cat(weak_out) if weak_out else torch.zeros(0, num_classes - 1))
        trues = ddp.gather_rows(torch.cat(weak_true) if weak_true else torch.zeros(0, num_classes - 1))
        result["weak_map"] = mean_average_precision(outs.numpy(), trues.numpy())
    return result
