"""FIFO bank of negative features F_u (Eq. 1): the sampled projections of the last ``bank_steps + 1`` steps.

Under torch.distributed each rank samples its share of ``selected_num`` from its share of the batch and
the bank keeps every rank's samples (all_gather, no gradient): every rank contrasts against one global bank.
"""

from __future__ import annotations

from collections import deque

import torch
from torch import Tensor

from dcc import distributed as ddp


class NegativeBank:
    def __init__(self, bank_steps: int) -> None:
        self.entries: deque[tuple[Tensor, Tensor]] = deque(maxlen=bank_steps + 1)

    def push(self, feats: Tensor, labels: Tensor) -> None:
        """Add this step's negatives of every rank (stored detached, in rank order)."""
        self.entries.append((ddp.all_gather_cat(feats.detach()), ddp.all_gather_cat(labels.detach())))

    def negatives(self) -> tuple[Tensor, Tensor]:
        """All stored negatives: ``(features [M, C], pseudo-labels [M])``."""
        feats, labels = zip(*self.entries)
        return torch.cat(feats), torch.cat(labels)

    def state_dict(self) -> dict:
        return {"entries": [(f.cpu(), l.cpu()) for f, l in self.entries]}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        self.entries.clear()
        for feats, labels in state["entries"]:
            self.entries.append((feats.to(device), labels.to(device)))


def sample_negatives(phi: Tensor, labels: Tensor, selected_num: int, generator: torch.Generator | None = None
                     ) -> tuple[Tensor, Tensor]:
    """Sample ``selected_num`` cells without replacement from one view's maps (all cells if fewer).

    phi: [B, C, h, w] projected features; labels: [B, h, w] pseudo-labels. No gradient flows.
    Under torch.distributed ``selected_num`` is the total over ranks: each rank samples
    ``ceil(selected_num / world_size)`` (equal counts, so the gathered bank has at most world_size - 1 extra).
    """
    selected_num = -(-selected_num // ddp.world_size())
    flat = phi.detach().permute(0, 2, 3, 1).reshape(-1, phi.shape[1])
    flat_labels = labels.reshape(-1)
    count = flat.shape[0]
    if selected_num >= count:
        return flat, flat_labels
    pick = torch.randperm(count, device=flat.device, generator=generator)[:selected_num]
    return flat[pick], flat_labels[pick]
