"""The block objective (DFlash, arXiv 2602.06036): train a drafter to denoise a block [anchor token, MASK x (B-1)]
in one forward.

Layout (`block_layout`, on the CPU with the batch): each row's blocks are anchored at supervised positions a (the
same slots whose label is the target's prediction at a), drawn at random without replacement up to
`num_anchors` per row (all of them when fewer, and always for validation), by a generator of the step's seed and
the row's samples. The block's queries sit at RoPE positions pos(a) .. pos(a)+B-1 and see the context features
strictly before a in a's document and their own block (train/block_attention.py). Block position k = 1..B-1
drafts x_{a+k}: its label is the target's prediction at a+k-1 (a row of `Labels`), supervised when that position
is (same document). In the batch, `step_slots[k-1]`
lists the blocks (flat index row * A + block) whose position k is supervised and `step_rows[k-1]` their label rows,
so the per-step machinery (denominators, metrics) counts block positions as the TTT objective counts steps.

Loss = `train.loss` (draft_losses: soft CE or an LK loss against the target's distribution) per supervised
position, weighted
- `decay`: sum_k exp(-(k-1)/gamma) * mean loss at position k (the TTT loss's step weighting; SpecForge divides the
  weighted sum by the weighted count instead, the same up to the constant sum of the weights when every
  position has as many supervised blocks);
- `dpace` (arXiv 2605.18810): each position by the acceptance it leads to, w_k = sum_{m >= k} prod_{i <= m}
  ((1 - a) q_i + a), q_i the draft's acceptance rate at position i (for a one-hot target the draft's probability
  of the label, D-PACE's exp(-CE)), detached; summed over supervised positions and divided by the blocks.
Denominators are the optimizer step's counts (all micro-batches and ranks), known before the forward.

Metrics per position as the TTT objective's per step (acc_k, cond_acc_k, alpha_k, sim_tau); the replayed rounds
(replay_tau) are counted when every supervised position anchors a block (validation always), since a round
starts wherever the previous one ended.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np
import torch

from ..models.config import DrafterConfig
from .batches import Batch, collate, row_generator
from .block_attention import BlockAttention, flex_block_attention, math_block_attention
from .objective import Labels, Objective, TrainingObjective, replay_rounds


def block_layout(batch: Batch, block: int, num_anchors: int, rngs: Optional[list[np.random.Generator]],
                 fixed_width: bool = False) -> Batch:
    """`batch` (on the CPU) with its blocks: `anchors` [R, A] (-1 pads rows with fewer blocks) and, per block
    position k = 1..block-1, the supervised blocks and their label rows (`step_slots`/`step_rows`). `rngs` (one
    per row) draw `num_anchors` anchors per row among its supervised positions; None anchors every one.
    `fixed_width` pads A to its most, `num_anchors` when drawing and the row length when not, so that every
    micro-batch of padded rows has one shape: the compiled FlexAttention kernel is specialised to its key length,
    and a new length each batch would exhaust torch.compile's recompile limit and fall back to the unfused kernel,
    which materialises the [A*B, T + A*B] scores."""
    r, t = batch.input_ids.shape
    supervised = np.zeros(r * t, dtype=bool)
    supervised[batch.label_pos.numpy()] = True
    row_of = np.cumsum(supervised) - 1  # flat position -> its label row
    supervised = supervised.reshape(r, t)
    doc = batch.doc_ids.numpy()
    chosen = []
    for row in range(r):
        cands = np.flatnonzero(supervised[row])
        if rngs is not None and len(cands) > num_anchors:
            cands = np.sort(rngs[row].choice(cands, num_anchors, replace=False))
        chosen.append(cands)
    most = (num_anchors if rngs is not None else t) if fixed_width else 0
    width = max(1, most, max(len(c) for c in chosen))
    anchors = np.full((r, width), -1, dtype=np.int64)
    for row, cands in enumerate(chosen):
        anchors[row, :len(cands)] = cands
    label_at = anchors[..., None] + np.arange(block - 1)  # [R, A, B-1]: the position whose prediction is the label
    clipped = np.clip(label_at, 0, t - 1)
    rows = np.arange(r)[:, None, None]
    anchor_doc = doc[rows[..., 0], np.clip(anchors, 0, t - 1)]
    ok = (anchors[..., None] >= 0) & (label_at < t) & supervised[rows, clipped] & \
        (doc[rows, clipped] == anchor_doc[..., None])
    step_slots, step_rows = [], []
    for k in range(block - 1):
        flat = np.flatnonzero(ok[..., k].reshape(-1))
        step_slots.append(torch.from_numpy(flat))
        step_rows.append(torch.from_numpy(row_of[(flat // width) * t + clipped.reshape(-1, block - 1)[flat, k]]))
    return dataclasses.replace(batch, step_slots=step_slots, step_rows=step_rows, anchors=torch.from_numpy(anchors))


def block_attention(batch: Batch, objective: Objective, heads: int, flex: bool) -> BlockAttention:
    """The attention of the batch's blocks: FlexAttention (CUDA) or explicit scores."""
    if flex:
        return flex_block_attention(batch.anchors, batch.doc_ids, objective.block_size, heads)
    return math_block_attention(batch.anchors, batch.doc_ids, objective.block_size)


