"""Consistency losses of CAC (Lai et al., CVPR 2021).

Notation of the paper (Sec. 3.3-3.4) and how it maps to the arguments below:

* ``phi_o1``, ``phi_o2`` -> ``feat1``, ``feat2``: the L2-normalised projected features of the
  N pixels of the overlapping region, seen in crop 1 and crop 2 (row i of both is the same pixel).
* ``max C(f_o1)``, ``max C(f_o2)`` -> ``conf1``, ``conf2``: the classifier's max softmax
  probability at those pixels; ``y~_o1``, ``y~_o2`` -> ``label1``, ``label2``: its argmax.
* ``F_u`` -> ``neg_feat`` with pseudo-labels ``neg_label``: the negative bank.
* ``r(a, b) = exp(a . b / tau)`` with ``tau`` -> ``temperature``; ``gamma`` -> ``pos_threshold``.

Eq. (1): per direction ``l(a -> p) = -1/|M| sum_i M_i log( r(a_i, p_i) / (r(a_i, p_i) + sum_n r(a_i, n)) )``.
We compute ``-log(.)`` as ``logsumexp([s_ip, s_in ...]) - s_ip`` with ``s = a . b / tau``, which is
exact and stable in float32 even at ``tau = 0.05`` with tens of thousands of negatives. Following the
authors' code, the normaliser ``|M|`` is the number of pixels that pass the mask in the whole batch
(not N, not per image); an empty mask gives an exact zero. Under torch.distributed "the whole batch"
is the global one: ``|M|`` is summed over ranks and the loss scaled by the world size
(``dcc.distributed.global_mean``), so that averaging gradients over ranks gives the gradient of the
single-process loss.
Eq. (2): directional mask ``M_d = 1{conf_a < conf_p}``; with it the positive is detached, so
``l(1 -> 2)`` only back-propagates to ``phi_o1`` (``directional=True``). Without it (ablation row V,
the "vanilla" contrastive loss) the mask is all ones and gradients reach both views.
Eq. (3): ``L_dc = l(1 -> 2) + l(2 -> 1)``: the return value.
Eq. (5): negative sampling: negative n counts for anchor i only if ``y~_i != y~_n``
(``negative_sampling=True``).
Eq. (6)-(7): positive filtering: ``M_{d,pf} = M_d * 1{conf_p > gamma}`` (``positive_filtering=True``).

Negatives, confidences and pseudo-labels never receive gradient.

Weakly-supervised setting (Table 5): Eq. (10) ``L = L_ce + lambda L_dc + lambda_w L_w`` with
Eq. (11) ``L_w = 1/2 (CE(C_w(f_u1), y_p) + CE(C_w(f_u2), y_p))``, where ``C_w`` scores the
foreground classes from a view's globally pooled features and ``y_p`` is the image's label vector
(:func:`weak_classification_loss`). Image-level labels are multi-label (a VOC image often holds a
person and a horse; some hold no foreground class at all), so "CE" here is the per-class binary
cross-entropy with logits, averaged over classes and images (= ``MultiLabelSoftMarginLoss``). A
softmax cross-entropy would make the classes present in one image compete for probability mass and
has no target for an image without foreground.

Cost. The anchors that pass each direction's mask (K of the 2N) are selected before any
similarity is computed, and the negatives are streamed in blocks of ``chunk_size`` columns with an
online log-sum-exp inside a custom autograd function whose backward recomputes block by block.
No [K, M] tensor is ever stored: peak extra memory is about ``K * chunk_size * 5`` bytes in float32
(one float block plus its boolean label mask). ``benchmarks/losses_chunked.py`` keeps the released code's
strategy (all pixels x 8,000-column checkpointed blocks, mask applied afterwards) as a baseline;
see ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dcc.distributed import global_mean, world_size

__all__ = ["anchor_mask", "cross_entropy", "directional_contrastive_loss", "l2_alignment_loss", "weak_classification_loss"]


def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int) -> Tensor:
    """Supervised loss: mean cross-entropy over the pixels that are not ``ignore_index``.

    Under torch.distributed, the mean over those pixels of the global batch (their count summed over
    ranks, see ``dcc.distributed.global_mean``): ranks hold different numbers of valid pixels, so the
    mean of per-rank means would not be the single-process loss.
    """
    if world_size() == 1:
        return F.cross_entropy(logits, target, ignore_index=ignore_index)
    total = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    return global_mean(total, (target != ignore_index).sum())


def anchor_mask(
    conf_a: Tensor,
    conf_p: Tensor,
    *,
    pos_threshold: float,
    directional: bool,
    positive_filtering: bool,
) -> Tensor:
    """Boolean [N] mask of the anchors that enter ``l(a -> p)``: Eq. (2) and Eq. (7)."""
    mask = torch.ones_like(conf_a, dtype=torch.bool)
    if directional:
        mask &= conf_a < conf_p
    if positive_filtering:
        mask &= conf_p > pos_threshold
    return mask


def _chunk_logits(
    scaled_anchor: Tensor,
    anchor_label: Tensor,
    neg_chunk: Tensor,
    neg_label_chunk: Tensor,
    negative_sampling: bool,
) -> Tensor:
    """Logits ``a . n / tau`` of one [K, B] block, same-label negatives set to ``-inf`` (Eq. 5).

    The label mask is a boolean comparison of this block only; it is never stored as a float.
    """
    logits = scaled_anchor @ neg_chunk.t()
    if negative_sampling:
        logits.masked_fill_(anchor_label.unsqueeze(1) == neg_label_chunk.unsqueeze(0), float("-inf"))
    return logits


class _StreamingInfoNCE(torch.autograd.Function):
    """Per-anchor ``-log(r(a,p) / (r(a,p) + sum_n M_n r(a,n)))`` (Eq. 1/5) without any [K, M] tensor.

    Forward streams the negatives in column chunks with an online log-sum-exp (running max and
    rescaled running sum, as in memory-efficient attention); only the per-anchor ``lse`` [K] is
    saved. Backward recomputes each chunk and accumulates ``softmax @ negatives``:

        d loss_k / d a_k = ( sum_n w_kn n + (w_kp - 1) p_k ) / tau,   w = exp(s - lse)
        d loss_k / d p_k = (w_kp - 1) a_k / tau

    Negatives and labels get no gradient. Peak extra memory is O(K * chunk_size).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        anchor: Tensor,
        positive: Tensor,
        anchor_label: Tensor,
        neg_feat: Tensor,
        neg_label: Tensor,
        temperature: float,
        negative_sampling: bool,
        chunk_size: int,
    ) -> Tensor:
        inv_tau = 1.0 / temperature
        scaled = anchor * inv_tau
        pos = (scaled * positive).sum(dim=1)  # [K]
        run_max = pos.clone()
        run_sum = torch.ones_like(pos)  # exp(pos - run_max)
        for start in range(0, neg_feat.shape[0], chunk_size):
            stop = start + chunk_size
            logits = _chunk_logits(scaled, anchor_label, neg_feat[start:stop], neg_label[start:stop], negative_sampling)
            new_max = torch.maximum(run_max, logits.amax(dim=1))  # finite: run_max >= pos
            run_sum = run_sum * torch.exp(run_max - new_max) + logits.sub_(new_max.unsqueeze(1)).exp_().sum(dim=1)
            run_max = new_max
            del logits  # free this block before the next one is allocated
        lse = run_max + run_sum.log()
        ctx.save_for_backward(anchor, positive, anchor_label, neg_feat, neg_label, lse, pos)
        ctx.temperature = temperature
        ctx.negative_sampling = negative_sampling
        ctx.chunk_size = chunk_size
        return lse - pos

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor
    ) -> tuple[Tensor | None, ...]:
        anchor, positive, anchor_label, neg_feat, neg_label, lse, pos = ctx.saved_tensors
        inv_tau = 1.0 / ctx.temperature
        coeff = (grad_out * inv_tau).unsqueeze(1)  # [K, 1]
        pos_weight = torch.exp(pos - lse).sub_(1.0).unsqueeze(1)  # w_kp - 1, [K, 1]
        grad_anchor = grad_positive = None
        if ctx.needs_input_grad[0]:
            scaled = anchor * inv_tau
            acc = pos_weight * positive  # [K, C]
            for start in range(0, neg_feat.shape[0], ctx.chunk_size):
                stop = start + ctx.chunk_size
                neg_chunk = neg_feat[start:stop]
                w = _chunk_logits(scaled, anchor_label, neg_chunk, neg_label[start:stop], ctx.negative_sampling)
                w.sub_(lse.unsqueeze(1)).exp_()  # softmax weights of this block; masked -> 0
                acc.addmm_(w, neg_chunk)
                del w
            grad_anchor = acc.mul_(coeff)
        if ctx.needs_input_grad[1]:
            grad_positive = pos_weight * coeff * anchor
        return grad_anchor, grad_positive, None, None, None, None, None, None


