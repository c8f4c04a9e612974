"""Self-training baseline (Table 3, ST), offline as the authors describe it:
train a supervised-only teacher, pseudo-label the unlabeled images, retrain on labeled + pseudo-labeled."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dcc.engine import checkpoint as ckpt
from dcc.config import Method
from dcc.data.build import DataBundle, eval_loader
from dcc.engine.evaluate import predict_whole
from dcc.engine.metrics import percent
from dcc.method.models import Segmentor, build_model
from dcc.engine.trainer import FitResult, fit

log = logging.getLogger(__name__)


class SubsetSource:
    """Images ``indices`` of a source (a Source: ``load(i) -> (image, mask)``) with other masks: the teacher's
    pseudo-labels, or none (a dummy all-zero mask: the eval loader expects one)."""

    def __init__(self, base: Any, indices: np.ndarray, masks: list[np.ndarray] | None = None) -> None:
        self.base, self.indices, self.masks = base, indices, masks
        self.kept: float | None = None  # pseudo-labels: the share of pixels at or above loss.st_threshold

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        image, _ = self.base.load(int(self.indices[i]))
        return image, self.masks[i] if self.masks is not None else np.zeros(image.shape[:2], dtype=np.uint8)


@torch.no_grad()
def pseudo_label(model: Segmentor, cfg: Any, data: DataBundle, device: torch.device) -> SubsetSource:
    """Argmax of the teacher at native resolution; pixels under ``loss.st_threshold`` confidence become ignore."""
    model.eval()
    loader = eval_loader(cfg.dataset, cfg.trainer, SubsetSource(data.train, data.unlabeled), device, sharded=False)
    masks: list[np.ndarray] = []
    kept = torch.zeros((), dtype=torch.float64)
    for image, _ in loader:
        prob = predict_whole(model, image.to(device)).softmax(1)
        conf, label = prob.max(1)
        low = conf < cfg.loss.st_threshold
        label[low] = cfg.dataset.ignore_index
        kept += (~low).sum().cpu()
        masks.extend(label.to(torch.uint8).cpu().numpy())
    source = SubsetSource(data.train, data.unlabeled, masks)
    source.kept = float(kept) / max(1, sum(m.size for m in masks))
    return source


def self_train(cfg: Any, data: DataBundle, device: torch.device, tracker: Any, run_dir: Path, *,
               backbone_weights: str | None = None) -> FitResult:
    """Teacher (or ``loss.teacher_checkpoint``), pseudo-labels, student; ``backbone_weights`` as in :func:`fit`."""
    if cfg.loss.teacher_checkpoint:
        teacher = build_model(cfg, backbone_weights=backbone_weights).to(device)
        state = ckpt.load(cfg.loss.teacher_checkpoint)
        teacher.load_state_dict(state.get("model", state))
        log.info("self-training: teacher from %s", cfg.loss.teacher_checkpoint)
    else:
        teacher = fit(cfg, data, device, tracker, run_dir / "teacher", prefix="teacher/", method=Method.suponly,
                      backbone_weights=backbone_weights,
                      test=False).model  # the test split measures the student (the run's result) only
    pseudo = pseudo_label(teacher, cfg, data, device)
    del teacher
    tracker.log_metrics({"st/pseudo_kept": percent(pseudo.kept)}, 0)
    log.info("self-training: %.1f %% of the unlabeled pixels keep a pseudo-label (loss.st_threshold=%s)%s",
             percent(pseudo.kept), cfg.loss.st_threshold,
             "; the pseudo-labeled images get the unlabeled views' augmentation" if cfg.loss.get("st_unlabeled_aug") else "")
    return fit(cfg, data, device, tracker, run_dir, method=Method.suponly, backbone_weights=backbone_weights,
               extra_labeled=(pseudo, np.arange(len(pseudo))))
