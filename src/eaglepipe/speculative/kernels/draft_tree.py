"""An EAGLE-2 draft tree's bookkeeping in a few kernels: growing one depth, selecting the tree to verify, and,
after the target's forward, accepting a path.

Between drafter steps a tree's bookkeeping scores the children, picks the next frontier, gathers its hidden
states, builds the drafter's token rows, and at the end selects and lays out the verify tree. As PyTorch ops that
is about ten launches per depth and 18 for the selection; here each depth is one launch (`tree_grow`) and the
selection another (`tree_select`), one program per batch row. Acceptance (`tree_accept`) is one launch after the
target's argmax. They compute what the PyTorch reference (`speculative.tree.grow`, `speculative.tree.select_tree`,
`speculative.accept.greedy_accept_device` and `path_nodes`) computes, with the same tie rule as a stable sort: among
equal scores, the lower candidate number first. benchmarks/RESULTS.md (seventh H200 lease) has the figure: a
(6,8,32) round of 1.317 ms with these kernels, 1.436 ms with the bookkeeping as compiled PyTorch.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl


class Frontier(NamedTuple):
    """The nodes the drafter expands next, per batch row b and frontier node f (K of them): cumulative scores and
    candidate numbers [B, K], and the drafter's token rows for them (`FastDrafter.step`'s inputs, row b*K + f):
    slots, target token ids, hidden states [B*K, H], RoPE positions, write positions, prefix lengths, the visible
    scratch nodes [B*K, depth] and their count."""

    scores: torch.Tensor
    cand: torch.Tensor
    slots: torch.Tensor
    ids: torch.Tensor
    hidden: torch.Tensor
    positions: torch.Tensor
    write: torch.Tensor
    prefix: torch.Tensor
    visible: torch.Tensor
    count: torch.Tensor

    def rows(self) -> tuple[torch.Tensor, ...]:
        """The token rows in `FastDrafter.step`'s argument order."""
        return self.slots, self.ids, self.hidden, self.positions, self.write, self.prefix, self.visible, self.count


@triton.jit
def _take_best(score, avail, idx, NONE: tl.constexpr):
    """The best score among `avail` and its index (ties: the lowest index first), and `avail` without it."""
    best = tl.max(tl.where(avail, score, float("-inf")), axis=0)
    pick = tl.min(tl.where(avail & (score == best), idx, NONE), axis=0)
    return best, pick, avail & (idx != pick)


@triton.jit
def tree_grow_kernel(fscore_ptr, lp_ptr, ids_ptr, d2t_ptr, hid_ptr, fcand_ptr, vis_ptr, slot_ptr, len_ptr,
                     ctok_ptr, cscore_ptr, cpar_ptr, n_cand, first_new, next_start,
                     o_score_ptr, o_cand_ptr, o_slot_ptr, o_ids_ptr, o_hid_ptr, o_pos_ptr, o_write_ptr, o_prefix_ptr,
                     o_vis_ptr, o_count_ptr, H,
                     s_fs, s_lp_b, s_lp_f, s_ids_b, s_ids_f, s_hid_b, s_hid_f, s_fc, s_vis_b, s_vis_f,
                     F: tl.constexpr, K: tl.constexpr, D: tl.constexpr, HAS_D2T: tl.constexpr,
                     NB: tl.constexpr, HB: tl.constexpr, DB: tl.constexpr):
    b = tl.program_id(0)
    n = tl.arange(0, NB)  # new candidate n = f*K + j: child j of frontier node f
    valid = n < F * K
    f, j = n // K, n % K
    score = tl.load(fscore_ptr + b * s_fs + f, mask=valid, other=0.0) \
        + tl.load(lp_ptr + b * s_lp_b + f * s_lp_f + j, mask=valid, other=0.0)
    tok = tl.load(ids_ptr + b * s_ids_b + f * s_ids_f + j, mask=valid, other=0)
    if HAS_D2T:
        tok = tok + tl.load(d2t_ptr + tok, mask=valid, other=0)
    parent = tl.load(fcand_ptr + b * s_fc + f, mask=valid, other=0)
    tl.store(ctok_ptr + b * n_cand + first_new + n, tok, mask=valid)
    tl.store(cscore_ptr + b * n_cand + first_new + n, score, mask=valid)
    tl.store(cpar_ptr + b * n_cand + first_new + n, parent, mask=valid)
    slot = tl.load(slot_ptr + b)
    length = tl.load(len_ptr + b)
    h = tl.arange(0, HB)
    d = tl.arange(0, DB)
    avail = valid
    for i in tl.static_range(K):  # the K best new candidates, best first
        best, pick, avail = _take_best(score, avail, n, NB)
        src = pick // K  # the frontier node it descends from
        row = b * K + i
        tl.store(o_score_ptr + row, best)
        tl.store(o_cand_ptr + row, first_new + pick)
        tl.store(o_ids_ptr + row, tl.sum(tl.where(n == pick, tok, 0), axis=0))
        tl.store(o_slot_ptr + row, slot)
        tl.store(o_pos_ptr + row, length + D)
        tl.store(o_write_ptr + row, length + next_start + i)
        tl.store(o_prefix_ptr + row, length)
        tl.store(o_count_ptr + row, D + 1)
        hv = tl.load(hid_ptr + b * s_hid_b + src * s_hid_f + h, mask=h < H)
        tl.store(o_hid_ptr + row * H + h, hv, mask=h < H)
        vis = tl.load(vis_ptr + b * s_vis_b + src * s_vis_f + d, mask=d < D, other=0)
        tl.store(o_vis_ptr + row * (D + 1) + d, tl.where(d == D, next_start + i, vis), mask=d < D + 1)


