"""P-EAGLE's parallel-drafting objective (`cod`) and its COD sampling of the depths (arXiv 2602.01469; the
sampling as speculators' peagle/data.py draws it).

Depth d of slot t (its anchor) is the drafter's d-th draft after slot t: depth 0 takes slot t's token and the
fused target features, as TTT step 0; depth d >= 1 takes the mask token and fc(mask_hidden) at RoPE position t+d,
and its label is the TTT step-d label of slot t (the target's distribution at t+1+d). A query (t, d) attends to
the depth-0 keys of slots <= t of its document and to the keys of depths 1..d of slot t (the depth-aware mask,
which is TTT's: `ttt_attention` computes it).

COD sampling (per row, as speculators samples per packed sequence): depth 0 keeps every slot; depth d keeps
int((n - d) * max(r^d, r_min)) slots, n the row's step-0 supervised slots, drawn from the slots depth d-1 kept
that are supervised at depth d (all of them when fewer), so every kept rollout holds all its lower depths.
Validation keeps every such slot (no sampling). Depths >= 1 run on their kept slots only: the layer, the head and
the loss cost what COD keeps; only the attention runs over the row's layout.

The loss is the sum over depths of each depth's mean draft loss over its kept supervised slots of the optimizer
step, every depth weighted alike (speculators' peagle/loss.py `per_depth_loss`), so the few deep rollouts COD keeps
weigh as much as depth 0.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Optional, Sequence

import numpy as np
import torch

from ..families.registry import family_of
from ..models.config import DrafterConfig
from .batches import Batch, collate, row_generator
from .flops import attention_pairs
from .objective import Labels, Objective, TrainingObjective, UnrollMetrics, ttt_attention_of
from .ttt_attention import Step0Fn, ttt_attention


def cod_slots(batch: Batch, ratio: float, ratio_min: float, seed: Optional[int]) -> Batch:
    """`batch` with the slots each depth trains: COD-sampled from `seed`, or (None, validation) every slot whose
    lower depths are all kept (see the module doc). Step 0 keeps its supervised slots."""
    b, t = batch.input_ids.shape
    docs = (batch.doc_ids.max(dim=1).values + 1).tolist()
    starts = np.cumsum([0] + docs)
    rngs = [None if seed is None else row_generator(seed, batch.sample_ids[starts[r]:starts[r + 1]]) for r in range(b)]
    supervised = np.bincount(batch.step_slots[0].numpy() // t, minlength=b)
    kept = np.ones(b * t, dtype=bool)
    slots, rows = [batch.step_slots[0]], [batch.step_rows[0]]
    for d in range(1, len(batch.step_slots)):
        cand = batch.step_slots[d].numpy()
        alive = kept[cand]
        cand, cand_rows = cand[alive], batch.step_rows[d].numpy()[alive]
        take = np.ones(cand.size, dtype=bool)
        if seed is not None:
            for r in range(b):
                mine = np.flatnonzero(cand // t == r)
                size = int(max(int(supervised[r]) - d, 0) * max(ratio ** d, ratio_min))
                if mine.size > size:
                    take[mine] = False
                    take[rngs[r].choice(mine, size, replace=False)] = True
        kept = np.zeros(b * t, dtype=bool)
        kept[cand[take]] = True
        slots.append(torch.from_numpy(cand[take]))
        rows.append(torch.from_numpy(cand_rows[take]))
    return dataclasses.replace(batch, step_slots=slots, step_rows=rows)


def _attend_dense(keys: list[torch.Tensor], values: list[torch.Tensor], step0: Step0Fn, q: torch.Tensor,
                  k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Depth 0's attention over the whole row layout (its keys are every later depth's context)."""
    keys.append(k)
    values.append(v)
    return ttt_attention(q, keys, values, step0)


def _to_layout(x: torch.Tensor, slots: torch.Tensor, b: int, t: int) -> torch.Tensor:
    """Packed rows x [1, heads, n, d] at flat `slots` -> the row layout [B, heads, T, d] (zeros elsewhere)."""
    heads, dim = x.shape[1], x.shape[-1]
    flat = x.new_zeros(b * t, heads, dim).index_copy(0, slots, x[0].transpose(0, 1))
    return flat.view(b, t, heads, dim).transpose(1, 2)


