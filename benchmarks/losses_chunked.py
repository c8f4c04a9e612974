"""The authors' memory strategy for the directional contrastive loss, kept as a reference baseline.

The released CAC code computes, for *every* overlap pixel and for both directions, the
similarities to all negatives in blocks of 8,000 columns, each block under activation
checkpointing; the first block also yields a per-anchor stabiliser (row max over the positive
and that block's logits, same-label negatives included). Only at the end are the per-pixel
losses multiplied by the directional and positive-filtering mask (Eq. 2 and 7) and averaged over
the masked pixels. The value equals :func:`dcc.method.losses.directional_contrastive_loss` (up to float
rounding); the differences are cost only: masked-out pixels are still compared with every
negative, the label mask is materialised as a float [N, 8000] block, and every block's
intermediates are rebuilt under autograd during backward.

Used by ``benchmarks/loss_bench.py`` and the tests; the training code should use
:func:`dcc.method.losses.directional_contrastive_loss`. Unlike the released code this version has no
``eps`` inside the log and uses ``log(sum) - (pos - max)`` instead of ``-log(exp(pos - max) /
sum)``, so that both implementations compute the same function.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from dcc.method.losses import anchor_mask

__all__ = ["chunked_directional_contrastive_loss"]


def _label_mask(anchor_label: Tensor, neg_label: Tensor, negative_sampling: bool, dtype: torch.dtype) -> Tensor:
    """Float [N, B] mask of the negatives kept for each anchor (Eq. 5), as in the released code."""
    if negative_sampling:
        return (anchor_label.unsqueeze(1) != neg_label.unsqueeze(0)).to(dtype)
    return torch.ones(anchor_label.shape[0], neg_label.shape[0], dtype=dtype, device=anchor_label.device)


def _first_block(
    pos: Tensor, anchor: Tensor, neg: Tensor, neg_label: Tensor, anchor_label: Tensor, temperature: float, ns: bool
) -> tuple[Tensor, Tensor]:
    """Sum of masked ``exp(logit - max)`` over [positive, first block], and the row max [N, 1]."""
    logits = torch.cat([pos, anchor @ neg.t() / temperature], dim=1)  # [N, 1 + B]
    ones = torch.ones(anchor.shape[0], 1, dtype=anchor.dtype, device=anchor.device)
    mask = torch.cat([ones, _label_mask(anchor_label, neg_label, ns, anchor.dtype)], dim=1)
    row_max = logits.max(dim=1, keepdim=True)[0]
    return (torch.exp(logits - row_max) * mask).sum(dim=1), row_max


def _next_block(
    anchor: Tensor, neg: Tensor, neg_label: Tensor, anchor_label: Tensor, row_max: Tensor, temperature: float, ns: bool
) -> Tensor:
    """Sum of masked ``exp(logit - max)`` over one later block of negatives, [N]."""
    logits = anchor @ neg.t() / temperature
    return (torch.exp(logits - row_max) * _label_mask(anchor_label, neg_label, ns, anchor.dtype)).sum(dim=1)


def _all_pixel_losses(
    anchor: Tensor,
    positive: Tensor,
    anchor_label: Tensor,
    neg_feat: Tensor,
    neg_label: Tensor,
    temperature: float,
    negative_sampling: bool,
    chunk_size: int,
) -> Tensor:
    """Per-pixel ``-log(r(a,p) / (r(a,p) + sum_n M_n r(a,n)))`` for all N pixels (no mask), [N]."""
    pos = (anchor * positive).sum(dim=1, keepdim=True) / temperature  # [N, 1]
    denom, row_max = checkpoint(
        _first_block, pos, anchor, neg_feat[:chunk_size], neg_label[:chunk_size], anchor_label,
        temperature, negative_sampling, use_reentrant=False,
    )
    for start in range(chunk_size, neg_feat.shape[0], chunk_size):
        stop = start + chunk_size
        denom = denom + checkpoint(
            _next_block, anchor, neg_feat[start:stop], neg_label[start:stop], anchor_label, row_max,
            temperature, negative_sampling, use_reentrant=False,
        )
    return torch.log(denom) - (pos - row_max).squeeze(1)


def chunked_directional_contrastive_loss(
    feat1: Tensor,
    feat2: Tensor,
    conf1: Tensor,
    conf2: Tensor,
    label1: Tensor,
    label2: Tensor,
    neg_feat: Tensor,
    neg_label: Tensor,
    *,
    temperature: float,
    pos_threshold: float,
    directional: bool,
    negative_sampling: bool,
    positive_filtering: bool,
    chunk_size: int = 8000,
) -> Tensor:
    """``L_dc = l(1 -> 2) + l(2 -> 1)`` (Eq. 1-7) with the released code's compute strategy.

    Same arguments and result as :func:`dcc.method.losses.directional_contrastive_loss`; ``chunk_size``
    is the number of negative columns per checkpointed block (8,000 in the released code).
    """
    neg_feat, neg_label = neg_feat.detach(), neg_label.detach()
    conf1, conf2 = conf1.detach(), conf2.detach()
    label1, label2 = label1.detach(), label2.detach()
    total = feat1.new_zeros(())
    for anchor, positive, conf_a, conf_p, label_a in (
        (feat1, feat2, conf1, conf2, label1),
        (feat2, feat1, conf2, conf1, label2),
    ):
        if directional:
            positive = positive.detach()
        losses = _all_pixel_losses(
            anchor, positive, label_a, neg_feat, neg_label, temperature, negative_sampling, chunk_size
        )
        # Eq. (2) and (7), applied after every pixel's loss is computed (as the released code does)
        mask = anchor_mask(conf_a, conf_p, pos_threshold=pos_threshold, directional=directional,
                            positive_filtering=positive_filtering).to(losses.dtype)
        total = total + (losses * mask).sum() / mask.sum().clamp(min=1.0)
    return total
