"""The segmentation model: backbone -> head -> classifier, plus the projector Phi of the consistency branch
and, in the weakly-supervised setting, the image-level classifier C_w."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dcc.method.models.backbone import Backbone


class Projector(nn.Module):
    """Phi: 1x1 conv d->d, ReLU, 1x1 conv d->proj_dim (no BN), as in the authors' code."""

    def __init__(self, channels: int, proj_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, channels, 1), nn.ReLU(inplace=True), nn.Conv2d(channels, proj_dim, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Segmentor(nn.Module):
    def __init__(
        self,
        backbone: Backbone,
        head: nn.Module,
        num_classes: int,
        *,
        classifier_dropout: float,
        proj_dim: int | None,
        consistency_stride: int,
        weak_classes: int = 0,
        align_corners: bool = True,
    ) -> None:
        super().__init__()
        self.align_corners = align_corners  # of the logit upsampling (segnet.align_corners; the authors: True)
        self.backbone = backbone
        self.head = head
        self.classifier_dropout = nn.Dropout(classifier_dropout)
        self.classifier = nn.Conv2d(head.out_channels, num_classes, 1)
        # The heads only CAC has draw their initial weights from a forked RNG: every other weight, and every later
        # random draw (dropout, sampling), is then the same as in a supervised-only model of the same seed, so
        # that SupOnly and CAC runs are identical up to loss.start_step (a paired comparison).
        with torch.random.fork_rng(devices=[]):
            self.projector = Projector(head.out_channels, proj_dim) if proj_dim else None
            # C_w (Eq. 11): global average pooling of the features f, then a linear layer over the foreground classes
            self.weak_classifier = nn.Linear(head.out_channels, weak_classes) if weak_classes else None
        if consistency_stride % head.stride:
            raise ValueError(f"consistency stride {consistency_stride} is not a multiple of the head stride {head.stride}")
        self.consistency_stride = consistency_stride
        self._pool = consistency_stride // head.stride

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The head's feature map f (stride 4 for DeepLabv3+, 8 for PSPNet)."""
        return self.head(*self.backbone(x))

    def classify(self, feats: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.classifier_dropout(feats))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at the input resolution (training, evaluation and prediction alike)."""
        logits = self.classify(self.features(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=self.align_corners)

    def consistency_outputs(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the consistency branch needs from one view, at the consistency stride (8).

        Returns ``(phi, logits)``: the L2-normalised projection Phi(f) (or f itself without the
        projector, ablation row VII) and the classifier's logits on the same cells, computed without
        dropout and without gradient (they only give pseudo-labels and confidences).
        """
        if self._pool > 1:
            feats = F.avg_pool2d(feats, self._pool)
        phi = self.projector(feats) if self.projector is not None else feats
        with torch.no_grad():
            logits = self.classifier(feats.detach())
        return F.normalize(phi, dim=1), logits

    def weak_logits(self, feats: torch.Tensor) -> torch.Tensor:
        """C_w(f): ``[B, K_fg]`` image-level logits from the features ``[B, C, h, w]`` of :meth:`features`."""
        if self.weak_classifier is None:
            raise RuntimeError("this model has no image-level classifier C_w (built with loss.weak=true only)")
        return self.weak_classifier(feats.mean(dim=(2, 3)))

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(backbone parameters, everything else): the backbone's pretrained part (``backbone.body``: the whole timm
        model; for a ViT not its new feature pyramid) trains at lr x backbone_lr_mult."""
        backbone = list(getattr(self.backbone, "body", self.backbone).parameters())
        ids = {id(p) for p in backbone}
        return backbone, [p for p in self.parameters() if id(p) not in ids]

    def param_counts(self) -> dict[str, int]:
        count = lambda m: sum(p.numel() for p in m.parameters()) if m is not None else 0  # noqa: E731
        return {"total": count(self), "backbone": count(self.backbone), "projector": count(self.projector),
                "weak_classifier": count(self.weak_classifier)}