def tree_grow(frontier_scores: torch.Tensor, top_logprobs: torch.Tensor, top_ids: torch.Tensor,
              d2t: torch.Tensor | None, hidden: torch.Tensor, frontier_cand: torch.Tensor, visible: torch.Tensor,
              slots: torch.Tensor, lengths: torch.Tensor, cand_tokens: torch.Tensor, cand_scores: torch.Tensor,
              cand_parents: torch.Tensor, first_new: int, next_start: int) -> Frontier:
    """One depth of EAGLE-2 expansion in one launch. The children of F frontier nodes (the drafter's best
    top_logprobs/top_ids [B, F, K], draft ids; d2t maps them to target ids) are written as candidates
    first_new.. of cand_tokens/cand_scores/cand_parents [B, C], numbered f*K + j, each scored with its parent's
    frontier_scores [B, F] and parented by frontier_cand [B, F]. Returns the best K of them as the next frontier,
    with the token rows the drafter runs them as: each is stored as scratch node next_start + i, sees its parent's
    visible [B, F, D] scratch nodes then itself, at RoPE position lengths + D.
    hidden [B, F, H] (unit last stride) is the drafter state at each frontier node."""
    b, f, k = top_ids.shape
    d = visible.shape[-1]
    h = hidden.shape[-1]
    if any(x.stride(-1) != 1 and x.shape[-1] > 1 for x in (hidden, top_logprobs, top_ids, frontier_scores,
                                                             frontier_cand, visible)):
        raise ValueError("tree_grow reads the last dimension of its inputs as contiguous")
    dev = top_ids.device
    out = Frontier(torch.empty(b, k, dtype=torch.float32, device=dev), torch.empty(b, k, dtype=torch.long, device=dev),
                   *(torch.empty(b * k, dtype=torch.long, device=dev) for _ in range(2)),
                   torch.empty(b * k, h, dtype=hidden.dtype, device=dev),
                   *(torch.empty(b * k, dtype=torch.long, device=dev) for _ in range(3)),
                   torch.empty(b * k, d + 1, dtype=torch.long, device=dev),
                   torch.empty(b * k, dtype=torch.long, device=dev))
    n_cand = cand_tokens.shape[1]
    tree_grow_kernel[(b,)](
        frontier_scores, top_logprobs, top_ids, d2t if d2t is not None else top_ids, hidden, frontier_cand,
        visible if d else frontier_cand,  # (an empty tensor may have no address to pass)
        slots, lengths, cand_tokens, cand_scores, cand_parents, n_cand, first_new, next_start,
        out.scores, out.cand, out.slots, out.ids, out.hidden, out.positions, out.write, out.prefix, out.visible,
        out.count, h, frontier_scores.stride(0), top_logprobs.stride(0), top_logprobs.stride(1), top_ids.stride(0),
        top_ids.stride(1), hidden.stride(0), hidden.stride(1), frontier_cand.stride(0), visible.stride(0),
        visible.stride(1), F=f, K=k, D=d, HAS_D2T=d2t is not None, NB=triton.next_power_of_2(f * k),
        HB=triton.next_power_of_2(h), DB=triton.next_power_of_2(d + 1))
    return out


