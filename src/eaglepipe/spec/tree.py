"""Draft trees as batched tensors: EAGLE-2 expansion, the best-N selection and the verify-order layout.

Candidates are numbered in the order they are proposed: step 0 gives `topk` children of the root, every later
step gives `topk` children of each of the `topk` frontier nodes. A candidate's parent is therefore always
numbered before it, and its cumulative log-probability is never above its parent's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


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


def expand(frontier_scores: torch.Tensor, logprobs: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Children of each frontier node: (draft ids [B, F*topk], cumulative scores [B, F*topk]).

    frontier_scores [B, F]; logprobs [B, F, V] of the drafter at each frontier node.
    """
    lp, ids = logprobs.topk(topk, dim=-1)
    scores = frontier_scores[..., None] + lp
    return ids.flatten(1), scores.flatten(1)


def best_frontier(scores: torch.Tensor, topk: int) -> torch.Tensor:
    """Indices [B, topk] of the `topk` best new candidates: the nodes the drafter expands next (EAGLE-2)."""
    return scores.topk(topk, dim=-1).indices


def select_tree(cands: Candidates, root_token: torch.Tensor, keep: int, max_depth: int) -> VerifyTree:
    """Keep the best `keep` candidates by cumulative log-prob (ties: the earlier candidate) and lay them out
    after the root in candidate order. The kept set contains every kept node's parent."""
    b, c = cands.scores.shape
    dev = cands.scores.device
    order = torch.sort(cands.scores, dim=-1, descending=True, stable=True).indices[:, :keep]
    kept = order.sort(dim=-1).values  # candidate order: parents before children
    # position of every candidate in verify order (kept ones at 1..keep; root at 0)
    pos = torch.zeros(b, c + 1, dtype=torch.long, device=dev)
    pos.scatter_(1, kept + 1, torch.arange(1, keep + 1, device=dev).expand(b, keep))
    parent_cand = cands.parents.gather(1, kept)
    parents = torch.cat([torch.zeros(b, 1, dtype=torch.long, device=dev), pos.gather(1, parent_cand + 1)], dim=1)
    tokens = torch.cat([root_token[:, None], cands.tokens.gather(1, kept)], dim=1)
    depths = torch.cat([torch.zeros(b, 1, dtype=torch.long, device=dev), cands.depths.gather(1, kept)], dim=1)
    return VerifyTree(tokens, parents, depths, ancestor_matrix(parents, max_depth))


def ancestor_matrix(parents: torch.Tensor, max_depth: int) -> torch.Tensor:
    """bool [B, S, S]: node j is node i or one of its ancestors. parents [B, S] with parents[:, 0] = 0."""
    b, s = parents.shape
    anc = torch.zeros(b, s, s, dtype=torch.bool, device=parents.device)
    cur = torch.arange(s, device=parents.device).expand(b, s).clone()
    for _ in range(max_depth + 1):
        anc.scatter_(2, cur[..., None], True)
        cur = parents.gather(1, cur)
    return anc

