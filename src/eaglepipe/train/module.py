"""The trainable unit wrapped by DDP: fuse + the family's training objective (the TTT unroll) + loss in one
forward()."""
from __future__ import annotations

import torch
from torch import nn

from ..families.registry import family_of
from .batches import Batch
from .objective import Labels, Objective, ttt_loss
from .ttt_attention import Step0Fn

# the loss of each family's `objective`
OBJECTIVES = {"ttt": ttt_loss}


class TTTModule(nn.Module):
    """forward(batch, features, labels, step0, denominators) -> (loss, metric sums)."""

    def __init__(self, drafter: nn.Module, objective: Objective) -> None:
        super().__init__()
        name = family_of(drafter.config).objective
        if name not in OBJECTIVES:
            raise ValueError(f"no training objective {name!r} (a {drafter.config.algorithm} drafter); the objectives "
                             f"are {sorted(OBJECTIVES)}")
        self.drafter = drafter
        self.objective = objective
        self.loss = OBJECTIVES[name]

    def forward(self, batch: Batch, features: torch.Tensor, labels: Labels, step0: Step0Fn,
                denominators: list[float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        fused = self.drafter.fuse(features)
        return self.loss(self.drafter, batch, fused, labels, self.objective, step0, denominators)
