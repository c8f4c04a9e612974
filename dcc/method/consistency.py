"""The unsupervised branch: two overlapping views -> aligned overlap features -> consistency loss.

``L = L_ce + lambda * L_dc`` (Eq. 8): this module computes ``L_dc`` (or the L2 alignment of ablation
row I) for one batch of unlabeled pairs, and with ``loss.weak=true`` also ``L_w`` of Eq. 10-11 from the
same forward passes (the image-level classifier C_w on each view's features, against the image's labels).

Batch-norm statistics of the views (``trainer.view_bn``). The authors forward the labeled batch, view 1
and view 2 in three separate encoder calls, so in training mode each view is normalised with its own batch
statistics. ``per_view`` (default) gives exactly that: both views go through the network as one batch of 2B
crops, but every BN layer normalises each view's half with its own statistics (``dcc.method.models.grouped_bn``),
the same outputs, gradients and running statistics as two calls at the cost of about one. ``shared`` lets
BN compute its statistics over all 2B crops (not the authors' step; no faster on CPU, see docs/performance.md). With BN frozen
(eval mode) both are the same step.

Anchors are the overlap cells inside the real image of both views (``dcc.method.overlap``); negatives are drawn
from every cell of both views' maps, padded cells included, as the authors do.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

from dcc.config import LossConfig
from dcc.method.bank import NegativeBank, sample_negatives
from dcc.method.diagnostics import cell_labels, consistency_diagnostics
from dcc.method.losses import directional_contrastive_loss, l2_alignment_loss, weak_classification_loss
from dcc.method.models.grouped_bn import per_group_batch_norm
from dcc.method.models.segmentor import Segmentor
from dcc.method.overlap import overlap_pairs


@dataclass
class ViewOutputs:
    """What the branch computes for one view: the head's features f [B, C, h4, w4], the normalised
    projection Phi(f) [B, D, h, w] and the classifier's logits [B, K, h, w] (no gradient) at the
    consistency stride."""

    feats: Tensor
    phi: Tensor
    logits: Tensor


class ConsistencyBranch:
    def __init__(self, loss_cfg: LossConfig, *, shared_bn: bool = False, diagnostics: bool = False, num_classes: int = 0,
                 ignore_index: int = 255) -> None:
        """``diagnostics``: also return the ``diag/...`` figures of :mod:`dcc.method.diagnostics` (never used for the
        loss); with ``mask1``/``mask2`` in the batch (ground truth of the views) the pseudo-label accuracy too."""
        self.cfg = loss_cfg
        self.shared_bn = shared_bn
        self.bank = NegativeBank(loss_cfg.bank_steps)
        self.diagnostics = diagnostics
        self.num_classes = num_classes
        self.ignore_index = ignore_index

    def __call__(self, model: Segmentor, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Returns ``{"loss_u": scalar}`` (before the weight lambda) and, with ``loss.weak``, ``"loss_w"``
        (before lambda_w)."""
        v1, v2 = self.view_outputs(model, batch)
        terms = {}
        if self.cfg.weak:
            weak1, weak2 = (model.weak_logits(v.feats).float() for v in (v1, v2))
            terms["loss_w"] = weak_classification_loss(weak1, weak2, batch["image_labels"])
        return terms | self._consistency(model, v1, v2, batch)

    def view_outputs(self, model: Segmentor, batch: dict[str, Tensor]) -> tuple[ViewOutputs, ViewOutputs]:
        """Forward view 1 and view 2 in one pass: each with its own BN statistics (default, the authors'), or
        with statistics shared over both (``shared_bn``)."""
        views = torch.cat([batch["view1"], batch["view2"]])
        with contextlib.nullcontext() if self.shared_bn else per_group_batch_norm(model, 2):
            feats = model.features(views).chunk(2)
        return tuple(ViewOutputs(f, *model.consistency_outputs(f)) for f in feats)  # type: ignore[return-value]

    def _consistency(self, model: Segmentor, v1: ViewOutputs, v2: ViewOutputs, batch: dict[str, Tensor]
                     ) -> dict[str, Tensor]:
        cfg = self.cfg
        dim, classes = v1.phi.shape[1], v1.logits.shape[1]
        stride = model.consistency_stride
        maps = [torch.cat([v.phi, v.logits], 1) for v in (v1, v2)]
        truth = self.diagnostics and "mask1" in batch
        if truth:  # the views' ground truth per cell rides along in the same gather (diagnostics only)
            maps = [torch.cat([m, cell_labels(batch[k], stride, self.num_classes, self.ignore_index).unsqueeze(1).to(m)], 1)
                    for m, k in zip(maps, ("mask1", "mask2"))]
        # One gather for features and logits: rows k of a and b cover the same image pixels (padding excluded).
        a, b, _ = overlap_pairs(*maps, batch["offset1"], batch["offset2"], batch["flip1"], batch["flip2"], stride,
                                batch.get("extent1"), batch.get("extent2"))
        feat1, out1 = a[:, :dim], a[:, dim : dim + classes]
        feat2, out2 = b[:, :dim], b[:, dim : dim + classes]
        if not cfg.cl:
            return {"loss_u": l2_alignment_loss(feat1, feat2)}
        conf1, label1 = out1.softmax(1).max(1)
        conf2, label2 = out2.softmax(1).max(1)
        # selected_num negatives from each view of this batch (any cell, padding included) join the bank
        sampled = [sample_negatives(v.phi, v.logits.argmax(1), cfg.selected_num) for v in (v1, v2)]
        self.bank.push(torch.cat([f for f, _ in sampled]), torch.cat([l for _, l in sampled]))
        neg_feat, neg_label = self.bank.negatives()
        loss = directional_contrastive_loss(
            feat1, feat2, conf1, conf2, label1, label2, neg_feat, neg_label,
            temperature=cfg.temperature, pos_threshold=cfg.pos_threshold,
            directional=cfg.dir, negative_sampling=cfg.ns, positive_filtering=cfg.pf,
        )
        if not self.diagnostics:
            return {"loss_u": loss}
        gt1, gt2 = (a[:, -1].long(), b[:, -1].long()) if truth else (None, None)
        diag = consistency_diagnostics(
            feat1, feat2, conf1, conf2, label1, label2, neg_label, pos_threshold=cfg.pos_threshold,
            directional=cfg.dir, positive_filtering=cfg.pf, negative_sampling=cfg.ns, num_classes=classes,
            gt1=gt1, gt2=gt2, ignore_index=self.ignore_index,
        )
        return {"loss_u": loss} | {f"diag/{k}": v for k, v in diag.items()}
