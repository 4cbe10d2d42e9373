"""Which drafted tokens the target accepts: greedy path matching, and tree speculative sampling.

Drafting is deterministic (the drafter's top-k), so the proposal distribution of each drafted token is a point
mass. Speculative sampling with a point-mass proposal accepts token x with probability p(x) and otherwise
continues with the residual norm(max(p - q, 0)) = p with x removed; over several siblings this is recursive
rejection, and the first token it emits is distributed exactly as p (the target's filtered distribution).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..engine.sampling import draw
from ..engine.token_path import visible_order
from .tree import VerifyTree


@dataclass
class DeviceAcceptance:
    """The greedy decision as device tensors, per row: the accepted path as a mask over the verify-order nodes
    [B, S] (root included), its deepest node [B], the bonus token after it [B] and the path's length [B] (the
    root included: the number of tokens the round emits)."""

    path_mask: torch.Tensor
    deepest: torch.Tensor
    bonus: torch.Tensor
    count: torch.Tensor


@dataclass
class Acceptance:
    """Per row, on the host: verify-order indices of the accepted path (root first), the bonus token after it, and
    the tree's tokens."""

    paths: list[list[int]]
    bonus: list[int]
    tree_tokens: list[list[int]]

    @property
    def accepted_lengths(self) -> list[int]:
        """Accepted draft tokens per row (the root and the bonus token not counted)."""
        return [len(p) - 1 for p in self.paths]


def greedy_accept_device(tree: VerifyTree, target_logits: torch.Tensor) -> DeviceAcceptance:
    """Longest path whose tokens all equal the target's argmax at their parent, on the device: static shapes, no
    host sync (safe to capture in a CUDA graph). target_logits [B, S, V] in verify order."""
    tokens, ancestors = tree.tokens, tree.ancestors
    choice = target_logits.argmax(dim=-1)  # [B, S]
    correct = tokens == choice.gather(1, tree.parents)
    correct[:, 0] = True
    ok = ~(ancestors & ~correct[:, None, :]).any(dim=-1)  # every node on the path from the root matches
    best = (tree.depths * ok).argmax(dim=-1)  # accepted nodes form one path; take its deepest node
    path_mask = ancestors.gather(1, best[:, None, None].expand(-1, 1, tokens.shape[1]))[:, 0]
    return DeviceAcceptance(path_mask, best, choice.gather(1, best[:, None])[:, 0], path_mask.sum(dim=1))


def path_nodes(acc: DeviceAcceptance, width: int) -> torch.Tensor:
    """The accepted path's verify-order node indices [B, width], root first (parents precede children in verify
    order, so ascending order is path order), padded with the deepest node. width >= every path's length."""
    return torch.minimum(visible_order(acc.path_mask)[:, :width], acc.deepest[:, None])


def chain_accept(tokens: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy acceptance of a chain on the device: (accepted drafts [B], bonus token [B]).

    tokens [B, S]: the root, then the drafts; logits [B, S, V]: the target's at each node. Draft j is accepted
    when it and every draft before it equal the target's argmax at their parent; the bonus token is the
    target's argmax at the deepest accepted node.
    """
    choice = logits.argmax(dim=-1)
    matches = tokens[:, 1:] == choice[:, :-1]
    accepted = matches.long().cumprod(dim=1).sum(dim=1)
    return accepted, choice.gather(1, accepted[:, None])[:, 0]


def greedy_accept(tree: VerifyTree, target_logits: torch.Tensor) -> Acceptance:
    """`greedy_accept_device`'s decision copied to the host (the rows of a sampled batch that are greedy).

    target_logits [B, S, V] in verify order.
    """
    acc = greedy_accept_device(tree, target_logits)
    s = tree.tokens.shape[1]
    packed = torch.cat([acc.path_mask.long(), acc.bonus[:, None], tree.tokens], dim=1).tolist()  # the host sync
    paths = [[i for i, m in enumerate(row[:s]) if m] for row in packed]
    return Acceptance(paths, [row[s] for row in packed], [row[s + 1:] for row in packed])


def children_lists(parents: list[int]) -> list[list[int]]:
    """Children of every node in verify order (candidate order = best draft score first among siblings)."""
    kids: list[list[int]] = [[] for _ in parents]
    for i, p in enumerate(parents[1:], start=1):
        kids[p].append(i)
    return kids


def sample_accept_row(tokens: list[int], parents: list[int], probs: torch.Tensor,
                      rng: random.Random) -> tuple[list[int], int]:
    """Tree speculative sampling for one row: (accepted path in verify order, the token emitted after it).

    probs [S, V]: the target's filtered next-token distribution at every node. At each node the children are
    tried in order; child x is accepted with probability p(x) / (remaining mass), else removed from p.
    """
    kids = children_lists(parents)
    node, path = 0, [0]
    while True:
        p = probs[node].clone()
        accepted = None
        for child in kids[node]:
            x = tokens[child]
            mass = p.sum()
            if bool(mass * rng.random() < p[x]):
                accepted = child
                break
            p[x] = 0.0
        if accepted is None:
            return path, int(draw(p[None], torch.tensor([rng.random()], device=p.device))[0])
        path.append(accepted)
        node = accepted
