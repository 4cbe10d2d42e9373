"""Draft trees as batched tensors: EAGLE-2 expansion, the best-N selection and the verify-order layout.

Candidates are numbered in the order they are proposed: step 0 gives `topk` children of the root, every later
step gives `topk` children of each of the `topk` frontier nodes. A candidate's parent is therefore always
numbered before it, and its cumulative log-probability is never above its parent's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F


@dataclass
class Candidates:
    """All proposed nodes of one round, per row: target token id, cumulative draft log-prob, parent (-1 = root),
    depth (1 = child of the root). Shapes [B, C]."""

    tokens: torch.Tensor
    scores: torch.Tensor
    parents: torch.Tensor
    depths: torch.Tensor


@dataclass
class VerifyTree:
    """The tree the target verifies: node 0 is the root (the last committed token), nodes 1..T the kept
    candidates in candidate order. tokens/parents/depths [B, S]; ancestors bool [B, S, S] (self included)."""

    tokens: torch.Tensor
    parents: torch.Tensor
    depths: torch.Tensor
    ancestors: torch.Tensor

    def row(self, r: int) -> "VerifyTree":
        """The tree of row r alone (batch of one)."""
        return VerifyTree(self.tokens[r:r + 1], self.parents[r:r + 1], self.depths[r:r + 1],
                          self.ancestors[r:r + 1])


def expand(frontier_scores: torch.Tensor, top_logprobs: torch.Tensor,
           top_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Children of each frontier node: (draft ids [B, F*topk], cumulative scores [B, F*topk]).

    frontier_scores [B, F]; top_logprobs/top_ids [B, F, topk]: the drafter's best tokens at each frontier node.
    """
    return top_ids.flatten(1), (frontier_scores[..., None] + top_logprobs).flatten(1)


def best_frontier(scores: torch.Tensor, topk: int) -> torch.Tensor:
    """Indices [B, topk] of the `topk` best new candidates: the nodes the drafter expands next (EAGLE-2)."""
    return scores.topk(topk, dim=-1).indices


def draft_logprobs(logits: torch.Tensor, hot_ids: torch.Tensor | None) -> torch.Tensor:
    """fp32 log-probabilities of the drafter's logits, over its hot token ids when it has a token map."""
    logits = logits.float()
    if hot_ids is not None:
        logits = logits[..., hot_ids]
    return F.log_softmax(logits, dim=-1)


def target_ids(draft_ids: torch.Tensor, d2t: torch.Tensor | None, hot_ids: torch.Tensor | None) -> torch.Tensor:
    """Draft-vocab ids as target ids: through the token map (hot ids), d2t offsets, or unchanged."""
    if hot_ids is not None:
        return hot_ids[draft_ids]
    if d2t is not None:
        return draft_ids + d2t[draft_ids]
    return draft_ids


class Grown(NamedTuple):
    """One depth of EAGLE-2 expansion: the new candidates [B, F*topk] (target ids, cumulative scores, parent
    candidate ids) and the next frontier [B, topk] (tokens, scores, drafter hidden states [B, topk, H], visible
    scratch nodes [B, topk, depth + 1] and candidate ids)."""

    tokens: torch.Tensor
    scores: torch.Tensor
    parents: torch.Tensor
    next_tokens: torch.Tensor
    next_scores: torch.Tensor
    next_hidden: torch.Tensor
    next_visible: torch.Tensor
    next_cand: torch.Tensor


def grow(frontier_scores: torch.Tensor, top_logprobs: torch.Tensor, top_ids: torch.Tensor, hidden: torch.Tensor,
         frontier_cand: torch.Tensor, visible: torch.Tensor, first_new: int, next_start: int,
         d2t: torch.Tensor | None, hot_ids: torch.Tensor | None) -> Grown:
    """The children of the frontier, after the drafter ran on it (its best tokens top_logprobs/top_ids
    [B, F, topk], hidden [B, F, H]), and the best `topk` of them as the next frontier. New candidates are numbered
    from `first_new`; the next frontier will be stored as scratch nodes next_start.. (its `visible` gains that
    index after its parent's)."""
    topk = top_ids.shape[-1]
    ids, scores = expand(frontier_scores, top_logprobs, top_ids)
    tokens = target_ids(ids, d2t, hot_ids)
    parents = frontier_cand.repeat_interleave(topk, dim=1)  # child j of frontier node f is candidate f*topk + j
    best = best_frontier(scores, topk)
    src = best // topk  # the frontier node each new frontier node descends from
    b, depth = best.shape[0], visible.shape[-1]
    itself = (next_start + torch.arange(topk, device=best.device))[None, :, None].expand(b, topk, 1)
    return Grown(tokens, scores, parents, tokens.gather(1, best), scores.gather(1, best),
                 hidden.gather(1, src[..., None].expand(-1, -1, hidden.shape[-1])),
                 torch.cat([visible.gather(1, src[..., None].expand(-1, -1, depth)), itself], dim=2),
                 first_new + best)


def select_tree(cands: Candidates, root_token: torch.Tensor, keep: int, max_depth: int) -> VerifyTree:
    """Keep the best `keep` candidates by cumulative log-prob (ties: the earlier candidate) and lay them out
    after the root in candidate order. The kept set contains every kept node's parent."""
    scores = cands.scores
    b, c = scores.shape
    dev = scores.device
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :keep]
    kept = order.sort(dim=-1).values  # candidate order: parents before children
    # position of every candidate in verify order (kept ones at 1..keep; root at 0)
    pos = torch.zeros(b, c + 1, dtype=torch.long, device=dev)
    pos.scatter_(1, kept + 1, torch.arange(1, keep + 1, device=dev).expand(b, keep))
    parent_cand = cands.parents.gather(1, kept)
    parents = torch.cat([torch.zeros(b, 1, dtype=torch.long, device=dev), pos.gather(1, parent_cand + 1)], dim=1)
    verify_tokens = torch.cat([root_token[:, None], cands.tokens.gather(1, kept)], dim=1)
    depths = torch.cat([torch.zeros(b, 1, dtype=torch.long, device=dev), cands.depths.gather(1, kept)], dim=1)
    return VerifyTree(verify_tokens, parents, depths, ancestor_matrix(parents, max_depth))


def ancestor_matrix(parents: torch.Tensor, max_depth: int) -> torch.Tensor:
    """bool [B, S, S]: node j is node i or one of its ancestors. parents [B, S] with parents[:, 0] = 0."""
    b, s = parents.shape
    anc = torch.zeros(b, s, s, dtype=torch.bool, device=parents.device)
    cur = torch.arange(s, device=parents.device).expand(b, s).clone()
    for _ in range(max_depth + 1):
        anc.scatter_(2, cur[..., None], True)
        cur = parents.gather(1, cur)
    return anc

