"""The unsupervised branch: two overlapping views -> aligned overlap features -> consistency loss.

``L = L_ce + lambda * L_dc`` (Eq. 8): this module computes ``L_dc`` (or the L2 alignment of ablation
row I) for one batch of unlabeled pairs, and with ``loss.weak=true`` also ``L_w`` of Eq. 10-11 from the
same forward passes (the image-level classifier C_w on each view's features, against the image's labels).

Forward of the views (``trainer.views_in_one_pass``). By default each view goes through the network in
its own call, as in the authors' code (labeled batch, view 1 and view 2: three calls), so that in
training mode every call normalises with its own batch-norm statistics. ``views_in_one_pass=true``
forwards both views as one batch of 2B crops: faster on a GPU, but the BN statistics are then those of
the 2B crops (not the authors' step). Without BN in training mode (frozen BN) both give the same step.

Anchors are the overlap cells inside the real image of both views (``dcc.overlap``); negatives are drawn
from every cell of both views' maps, padded cells included, as the authors do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dcc.bank import NegativeBank, sample_negatives
from dcc.losses import directional_contrastive_loss, l2_alignment_loss, weak_classification_loss
from dcc.models.segmentor import Segmentor
from dcc.overlap import overlap_pairs


@dataclass
class ViewOutputs:
    """What the branch computes for one view: the head's features f [B, C, h4, w4], the normalised
    projection Phi(f) [B, D, h, w] and the classifier's logits [B, K, h, w] (no gradient) at the
    consistency stride."""

    feats: Tensor
    phi: Tensor
    logits: Tensor


class ConsistencyBranch:
    def __init__(self, loss_cfg: Any, *, views_in_one_pass: bool = False) -> None:
        self.cfg = loss_cfg
        self.views_in_one_pass = views_in_one_pass
        self.bank = NegativeBank(loss_cfg.bank_steps)

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
        """Forward view 1 and view 2: two calls (default, the authors' BN statistics) or one call on both."""
        if self.views_in_one_pass:
            feats = model.features(torch.cat([batch["view1"], batch["view2"]])).chunk(2)
        else:
            feats = (model.features(batch["view1"]), model.features(batch["view2"]))
        return tuple(ViewOutputs(f, *model.consistency_outputs(f)) for f in feats)  # type: ignore[return-value]

    def _consistency(self, model: Segmentor, v1: ViewOutputs, v2: ViewOutputs, batch: dict[str, Tensor]
                     ) -> dict[str, Tensor]:
        cfg = self.cfg
        dim = v1.phi.shape[1]
        # One gather for features and logits: rows k of a and b cover the same image pixels (padding excluded).
        a, b, _ = overlap_pairs(
            torch.cat([v1.phi, v1.logits], 1), torch.cat([v2.phi, v2.logits], 1),
            batch["offset1"], batch["offset2"], batch["flip1"], batch["flip2"], model.consistency_stride,
            batch.get("extent1"), batch.get("extent2"),
        )
        feat1, out1 = a[:, :dim], a[:, dim:]
        feat2, out2 = b[:, :dim], b[:, dim:]
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
        return {"loss_u": loss}
