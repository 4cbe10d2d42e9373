"""`RoundSteps`: the device side of one speculative round (draft, verify, accept, extend), shared by the eager round
of `SpeculativeGenerator` and the captured round of `RoundGraph`.

Every step takes and returns device tensors only, with shapes fixed by the number of rows and the bounds passed
in, and never waits on the device, so a CUDA graph can capture it. Chains (topk = 1) use a fixed tree layout and the
drafter's argmax; trees use EAGLE-2 expansion and selection. Two paths: with `fast` (EAGLE-3/3.1 and EAGLE-1/2
drafters on the engine's token path) the drafter's steps, its top-k and a tree's bookkeeping run as Triton
kernels; otherwise everything is plain PyTorch, the reference the tests compare the kernels with.
"""
from __future__ import annotations

import torch

from ..engine.model import LlamaRunner, rms_norm
from ..families.registry import family_of
from .accept import chain_accept, greedy_accept_device, path_nodes
from .config import SpecConfig
from .draft_runner import DraftRunner
from .drafter_loader import LoadedDrafter
from .tree import Candidates, VerifyTree, draft_logprobs, expand, grow, select_tree, target_ids


def kernels_fit(loaded: LoadedDrafter, spec: SpecConfig) -> bool:
    """Whether the drafter can take the fast path: its family's step has the Triton form (EAGLE-3/3.1,
    EAGLE-1/2), and its draft vocabulary and top-k fit the top-k kernel (a chain needs no top-k)."""
    if not family_of(loaded.config).has_fast_step(loaded.config):
        return False
    if spec.topk == 1:
        return True
    from .kernels import topk

    return loaded.config.draft_vocab_size <= topk.MAX_VOCAB and spec.topk <= topk.CHUNK