@triton.jit
def tree_select_kernel(score_ptr, tok_ptr, par_ptr, depth_ptr, root_ptr, pos_ptr, o_tok_ptr, o_par_ptr, o_depth_ptr,
                       o_anc_ptr, C, keep, max_depth, CB: tl.constexpr, SB: tl.constexpr):
    b = tl.program_id(0)
    c = tl.arange(0, CB)
    valid = c < C
    score = tl.load(score_ptr + b * C + c, mask=valid, other=float("-inf"))
    avail = valid
    kept = c < 0
    for _ in range(keep):  # the best `keep` candidates (ties: the lower number first)
        _, pick, avail = _take_best(score, avail, c, CB)
        kept = kept | (c == pick)
    # kept candidates in candidate order take verify positions 1..keep; pos[0] stands for the root (parent -1)
    pos = tl.cumsum(kept.to(tl.int64), axis=0)
    tl.store(pos_ptr + b * (C + 1) + 1 + c, tl.where(kept, pos, 0), mask=valid)
    tl.store(pos_ptr + b * (C + 1), 0)
    s = keep + 1
    r = tl.arange(0, SB)
    tl.store(o_anc_ptr + b * s * s + r[:, None] * s + r[None, :], tl.zeros((SB, SB), dtype=tl.int8),
             mask=(r[:, None] < s) & (r[None, :] < s))
    tl.debug_barrier()
    parent = tl.load(par_ptr + b * C + c, mask=kept, other=-1)
    tl.store(o_tok_ptr + b * s + pos, tl.load(tok_ptr + b * C + c, mask=kept, other=0), mask=kept)
    tl.store(o_depth_ptr + b * s + pos, tl.load(depth_ptr + c, mask=kept, other=0), mask=kept)
    tl.store(o_par_ptr + b * s + pos, tl.load(pos_ptr + b * (C + 1) + 1 + parent, mask=kept, other=0), mask=kept)
    tl.store(o_tok_ptr + b * s, tl.load(root_ptr + b))
    tl.store(o_par_ptr + b * s, 0)
    tl.store(o_depth_ptr + b * s, 0)
    tl.debug_barrier()
    node = r.to(tl.int64)
    live = r < s
    for _ in range(max_depth + 1):  # each node, then its ancestors up to the root (whose parent is itself)
        tl.store(o_anc_ptr + b * s * s + r * s + node, tl.full((SB,), 1, dtype=tl.int8), mask=live)
        node = tl.load(o_par_ptr + b * s + node, mask=live, other=0)


