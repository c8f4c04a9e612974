"""Batch norm with per-group statistics: G batches through the network in one pass, each normalised as if alone.

The authors forward each unlabeled view in its own encoder call, so in training mode every view is normalised
with its own batch statistics. Convolutions, ReLU and pooling treat the images of a batch independently; only
batch-norm layers mix them. Inside :func:`per_group_batch_norm`, every BN layer splits its input into
``groups`` equal chunks along the batch and normalises each chunk with that chunk's statistics, updating its
running statistics chunk after chunk: outputs, gradients and running statistics are those of ``groups``
separate calls (up to float rounding of the convolutions), while the convolutions run once on the whole batch,
which on small CPU batches costs about half of two separate calls. Under several processes the BN layers are
``dcc.method.models.sync_bn.SyncGroupedBatchNorm``, which reads ``dcc_groups`` itself: each group's statistics
over all ranks, all groups in one collective per layer (forward and backward).
"""

from __future__ import annotations

from contextlib import contextmanager
from types import MethodType
from typing import Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["per_group_batch_norm"]


def _grouped_forward(self: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    forward = type(self).forward
    groups = getattr(self, "dcc_groups", 1)
    if groups == 1:
        return forward(self, x)
    return torch.cat([forward(self, chunk) for chunk in x.chunk(groups)])


@contextmanager
def per_group_batch_norm(model: nn.Module, groups: int) -> Iterator[None]:
    """Within the block, each BN layer of ``model`` normalises ``groups`` equal batch chunks separately."""
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    for m in layers:
        # installed once (a plain BN forward while dcc_groups == 1); the synchronized BN groups by itself
        if "forward" not in m.__dict__ and not getattr(m, "handles_groups", False):
            m.forward = MethodType(_grouped_forward, m)
        m.dcc_groups = groups
    try:
        yield
    finally:
        for m in layers:
            m.dcc_groups = 1