def _attend_sparse(keys: list[torch.Tensor], values: list[torch.Tensor], step0: Step0Fn, slots: torch.Tensor,
                   b: int, t: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A depth >= 1's attention for its kept `slots`: laid out as rows, through `ttt_attention` (depth-0 keys
    causally, this slot's keys of depths 1..d on the diagonal), and packed again. Slots not kept hold zeros,
    which no kept query reads: a kept slot's lower depths are kept too."""
    keys.append(_to_layout(k, slots, b, t))
    values.append(_to_layout(v, slots, b, t))
    out = ttt_attention(_to_layout(q, slots, b, t), keys, values, step0)
    return out.transpose(1, 2).reshape(b * t, q.shape[1], -1).index_select(0, slots).transpose(0, 1)[None]


def cod_loss(drafter: torch.nn.Module, batch: Batch, features: torch.Tensor, labels: Labels,
             objective: Objective, step0: Step0Fn, denominators: list[float], metrics: bool = True
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The depths 0..ttt_steps-1 of every kept slot (`batch.step_slots`, from `cod_slots`); returns (loss, metric
    sums as `ttt_loss` names them: `UnrollMetrics`; none without `metrics`). `features`: the fused target features
    [B, T, H]."""
    family = family_of(drafter.config)
    b, t = batch.input_ids.shape
    in_vocab = drafter.in_draft_vocab(labels.argmax)
    keep = in_vocab if objective.out_of_vocab == "drop" else torch.ones_like(in_vocab)
    sums = UnrollMetrics(drafter, labels, in_vocab, b * t, features.device, metrics)
    total = features.new_zeros((), dtype=torch.promote_types(features.dtype, torch.float32))
    mask = drafter.mask_state()
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    for d in range(objective.ttt_steps):
        slots, rows = batch.step_slots[d], batch.step_rows[d]
        if d == 0:
            out = drafter.layer_forward(batch.step_ids[0], features, batch.position_ids,
                                        partial(_attend_dense, keys, values, step0))
            picked = out.reshape(b * t, -1).index_select(0, slots)
        else:
            n = slots.numel()
            ids = torch.full((1, n), drafter.config.mask_token_id, dtype=torch.long, device=features.device)
            positions = batch.position_ids.reshape(-1).index_select(0, slots)[None] + d
            picked = drafter.layer_forward(ids, mask.expand(n, -1)[None], positions,
                                           partial(_attend_sparse, keys, values, step0, slots, b, t))[0]
        logits = drafter.logits(picked)
        row_keep = keep.index_select(0, rows)
        loss, alpha = objective.draft_loss(logits, labels.logits.index_select(0, rows))
        step_loss = family.step_loss(objective, (loss * row_keep).sum(), picked, labels, rows)
        if denominators[d] > 0:
            total = total + step_loss / denominators[d]
        sums.add(d, slots, rows, logits, step_loss, alpha, row_keep)
    return total, sums.finish(batch)


def cod_collate(rows: Sequence[Sequence[dict]], objective: Objective, pad_to: Optional[int],
                seed: Optional[int]) -> Batch:
    """The micro-batch of sample `rows` with its COD-sampled depths (`seed` None: validation, nothing drawn)."""
    return cod_slots(collate(rows, objective.ttt_steps, pad_to), objective.cod_ratio, objective.cod_ratio_min, seed)


def cod_flops(cfg: DrafterConfig, batch: Batch, objective: Objective) -> float:
    """Forward + backward (3x forward) FLOPs of the drafter: fc over every token, the layer over every token at
    depth 0 and over the kept slots at depths >= 1, each depth's causal attention over the rows and its diagonal,
    the head over every kept slot."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    counts = batch.supervised_counts()
    layer_rows = batch.num_tokens + sum(counts[1:])
    layer = 2 * (2 * h * (q + 2 * kv) + q * h + 3 * h * i) * layer_rows
    attn = 4 * q * (len(counts) * attention_pairs(batch) + sum(d * n for d, n in enumerate(counts)))
    head = 2 * h * cfg.draft_vocab_size * sum(counts)
    fuse = family_of(cfg).fuse_flops(cfg) * batch.num_tokens
    return 3.0 * (fuse + layer + attn + head)


# P-EAGLE's parallel drafting: every depth's mean weighs alike in the loss; the depths' kept slots, and so the
# layer's shapes, vary with each micro-batch's draws
COD = TrainingObjective(steps=lambda o: o.ttt_steps, decay=lambda o: 1.0, collate=cod_collate,
                        attention=ttt_attention_of, loss=cod_loss, flops=cod_flops, fixed_shapes=False)
