"""Optimiser with the backbone at ``lr x backbone_lr_mult`` and the poly schedule, stepped every iteration."""

from __future__ import annotations

import torch

from dcc.config import OptimConfig, OptimName, choice
from dcc.method.models.segmentor import Segmentor


def build_optimizer(oc: OptimConfig, model: Segmentor) -> torch.optim.Optimizer:
    """The ``optim`` group's optimiser over the model's two parameter groups, named ``backbone`` and ``head``."""
    backbone, rest = model.param_groups()
    groups = [
        {"params": backbone, "lr": oc.lr * oc.backbone_lr_mult, "name": "backbone"},
        {"params": rest, "lr": oc.lr, "name": "head"},
    ]
    for g in groups:
        g["initial_lr"] = g["lr"]
    name = choice(oc.name, OptimName)
    if name is OptimName.sgd:
        return torch.optim.SGD(groups, lr=oc.lr, momentum=oc.momentum, weight_decay=oc.weight_decay)
    return torch.optim.AdamW(groups, lr=oc.lr, weight_decay=oc.weight_decay)


def poly_scheduler(optimizer: torch.optim.Optimizer, max_steps: int, power: float) -> torch.optim.lr_scheduler.LambdaLR:
    """lr_t = lr_0 * (1 - t / max_steps) ** power."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: max(0.0, 1.0 - t / max_steps) ** power)