def block_outputs(drafter: torch.nn.Module, batch: Batch, features: torch.Tensor, block: int,
                  attend: BlockAttention) -> torch.Tensor:
    """The drafter's outputs [R*A, block-1, H] at positions 1..block-1 of every block, from the fused context
    features [R, T, H]."""
    r = batch.input_ids.shape[0]
    anchors = batch.anchors.clamp(min=0)
    ids = drafter.block_ids(batch.input_ids.gather(1, anchors), block).view(r, -1)
    offsets = torch.arange(block, device=anchors.device)
    positions = (batch.position_ids.gather(1, anchors)[..., None] + offsets).view(r, -1)
    context = drafter.context_kv(features, batch.position_ids)
    out = drafter.forward_block(ids, positions, lambda i, q, k, v: attend(q, *context[i], k, v))
    return out.view(r * anchors.shape[1], block, -1)[:, 1:]


def block_loss(drafter: torch.nn.Module, batch: Batch, features: torch.Tensor, labels: Labels,
               objective: Objective, attend: BlockAttention, denominators: list[float], metrics: bool = True
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The block objective's loss and metric sums (objective.py's keys with K = block_size - 1 positions; none
    without `metrics`)."""
    positions = objective.block_size - 1
    drafts = block_outputs(drafter, batch, features, objective.block_size, attend)
    blocks, dev = drafts.shape[0], drafts.device
    counts = [int(s.numel()) for s in batch.step_slots]
    flat = torch.cat([s * positions + k for k, s in enumerate(batch.step_slots)])  # [N] into [blocks * K]
    rows = torch.cat(batch.step_rows)
    logits = drafter.logits(drafts.reshape(blocks * positions, -1).index_select(0, flat))
    loss, alpha = objective.draft_loss(logits, labels.logits.index_select(0, rows))
    weights = _position_weights(objective, counts, denominators, alpha, flat, blocks, dev)
    total = (loss * weights).sum()
    if not metrics:
        return total, {}
    with torch.no_grad():
        correct = logits.argmax(-1) == labels.argmax.index_select(0, rows)
        dense_ok = torch.zeros(blocks * positions, dtype=torch.bool, device=dev).index_fill_(0, flat[correct], True)
        accepted = dense_ok.view(blocks, positions).long().cumprod(dim=1)  # [blocks, K]: positions 1..k all right
    sums = _metric_sums(counts, loss, alpha, correct, accepted, dev)
    sums.update(_replayed(batch, accepted.sum(dim=1)))
    return total, sums


def _position_weights(objective: Objective, counts: list[int], denominators: list[float], alpha: torch.Tensor,
                      flat: torch.Tensor, blocks: int, dev: torch.device) -> torch.Tensor:
    """Each supervised position's weight [N] in the loss (module doc), without a host-to-device copy."""
    positions = objective.block_size - 1
    if objective.position_weighting == "decay":
        scale = [math.exp(-k / objective.loss_decay_gamma) / d if d > 0 else 0.0 for k, d in enumerate(denominators)]
        return torch.cat([torch.full((n,), s, device=dev) for n, s in zip(counts, scale)])
    with torch.no_grad():
        a = objective.dpace_alpha
        smooth = torch.ones(blocks * positions, device=dev).index_copy_(0, flat, (1 - a) * alpha.float() + a)
        present = torch.zeros(blocks * positions, device=dev).index_fill_(0, flat, 1.0)
        prefix = smooth.view(blocks, positions).cumprod(dim=1) * present.view(blocks, positions)
        suffix = prefix.flip(1).cumsum(dim=1).flip(1)
        return suffix.view(-1).index_select(0, flat) / max(denominators[0], 1.0)