def _info_nce_per_anchor(
    anchor: Tensor,
    positive: Tensor,
    anchor_label: Tensor,
    neg_feat: Tensor,
    neg_label: Tensor,
    *,
    temperature: float,
    negative_sampling: bool,
    chunk_size: int,
) -> Tensor:
    """Per-anchor Eq. (1)/(5) loss, shape [K], streamed over ``chunk_size`` negatives at a time.

    ``neg_feat`` must be detached. With K == 0 the result is an empty tensor still connected to
    ``anchor``/``positive`` (its sum is an exact 0 that back-propagates zeros).
    """
    if anchor.shape[0] == 0:
        return (anchor * positive).sum(dim=1)
    return _StreamingInfoNCE.apply(
        anchor, positive, anchor_label, neg_feat, neg_label, temperature, negative_sampling, chunk_size
    )


def _select_anchors(mask: Tensor) -> Tensor:
    """Indices of the ``True`` entries of a boolean [N] mask."""
    return mask.nonzero(as_tuple=False).squeeze(1)


def directional_contrastive_loss(
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
    chunk_size: int = 4096,
) -> Tensor:
    """Directional contrastive loss ``L_dc = l(1 -> 2) + l(2 -> 1)`` (Eq. 1-7), a scalar.

    Args:
        feat1: [N, C] L2-normalised features of the overlap pixels in view 1 (``phi_o1``).
        feat2: [N, C] the same pixels in view 2 (``phi_o2``).
        conf1: [N] max softmax confidence in view 1 (constant).
        conf2: [N] max softmax confidence in view 2 (constant).
        label1: [N] long pseudo-labels in view 1 (constant).
        label2: [N] long pseudo-labels in view 2 (constant).
        neg_feat: [M, C] L2-normalised negatives (``F_u``); detached here.
        neg_label: [M] long pseudo-labels of the negatives.
        temperature: ``tau`` in ``r(a, b) = exp(a . b / tau)``.
        pos_threshold: ``gamma`` of Eq. (7).
        directional: apply the directional mask of Eq. (2) and stop the gradient to the positive.
        negative_sampling: drop negatives sharing the anchor's pseudo-label (Eq. 5).
        positive_filtering: keep only anchors whose positive has ``conf > gamma`` (Eq. 7).
        chunk_size: negatives per streamed block; peak extra memory is about
            ``K x chunk_size`` floats (plus a boolean mask of that shape with negative sampling)
            for the K anchors that pass the masks. Changes the result only by float rounding.

    Returns:
        Scalar tensor. Each direction is averaged over the pixels passing its mask in the whole
        batch; a direction with no such pixel contributes an exact 0 (never NaN).

    Implementation: the anchors passing each direction's mask are selected first (masked-out
    pixels cost nothing), both directions are stacked into one batch of K = K12 + K21 anchors
    and a single streaming pass over the negatives (``_StreamingInfoNCE``) gives the per-anchor
    losses, which are then averaged per direction.
    """
    neg_feat = neg_feat.detach()
    neg_label = neg_label.detach()
    conf1, conf2 = conf1.detach(), conf2.detach()
    label1, label2 = label1.detach(), label2.detach()
    # Eq. (2): with the directional mask, l(a -> p) only back-propagates to the anchor.
    pos_of_1, pos_of_2 = (feat2.detach(), feat1.detach()) if directional else (feat2, feat1)

    masks = dict(pos_threshold=pos_threshold, directional=directional, positive_filtering=positive_filtering)
    idx12 = _select_anchors(anchor_mask(conf1, conf2, **masks))  # anchors of l(1 -> 2)
    idx21 = _select_anchors(anchor_mask(conf2, conf1, **masks))  # anchors of l(2 -> 1)
    k12, k21 = idx12.numel(), idx21.numel()

    per_anchor = _info_nce_per_anchor(
        torch.cat([feat1.index_select(0, idx12), feat2.index_select(0, idx21)]),
        torch.cat([pos_of_1.index_select(0, idx12), pos_of_2.index_select(0, idx21)]),
        torch.cat([label1.index_select(0, idx12), label2.index_select(0, idx21)]),
        neg_feat,
        neg_label,
        temperature=temperature,
        negative_sampling=negative_sampling,
        chunk_size=chunk_size,
    )
    # Per-direction mean over the masked pixels (of every rank); an empty direction sums to an exact,
    # still-connected 0.
    totals = torch.stack([per_anchor[:k12].sum(), per_anchor[k12:].sum()])
    return global_mean(totals, [k12, k21], min_count=1).sum()