class RoundSteps:
    """The steps of a round of `spec` over `runner` with the drafter `loaded`; `fast` picks the Triton path."""

    def __init__(self, runner: LlamaRunner, loaded: LoadedDrafter, spec: SpecConfig, fast: bool):
        self.runner, self.loaded, self.spec = runner, loaded, spec
        self.drafter = loaded.model
        self.family = family_of(loaded.config)
        self.chain = spec.topk == 1
        self.capture = runner.check_capture_layers(list(loaded.config.aux_layers))
        capacity = runner.max_len + spec.num_steps * spec.topk + spec.num_steps + 2
        self.draft = DraftRunner(self.drafter, runner.max_slots, capacity, runner.device, runner.dtype, fast=fast)
        self.kernels = None
        if fast:
            from . import kernels

            self.kernels = kernels
        dev, n, k, steps = runner.device, spec.num_draft_tokens, spec.topk, spec.num_steps
        self._cols = torch.arange(runner.max_len + n + 1, device=dev)
        # a chain's fixed verify layout: node i is the child of node i-1 at depth i
        self._chain_parents = (self._cols[:n] - 1).clamp(min=0)
        self._chain_ancestors = torch.ones(n, n, dtype=torch.bool, device=dev).tril()
        self._cand_depths = torch.tensor([1] * k + [d + 1 for d in range(1, steps) for _ in range(k * k)], device=dev)
        self._d2t = getattr(self.drafter, "d2t", None)  # None: the drafter drafts target ids
        # the root's place in a tree expansion by the kernels: score 0, no parent candidate, no scratch node seen
        self._root_scores = torch.zeros(runner.max_slots, 1, device=dev)
        self._root_cand = torch.full((runner.max_slots, 1), -1, dtype=torch.long, device=dev)
        self._root_visible = torch.zeros(runner.max_slots, 1, 0, dtype=torch.long, device=dev)

    @property
    def fast(self) -> bool:
        """Whether the drafter's steps, top-k and tree bookkeeping run as Triton kernels."""
        return self.kernels is not None

    # ------------------------------------------------------------------ the drafter's input and log-probs
    def draft_input(self, aux: torch.Tensor) -> torch.Tensor:
        """What the drafter is fed from the target's captured layers, as its family says: their fusion (EAGLE-3) or
        the final post-norm hidden state (EAGLE-1/2, as the target's lm_head consumes it and as SGLang hands it
        over)."""
        if self.draft.fast is not None:  # the token path's form of the same input, in fewer kernels
            return self.draft.fast.draft_input(aux, self._final_norm)
        return self.family.draft_input(self.drafter, aux, self._final_norm)

    def _final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden, self.runner.weights.norm, self.runner.shapes.rms_norm_eps)

    def draft_logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        """The PyTorch path's fp32 log-probabilities of the drafter's logits over the ids it may propose."""
        return draft_logprobs(logits, self.loaded.hot_ids)

    def _draft_topk(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The drafter's `topk` best tokens at each of F nodes: (log-probs, draft ids) [B, F, topk]."""
        return self.draft_logprobs(logits).topk(self.spec.topk, dim=-1)

    def _to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return target_ids(draft_ids, self._d2t, self.loaded.hot_ids)

    def _draft_argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """The drafter's top-1 proposal as a target id (a chain needs no log-probs: no selection follows)."""
        if self.loaded.hot_ids is not None:
            logits = logits[..., self.loaded.hot_ids]
        return self._to_target_ids(logits.argmax(dim=-1))

    # ------------------------------------------------------------------ the rows' drafter state
    def start(self, slot: torch.Tensor, ids: torch.Tensor, features: torch.Tensor,
              span: slice | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Commit a prefilled prompt's tokens `ids` [1, S] (one ahead of the target's) fed `features` [1, S, F] in
        the cache slot `slot` [1]; returns the drafter's state after the last one (hidden [H], logits [V_d])."""
        zero = torch.zeros(1, dtype=torch.long, device=ids.device)
        hidden, logits = self.draft.extend(slot, zero, 0, ids, features, span)
        return hidden[0, -1], logits[0, -1]

    def state_buffers(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeroed drafter state of `rows` rows, (hidden [rows, H], logits [rows, V_d]) (`RoundGraph`'s buffers)."""
        cfg, dev, dtype = self.loaded.config, self.runner.device, self.runner.dtype
        return (torch.zeros(rows, cfg.hidden_size, dtype=dtype, device=dev),
                torch.zeros(rows, cfg.draft_vocab_size, dtype=dtype, device=dev))

    # ------------------------------------------------------------------ draft
    def draft_tree(self, roots: torch.Tensor, draft_hidden: torch.Tensor, draft_logits: torch.Tensor,
                   slots: torch.Tensor, lengths: torch.Tensor, max_length: int, keep: int,
                   span: slice | None) -> VerifyTree:
        """The round's verify tree: the root and `keep` drafted nodes per row, a chain or an EAGLE-2 tree, from the
        drafter's state after each root (draft_hidden [B, H], draft_logits [B, V_d]). `max_length` >= every
        row's committed length `lengths` [B]; `span`: the rows' cache slots `slots` [B] as a slice when
        consecutive."""
        if self.chain or not keep:  # (no room for a draft: the root alone, in the chain's layout)
            return self._chain_tree(self._draft_chain(roots, draft_hidden, draft_logits, slots, lengths, max_length,
                                                      keep, span))
        if self.fast:
            return self._draft_tree_kernels(roots, draft_hidden, draft_logits, slots, lengths, max_length, keep)
        return self._draft_tree_torch(roots, draft_hidden, draft_logits, slots, lengths, max_length, keep, span)

    def _draft_chain(self, roots: torch.Tensor, draft_hidden: torch.Tensor, draft_logits: torch.Tensor,
                     slots: torch.Tensor, lengths: torch.Tensor, max_length: int, keep: int,
                     span: slice | None) -> torch.Tensor:
        """The root and a chain of `keep` drafted tokens after it [B, keep+1]: keep-1 drafter steps."""
        drafted = [roots]
        if keep:
            drafted.append(self._draft_argmax(draft_logits))
        hidden = draft_hidden[:, None]
        for depth in range(1, keep):
            hidden, lg = self.draft.chain_step(slots, lengths, max_length, drafted[-1][:, None], hidden, depth, span)
            drafted.append(self._draft_argmax(lg[:, 0]))
        return torch.stack(drafted, dim=1)

    def _chain_tree(self, tokens: torch.Tensor) -> VerifyTree:
        """A drafted chain [B, S] in the verify layout (node i is the child of node i-1)."""
        b, s = tokens.shape
        return VerifyTree(tokens, self._chain_parents[:s].expand(b, s), self._cols[:s].expand(b, s),
                          self._chain_ancestors[:s, :s].expand(b, s, s))

    def _draft_tree_torch(self, roots: torch.Tensor, draft_hidden: torch.Tensor, draft_logits: torch.Tensor,
                          slots: torch.Tensor, lengths: torch.Tensor, max_length: int, keep: int,
                          span: slice | None) -> VerifyTree:
        """Propose candidates for every row and keep the best `keep` of them (EAGLE-2), in PyTorch."""
        k, steps, dev = self.spec.topk, self.spec.num_steps, self.runner.device
        b = roots.shape[0]
        ids, scores = expand(torch.zeros(b, 1, device=dev), *self._draft_topk(draft_logits[:, None]))
        tokens = [self._to_target_ids(ids)]
        all_scores = [scores]
        parents = [torch.full((b, k), -1, dtype=torch.long, device=dev)]
        frontier_cand = self._cols[:k].expand(b, k)  # candidate ids of the frontier
        frontier_hidden = draft_hidden[:, None].expand(b, k, -1)
        frontier_tokens, frontier_scores = tokens[0], scores
        visible = self._cols[:k, None].expand(b, k, 1)  # each child of the root sees itself (scratch node f)
        for depth in range(1, steps):
            start = (depth - 1) * k
            h, lg = self.draft.tree_step(slots, lengths, max_length, frontier_tokens, frontier_hidden, depth, start,
                                         visible, span)
            grown = grow(frontier_scores, *self._draft_topk(lg), h, frontier_cand, visible, (depth - 1) * k * k + k,
                         depth * k, self._d2t, self.loaded.hot_ids)
            tokens.append(grown.tokens)
            all_scores.append(grown.scores)
            parents.append(grown.parents)
            frontier_tokens, frontier_scores, frontier_hidden = grown.next_tokens, grown.next_scores, grown.next_hidden
            visible, frontier_cand = grown.next_visible, grown.next_cand
        cands = Candidates(torch.cat(tokens, 1), torch.cat(all_scores, 1), torch.cat(parents, 1),
                           self._cand_depths.expand(b, -1))
        return select_tree(cands, roots, keep, steps)

    def _draft_tree_kernels(self, roots: torch.Tensor, draft_hidden: torch.Tensor, draft_logits: torch.Tensor,
                            slots: torch.Tensor, lengths: torch.Tensor, max_length: int, keep: int) -> VerifyTree:
        """`_draft_tree_torch` with the fast drafter and two kernels of bookkeeping: per depth the drafter's top-k
        (`topk_logprobs`), then `tree_grow` (the candidates written in place, the next frontier and its token rows),
        and at the end `tree_select`. Each depth is three launches besides the drafter's own."""
        kn, k, steps = self.kernels, self.spec.topk, self.spec.num_steps
        b, dev = roots.shape[0], roots.device
        n_cand = self._cand_depths.numel()
        cand = (torch.empty(b, n_cand, dtype=torch.long, device=dev),
                torch.empty(b, n_cand, dtype=torch.float32, device=dev),
                torch.empty(b, n_cand, dtype=torch.long, device=dev))
        values, ids = kn.topk_logprobs(draft_logits, k)
        front = kn.tree_grow(self._root_scores[:b], values[:, None], ids[:, None], self._d2t, draft_hidden[:, None],
                             self._root_cand[:b], self._root_visible[:b], slots, lengths, *cand, 0, 0)
        for depth in range(1, steps):
            node_start = (depth - 1) * k
            h, lg = self.draft.tree_step_rows(front.rows(), max_length, node_start, k)
            values, ids = kn.topk_logprobs(lg, k)
            front = kn.tree_grow(front.scores, values.view(b, k, k), ids.view(b, k, k), self._d2t, h.view(b, k, -1),
                                 front.cand, front.visible.view(b, k, depth), slots, lengths, *cand,
                                 node_start * k + k, depth * k)
        return VerifyTree(*kn.tree_select(*cand, self._cand_depths, roots, keep, steps))

    # ------------------------------------------------------------------ verify, accept, extend
    def verify(self, tree: VerifyTree, lengths: torch.Tensor, ctx: int, slots: torch.Tensor,
               span: slice | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The target's forward over the tree's nodes after each row's committed `lengths` (node i sees node j when
        tree.ancestors[b, i, j]); `ctx` >= lengths.max() + S bounds the attended positions. Returns (logits
        [B, S, V], the captured layers [B, S, ...])."""
        return self.runner.tree_forward(tree.tokens, lengths[:, None] + tree.depths, lengths, tree.ancestors, slots,
                                        ctx, self.capture, span)

    def accept(self, tree: VerifyTree, logits: torch.Tensor, width: int) -> tuple[torch.Tensor, ...]:
        """Greedy acceptance: (the accepted path's verify-order nodes [B, width], root first, padded with the
        deepest; its length [B], the root included: the tokens the round emits; the bonus token [B]). width >=
        every path's length (num_steps + 1 does)."""
        if self.chain or tree.tokens.shape[1] == 1:  # a chain, or the root alone (`draft_tree` with keep = 0)
            accepted, bonus = chain_accept(tree.tokens, logits)
            return torch.minimum(self._cols[:width], accepted[:, None]), accepted + 1, bonus
        if self.fast:
            return self.kernels.tree_accept(tree.tokens, tree.parents, tree.depths, tree.ancestors,
                                            logits.argmax(dim=-1), width)
        acc = greedy_accept_device(tree, logits)
        return path_nodes(acc, width), acc.count, acc.bonus

    def compact(self, slots: torch.Tensor, lengths: torch.Tensor, path: torch.Tensor) -> None:
        """Move the target's K/V of each row's accepted path (`accept`'s nodes) to consecutive positions after its
        committed length. A chain's path is nodes 0..n-1: its K/V are in place already."""
        if not self.chain:
            self.runner.compact(slots, lengths, path)

    def extend(self, slots: torch.Tensor, lengths: torch.Tensor, max_length: int, ids: torch.Tensor,
               aux: torch.Tensor, path: torch.Tensor, count: torch.Tensor,
               span: slice | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Extend the drafter with the emitted tokens `ids` [B, W], each fed the verify forward's captured layers
        `aux` at its path node (`path` [B, W]). Returns the drafter's (hidden [B, H], logits [B, V_d]) after the
        last emitted token (column count-1); later columns are padding that no real query sees."""
        hidden = self.draft_input(aux.gather(1, path[..., None].expand(-1, -1, aux.shape[-1])))
        h, lg = self.draft.extend(slots, lengths, max_length, ids, hidden, span)
        last = (count - 1)[:, None, None]
        return h.gather(1, last.expand(-1, 1, h.shape[-1]))[:, 0], lg.gather(1, last.expand(-1, 1, lg.shape[-1]))[:, 0]


def emitted_tokens(tokens: torch.Tensor, path: torch.Tensor, count: torch.Tensor, bonus: torch.Tensor) -> torch.Tensor:
    """The tokens a round emits [B, W]: the tree `tokens` at the path's nodes after the root (`path` [B, W] in
    verify order, root first, `count` [B] nodes), then the bonus token, repeated as padding."""
    cols = torch.arange(path.shape[1], device=path.device)
    return torch.cat([tokens.gather(1, path[:, 1:]), bonus[:, None]], dim=1).where(
        cols < (count - 1)[:, None], bonus[:, None])
