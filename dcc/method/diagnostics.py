"""What the consistency branch did in a step: the figures a researcher needs to understand CAC.

Logged under ``diag/`` at the log interval (never used for training, never computed when nothing is
logged). Per direction ``a -> p`` (``12``: anchors in view 1, positives in view 2; ``21``: the reverse),
over the N overlap cells of the batch:

- ``dir_pass_<d>``: share of overlap cells passing the directional mask of Eq. (2), ``conf_a < conf_p``;
- ``pf_pass_<d>``: share passing the positive filter of Eq. (7), ``conf_p > gamma``;
- ``anchor_share_<d>``: share passing every mask in use (the anchors of ``l(a -> p)``);
- ``anchor_fg_<d>``: share of those anchors whose positive's pseudo-label is not class 0 (background);
- ``negatives_per_anchor_<d>``: mean number of negatives an anchor keeps after negative sampling (Eq. 5;
  the whole bank without it);
- ``pos_cos_<d>``: mean cosine similarity of an anchor and its positive (features are L2-normalised);
- with ground truth for the unlabeled images (embedded scenes; VOC unlabeled images under ``aug``):
  ``pseudo_acc`` (pseudo-label accuracy on the overlap cells of both views) and ``anchor_target_acc_<d>``
  (accuracy of the positive's pseudo-label on the anchors: the label the loss pulls the anchor towards).

A cell's ground truth is the majority class of its ``stride x stride`` pixels, ignored when fewer than half
of them are labeled. Every value is a 0-d tensor (no device sync here); empty sets give 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["cell_labels", "consistency_diagnostics"]


def _mean(values: Tensor, mask: Tensor | None = None) -> Tensor:
    values = values.float()
    if mask is None:
        return values.sum() / max(values.numel(), 1)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def cell_labels(mask: Tensor, stride: int, num_classes: int, ignore_index: int) -> Tensor:
    """Majority class of each ``stride x stride`` cell of ``mask`` [B, H, W] -> long [B, H/s, W/s];
    ``ignore_index`` where under half of the cell's pixels are labeled."""
    valid = mask != ignore_index
    onehot = F.one_hot(torch.where(valid, mask, 0).long(), num_classes).permute(0, 3, 1, 2).float()
    onehot = onehot * valid.unsqueeze(1)
    share = F.avg_pool2d(onehot, stride)  # [B, K, h, w]
    labels = share.argmax(1)
    return torch.where(share.sum(1) >= 0.5, labels, torch.full_like(labels, ignore_index))


def consistency_diagnostics(
    feat1: Tensor, feat2: Tensor, conf1: Tensor, conf2: Tensor, label1: Tensor, label2: Tensor, neg_label: Tensor,
    *, pos_threshold: float, directional: bool, positive_filtering: bool, negative_sampling: bool,
    num_classes: int, gt1: Tensor | None = None, gt2: Tensor | None = None, ignore_index: int = 255,
) -> dict[str, Tensor]:
    """The ``diag/`` figures of one step from the overlap cells (rows of ``feat1``/``feat2`` [N, C], ``conf*``,
    ``label*`` [N]), the bank's labels ``neg_label`` [M] and, optionally, the cells' ground truth ``gt1``/``gt2`` [N]."""
    with torch.no_grad():
        counts = torch.bincount(neg_label.long(), minlength=num_classes)  # negatives per pseudo-label
        cos = (feat1.float() * feat2.float()).sum(1)
        out: dict[str, Tensor] = {}
        directions = (("12", conf1, conf2, label1, label2, gt1), ("21", conf2, conf1, label2, label1, gt2))
        for name, conf_a, conf_p, label_a, label_p, gt_a in directions:
            dir_ok = conf_a < conf_p
            pf_ok = conf_p > pos_threshold
            anchors = torch.ones_like(dir_ok)
            if directional:
                anchors &= dir_ok
            if positive_filtering:
                anchors &= pf_ok
            kept = neg_label.numel() - counts[label_a] if negative_sampling else torch.full_like(label_a, neg_label.numel())
            out |= {
                f"dir_pass_{name}": _mean(dir_ok), f"pf_pass_{name}": _mean(pf_ok), f"anchor_share_{name}": _mean(anchors),
                f"anchor_fg_{name}": _mean(label_p != 0, anchors), f"negatives_per_anchor_{name}": _mean(kept, anchors),
                f"pos_cos_{name}": _mean(cos, anchors),
            }
            if gt_a is not None:
                known = anchors & (gt_a != ignore_index)
                out[f"anchor_target_acc_{name}"] = _mean(label_p == gt_a, known)
        if gt1 is not None and gt2 is not None:
            known = torch.cat([gt1, gt2]) != ignore_index
            out["pseudo_acc"] = _mean(torch.cat([label1 == gt1, label2 == gt2]), known)
    return out
