"""Where drafter inputs and labels come from: the target in the loop (online) for one micro-batch."""
from __future__ import annotations

from typing import Optional

import torch

from ..families.base import DrafterFamily
from ..models.target import TargetWithAux
from .batches import Batch
from .objective import Labels


def online_features(target: TargetWithAux, batch: Batch, family: DrafterFamily, label_ids: Optional[torch.Tensor]
                    ) -> tuple[torch.Tensor, Labels]:
    """Run the frozen target (capturing the family's `target_layers`) once: (the family's `target_features`,
    labels at batch.label_pos). `label_ids` = the target ids of the label logits' columns (the family's
    `label_ids`, on the device; None = the whole vocab)."""
    with torch.no_grad():
        aux, final = target(batch.input_ids, batch.position_ids)
        picked = final.reshape(-1, final.shape[-1]).index_select(0, batch.label_pos)
        logits, argmax = target.label_logits(picked, label_ids)
        features = family.target_features(aux, final)
    return features, Labels(logits=logits, argmax=argmax,
                            features=family.regression_targets(features, batch.label_pos))