def l2_alignment_loss(feat1: Tensor, feat2: Tensor) -> Tensor:
    """Ablation row I of Table 3: align positive pairs with an L2 loss instead of Eq. (1).

    Returns the mean over the N overlap pixels of ``||feat1_i - feat2_i||^2``, with gradients to
    both views; exact 0 (connected to both inputs) when N == 0. Under torch.distributed N is summed over
    ranks (see ``dcc.distributed.global_mean``).
    """
    sq = (feat1 - feat2).pow(2).sum(dim=1)  # [N]
    return global_mean(sq.sum(), sq.numel(), min_count=1)


def weak_classification_loss(logits1: Tensor, logits2: Tensor, targets: Tensor) -> Tensor:
    """Eq. (11): ``L_w = 1/2 (CE(C_w(f_u1), y_p) + CE(C_w(f_u2), y_p))``.

    logits1, logits2: ``C_w`` of the two views, ``[B, K]`` over the K foreground classes;
    targets: ``y_p``, ``[B, K]`` in {0, 1}. "CE" is the multi-label form: binary cross-entropy with
    logits per class, mean over the B x K entries (see the module docstring for why). Every rank holds
    the same number of entries, so under torch.distributed the average of the ranks' gradients is
    already the gradient of the global mean.
    """
    targets = targets.to(logits1.dtype)
    return 0.5 * (F.binary_cross_entropy_with_logits(logits1, targets)
                  + F.binary_cross_entropy_with_logits(logits2, targets))
