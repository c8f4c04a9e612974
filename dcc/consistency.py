"""The unsupervised branch: two overlapping views -> aligned overlap features -> consistency loss.

``L = L_ce + lambda * L_dc`` (Eq. 8): this module computes ``L_dc`` (or the L2 alignment of ablation
row I) for one batch of unlabeled pairs, and with ``loss.weak=true`` also ``L_w`` of Eq. 10-11 from the
same forward pass (the image-level classifier C_w on each view's features, against the image's labels).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dcc.bank import NegativeBank, sample_negatives
from dcc.losses import directional_contrastive_loss, l2_alignment_loss, weak_classification_loss
from dcc.models.segmentor import Segmentor
from dcc.overlap import overlap_pairs


class ConsistencyBranch:
    def __init__(self, loss_cfg: Any) -> None:
        self.cfg = loss_cfg
        self.bank = NegativeBank(loss_cfg.bank_steps)

    def __call__(self, model: Segmentor, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Returns ``{"loss_u": scalar}`` (before the weight lambda) and, with ``loss.weak``, ``"loss_w"``
        (before lambda_w)."""
        terms = {}
        views = torch.cat([batch["view1"], batch["view2"]])
        feats = model.features(views)
        if self.cfg.weak:
            weak1, weak2 = model.weak_logits(feats).float().chunk(2)
            terms["loss_w"] = weak_classification_loss(weak1, weak2, batch["image_labels"])
        return terms | self._consistency(model, feats, batch)

    def _consistency(self, model: Segmentor, feats: Tensor, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        cfg = self.cfg
        phi, logits = model.consistency_outputs(feats)
        phi1, phi2 = phi.chunk(2)
        logits1, logits2 = logits.chunk(2)
        dim = phi.shape[1]
        # One gather for features and logits: rows k of a and b cover the same image pixels.
        a, b, _ = overlap_pairs(
            torch.cat([phi1, logits1], 1), torch.cat([phi2, logits2], 1),
            batch["offset1"], batch["offset2"], batch["flip1"], batch["flip2"], model.consistency_stride,
        )
        feat1, out1 = a[:, :dim], a[:, dim:]
        feat2, out2 = b[:, :dim], b[:, dim:]
        if not cfg.cl:
            return {"loss_u": l2_alignment_loss(feat1, feat2)}
        conf1, label1 = out1.softmax(1).max(1)
        conf2, label2 = out2.softmax(1).max(1)
        labels = logits.argmax(1)
        # selected_num negatives from each view of this batch join the bank of the last bank_steps steps
        sampled = [sample_negatives(p, l, cfg.selected_num) for p, l in zip(phi.chunk(2), labels.chunk(2))]
        self.bank.push(torch.cat([f for f, _ in sampled]), torch.cat([l for _, l in sampled]))
        neg_feat, neg_label = self.bank.negatives()
        loss = directional_contrastive_loss(
            feat1, feat2, conf1, conf2, label1, label2, neg_feat, neg_label,
            temperature=cfg.temperature, pos_threshold=cfg.pos_threshold,
            directional=cfg.dir, negative_sampling=cfg.ns, positive_filtering=cfg.pf,
        )
        return {"loss_u": loss}
