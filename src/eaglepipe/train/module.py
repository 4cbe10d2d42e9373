"""The trainable unit wrapped by DDP: fuse + TTT unroll + loss in one forward()."""
from __future__ import annotations

import torch
from torch import nn

from .batches import Batch
from .objective import Labels, Objective, ttt_loss
from .ttt_attention import Step0Fn


class TTTModule(nn.Module):
    """forward(batch, features, labels, step0, denominators) -> (loss, metric sums)."""

    def __init__(self, drafter: nn.Module, objective: Objective) -> None:
        super().__init__()
        self.drafter = drafter
        self.objective = objective

    def forward(self, batch: Batch, features: torch.Tensor, labels: Labels, step0: Step0Fn,
                denominators: list[float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        fused = self.drafter.fuse(features)
        return ttt_loss(self.drafter, batch, fused, labels, self.objective, step0, denominators)