def tree_select(cand_tokens: torch.Tensor, cand_scores: torch.Tensor, cand_parents: torch.Tensor,
                cand_depths: torch.Tensor, roots: torch.Tensor,
                keep: int, max_depth: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`speculative.tree.select_tree` in one launch: keep the best `keep` candidates [B, C] (contiguous) by score, lay
    them out after the root in candidate order, and give (tokens, parents in verify positions, depths) [B, keep+1]
    and the ancestor matrix bool [B, keep+1, keep+1]. cand_depths [C] is the same for every row."""
    b, c = cand_scores.shape
    if not (cand_tokens.is_contiguous() and cand_scores.is_contiguous() and cand_parents.is_contiguous()
            and cand_depths.is_contiguous()) or not 1 <= keep <= c:
        raise ValueError("tree_select takes contiguous [B, C] candidates and 1 <= keep <= C")
    dev, s = cand_scores.device, keep + 1
    tokens, parents, depths = (torch.empty(b, s, dtype=torch.long, device=dev) for _ in range(3))
    anc = torch.empty(b, s, s, dtype=torch.int8, device=dev)
    pos = torch.empty(b, c + 1, dtype=torch.long, device=dev)
    tree_select_kernel[(b,)](cand_scores, cand_tokens, cand_parents, cand_depths, roots, pos, tokens, parents, depths,
                             anc, c, keep, max_depth, CB=triton.next_power_of_2(c), SB=triton.next_power_of_2(s))
    return tokens, parents, depths, anc.view(torch.bool)


@triton.jit
def tree_accept_kernel(tok_ptr, par_ptr, depth_ptr, anc_ptr, choice_ptr, o_path_ptr, o_count_ptr, o_bonus_ptr,
                       S, W, SB: tl.constexpr, WB: tl.constexpr):
    b = tl.program_id(0)
    i = tl.arange(0, SB)
    live = i < S
    choice = tl.load(choice_ptr + b * S + i, mask=live, other=-1)
    parent = tl.load(par_ptr + b * S + i, mask=live, other=0)
    correct = (tl.load(tok_ptr + b * S + i, mask=live, other=0) == tl.load(choice_ptr + b * S + parent, mask=live,
                                                                            other=-1)) | (i == 0)
    anc = tl.load(anc_ptr + b * S * S + i[:, None] * S + i[None, :], mask=live[:, None] & live[None, :], other=0) != 0
    # node i is accepted when every node on its path from the root (its ancestors, itself) matches
    wrong = (correct.to(tl.int32) == 0)[None, :]
    ok = tl.sum((anc & wrong).to(tl.int32), axis=1) == 0
    score = tl.where(live & ok, tl.load(depth_ptr + b * S + i, mask=live, other=0), -1)
    top = tl.max(score, axis=0)
    best = tl.min(tl.where(score == top, i, SB), axis=0)  # the deepest accepted node (first of equals)
    on_path = tl.sum(tl.where(i[:, None] == best, anc.to(tl.int32), 0), axis=0) != 0  # row `best` of anc
    tl.store(o_bonus_ptr + b, tl.sum(tl.where(i == best, choice, 0), axis=0))
    tl.store(o_count_ptr + b, tl.sum(on_path.to(tl.int64), axis=0))
    t = tl.arange(0, WB)
    tl.store(o_path_ptr + b * W + t, tl.full((WB,), 0, dtype=tl.int64) + best, mask=t < W)
    tl.debug_barrier()
    slot_of = tl.cumsum(on_path.to(tl.int32), axis=0) - 1  # path nodes ascending: parents before children
    tl.store(o_path_ptr + b * W + slot_of, i.to(tl.int64), mask=on_path & (slot_of < W))


def tree_accept(tokens: torch.Tensor, parents: torch.Tensor, depths: torch.Tensor, ancestors: torch.Tensor,
                choice: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy acceptance of a verify tree in one launch, after the target's argmax `choice` [B, S] at every node:
    (the accepted path's verify-order nodes [B, width], root first, padded with the deepest; its length [B], root
    included; the bonus token [B]). What `speculative.accept.greedy_accept_device` + `path_nodes` give. tokens,
    parents, depths [B, S] and ancestors bool [B, S, S], contiguous; width >= every path's length."""
    b, s = tokens.shape
    if not all(x.is_contiguous() for x in (tokens, parents, depths, ancestors, choice)):
        raise ValueError("tree_accept takes contiguous tensors")
    dev = tokens.device
    path = torch.empty(b, width, dtype=torch.long, device=dev)
    count, bonus = torch.empty(b, dtype=torch.long, device=dev), torch.empty(b, dtype=torch.long, device=dev)
    tree_accept_kernel[(b,)](tokens, parents, depths, ancestors.view(torch.int8), choice, path, count, bonus, s, width,
                             SB=triton.next_power_of_2(s), WB=triton.next_power_of_2(width))
    return path, count, bonus