def _metric_sums(counts: list[int], loss: torch.Tensor, alpha: torch.Tensor, correct: torch.Tensor,
                 accepted: torch.Tensor, dev: torch.device) -> dict[str, torch.Tensor]:
    """Per position k: loss_k, count_k, correct_k, prefix_k (blocks right through k), alpha_k; `slots` = blocks."""
    sums: dict[str, torch.Tensor] = {"slots": torch.full((), float(counts[0]), device=dev)}
    start = 0
    with torch.no_grad():
        prefix = accepted.sum(dim=0).float()
        for k, n in enumerate(counts):
            part = slice(start, start + n)
            sums[f"loss_{k}"] = loss[part].detach().float().sum()
            sums[f"count_{k}"] = torch.full((), float(n), device=dev)
            sums[f"correct_{k}"] = correct[part].float().sum()
            sums[f"prefix_{k}"] = prefix[k]
            sums[f"alpha_{k}"] = alpha[part].float().sum()
            start += n
    return sums


def _replayed(batch: Batch, accepted: torch.Tensor) -> dict[str, torch.Tensor]:
    """The replayed rounds (objective.replay_rounds) over all answers and first answers, when every supervised
    position anchors a block; else none."""
    if batch.step_slots[0].numel() != batch.label_pos.numel():
        return {}
    r, t = batch.input_ids.shape
    anchors = batch.anchors.view(-1)
    kept = anchors >= 0
    starts = (torch.arange(r, device=anchors.device).repeat_interleave(batch.anchors.shape[1]) * t + anchors)[kept]
    dense = torch.zeros(r * t, dtype=torch.long, device=anchors.device).index_copy_(0, starts, accepted[kept])
    supervised = torch.zeros(r * t, dtype=torch.bool, device=anchors.device).index_fill_(0, starts, True)
    # an anchor's answer: slot a - 1's first_answer flag is the label at a (batches.py)
    first = torch.roll(batch.first_answer.view(r, t), 1, dims=1)
    first[:, 0] = False
    out = {}
    for suffix, mask in (("", supervised), ("_first", supervised & first.reshape(-1))):
        rounds, tokens = replay_rounds(dense, mask, t)
        out[f"rounds{suffix}"], out[f"round_tokens{suffix}"] = rounds.float(), tokens.float()
    return out


def block_flops(cfg: DrafterConfig, batch: Batch, objective: Objective) -> float:
    """Forward + backward (3x forward) FLOPs of the drafter over the batch's blocks (the batch on the CPU): every
    layer's context K/V of every position, the layers over the blocks' tokens, attention over each block's
    context and itself, and the logits of the supervised positions."""
    h, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    block = objective.block_size
    rows, cols = torch.nonzero(batch.anchors >= 0, as_tuple=True)
    anchors = batch.anchors[rows, cols]
    doc = batch.doc_ids[rows]
    context = int(((doc == doc.gather(1, anchors[:, None])) & (torch.arange(doc.shape[1]) < anchors[:, None])).sum())
    tokens = int(anchors.numel()) * block
    fuse = 2 * (len(cfg.aux_layers) * cfg.target_hidden_size * h + h * 2 * kv * layers) * batch.num_tokens
    dense = 2 * (h * (q + 2 * kv) + q * h + 3 * h * i) * tokens * layers
    attn = 4 * q * (context + anchors.numel() * block) * block * layers
    head = 2 * h * cfg.vocab_size * sum(int(s.numel()) for s in batch.step_slots)
    return 3.0 * (fuse + dense + attn + head)


def block_collate(rows: list[list[dict]], objective: Objective, pad_to: Optional[int], seed: Optional[int]) -> Batch:
    """The micro-batch of sample `rows` with its blocks, each row's anchors drawn from the step's `seed` and the
    row's samples (None: every position); rows padded to `pad_to` get a fixed number of blocks too."""
    rngs = None if seed is None else [row_generator(seed, [s.get("id") for s in row]) for row in rows]
    return block_layout(collate(rows, 1, pad_to), objective.block_size, objective.num_anchors, rngs,
                        fixed_width=pad_to is not None)


# blocks of block_size - 1 drafts, the decay of consecutive positions exp(-1/gamma)
BLOCK = TrainingObjective(steps=lambda o: o.block_size - 1, decay=lambda o: math.exp(-1.0 / o.loss_decay_gamma),
                          collate=block_collate, attention=block_attention, loss=block_loss, flops=block_flops)
