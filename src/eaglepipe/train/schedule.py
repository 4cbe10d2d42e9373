"""Learning-rate schedule: linear warmup, then cosine decay to min_lr_ratio * lr."""
from __future__ import annotations

import math

import torch


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float,
                  min_lr_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR with `ceil(warmup_ratio * total_steps)` warmup steps and a cosine floor at min_lr_ratio."""
    warmup = math.ceil(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        span = max(total_steps - warmup, 1)
        progress = min((step - warmup) / span, 1.0)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
