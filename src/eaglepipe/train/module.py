"""The trainable unit wrapped by DDP: fuse + the family's training objective + loss in one forward()."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..families.registry import family_of
from .batches import Batch
from .block_objective import BLOCK
from .cod import COD
from .objective import TTT, Labels, Objective, TrainingObjective

# each family's `objective`: the TTT unroll of one-step drafts, or blocks drafted in one forward
OBJECTIVES = {"ttt": TTT, "block": BLOCK, "cod": COD}


def objective_of(drafter: nn.Module) -> TrainingObjective:
    """The training objective of the drafter's family."""
    name = family_of(drafter.config).objective
    if name not in OBJECTIVES:
        raise ValueError(f"no training objective {name!r} (a {drafter.config.algorithm} drafter); the objectives "
                         f"are {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


class TTTModule(nn.Module):
    """forward(batch, features, labels, attention, denominators, metrics=True) -> (loss, metric sums: none without
    `metrics`)."""

    def __init__(self, drafter: nn.Module, objective: Objective) -> None:
        super().__init__()
        self.drafter = drafter
        self.objective = objective
        self.loss = objective_of(drafter).loss

    def forward(self, batch: Batch, features: torch.Tensor, labels: Labels, attention: Any,
                denominators: list[float], metrics: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        fused = self.drafter.fuse(features)
        return self.loss(self.drafter, batch, fused, labels, self.objective, attention, denominators, metrics=metrics)
