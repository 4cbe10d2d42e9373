"""Where drafter inputs and labels come from: the target in the loop (online) for one micro-batch."""
from __future__ import annotations

from typing import Optional

import torch

from ..models.target import TargetWithAux
from .batches import Batch
from .objective import Labels


def online_features(target: TargetWithAux, batch: Batch, draft_ids: Optional[torch.Tensor], eagle3: bool
                    ) -> tuple[torch.Tensor, Labels]:
    """Run the frozen target once: (aux [B,T,n*H] for EAGLE-3 or the post-norm last hidden state for
    EAGLE-1, labels at batch.label_pos). `draft_ids` = target ids of the draft vocab (None = full vocab)."""
    with torch.no_grad():
        aux, final = target(batch.input_ids, batch.position_ids)
        picked = final.reshape(-1, final.shape[-1]).index_select(0, batch.label_pos)
        logits, argmax = target.label_logits(picked, draft_ids if eagle3 else None)
    return (aux if eagle3 else final), Labels(logits=logits, argmax=argmax, features=None if eagle3 else picked)
