"""`SpeculativeGenerator`: EAGLE chain/tree speculative decoding on the native engine's LlamaRunner.

Each round: the drafter proposes a tree (num_steps deep, topk wide, EAGLE-2 expansion), the best
num_draft_tokens-1 nodes plus the root are verified in ONE target forward with a tree mask, the longest
accepted path is committed to the target's KV cache (the rest rolled back), and the drafter's cache is
extended with the accepted tokens, fed the target's hidden states from that same verify forward.

Per round and greedy: the drafter runs num_steps times (the first on the newly accepted tokens only, over its own
KV cache), the target once over the num_draft_tokens tree nodes, and the host waits on the device once (the
acceptance decision). Lengths, slots, roots and the accepted tokens stay on the device between rounds; chains
(topk = 1) use a fixed tree layout and argmax drafting instead of the EAGLE-2 scoring and selection.

All-greedy rows (chains and trees) run through `RoundGraph` when `graph_rounds` is on (the default on CUDA): the
same round with static shapes and no host sync in it, captured as one CUDA graph per (rows, context bucket).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..engine.model import LlamaRunner, rms_norm
from ..engine.sampling import SamplingParams, filtered_probs, make_generator, sample_rows
from ..utils.compiled import compiled_on_cuda
from .accept import greedy_accept, path_nodes, sample_accept_row
from .config import SpecConfig
from .draft_runner import DraftRunner
from .drafter_loader import LoadedDrafter, load_exported_drafter
from .tree import Candidates, VerifyTree, draft_logprobs, expand, grow, select_tree, target_ids

OnTokens = Callable[[list[int]], bool]


@dataclass
class SpecStats:
    """Counters since the last reset: verification rounds, tokens emitted by them, and how many rounds
    accepted a draft token at each depth (position 1 = the first drafted token)."""

    rounds: int = 0
    tokens: int = 0
    accepted_at: list[int] = field(default_factory=list)

    @property
    def tau(self) -> float:
        """Tokens per verification round, the bonus token included."""
        return self.tokens / self.rounds if self.rounds else 0.0

    def acceptance_rates(self) -> list[float]:
        """P(draft position k accepted) per round, k = 1..num_steps."""
        return [a / self.rounds if self.rounds else 0.0 for a in self.accepted_at]


@dataclass
class _Rows:
    """Device state of the rows decoded together."""

    slots: list[int]
    params: list[SamplingParams]
    generators: list[torch.Generator | None]
    on_tokens: list[OnTokens]
    verify_ct: dict[int, int]  # slot -> verification rounds so far (shared by all row subsets of one batch)
    draft_hidden: torch.Tensor  # [B, H] drafter state after the root
    draft_logits: torch.Tensor  # [B, V_d] drafter logits after the root
    roots: torch.Tensor  # [B] the last committed token (the next tree's root), on the device
    lengths: torch.Tensor  # [B] committed lengths on the device (the host copy is runner.lengths)
    slots_t: torch.Tensor  # [B] `slots` on the device
    span: slice | None = None  # `slots` as a slice when consecutive (cache rows read as views)
    left: list[int] = field(default_factory=list)  # tokens each row may still emit by its max_new_tokens


def _span(slots: list[int]) -> slice | None:
    return slice(slots[0], slots[0] + len(slots)) if slots == list(range(slots[0], slots[0] + len(slots))) else None


class SpeculativeGenerator:
    """Speculative decoding with an exported SGLang-format drafter over the engine's LlamaRunner.

    `spec`: SpecConfig or dict(num_steps, topk, num_draft_tokens) in SGLang semantics (default 3, 1, 4).
    `graph_rounds`: decode all-greedy rows with `RoundGraph` (captured CUDA graphs on CUDA, the same static body
    run eagerly elsewhere); default on for CUDA runners unless the environment sets EAGLEPIPE_GRAPH_ROUNDS=0.
    """

    def __init__(self, runner: LlamaRunner, draft_dir: str | Path, spec: SpecConfig | dict | None = None,
                 drafter: LoadedDrafter | None = None, graph_rounds: bool | None = None):
        self.runner = runner
        self.spec = SpecConfig.from_any(spec)
        self.loaded = drafter or load_exported_drafter(draft_dir, runner.model_dir, runner.device, runner.dtype,
                                                       target_embed=runner.weights.embed,
                                                       target_lm_head=runner.weights.lm_head)
        cfg = self.loaded.config
        if cfg.vocab_size != runner.shapes.vocab_size:
            raise ValueError(f"the drafter's vocab ({cfg.vocab_size}) differs from the target's "
                             f"({runner.shapes.vocab_size})")
        self.drafter = self.loaded.model
        self.eagle3 = cfg.is_eagle3
        self.capture = list(cfg.aux_layers) if self.eagle3 else [runner.shapes.num_layers]
        capacity = runner.max_len + self.spec.num_steps * self.spec.topk + self.spec.num_steps + 2
        self.draft = DraftRunner(self.drafter, runner.max_slots, capacity, runner.device, runner.dtype)
        self.stats = SpecStats(accepted_at=[0] * self.spec.num_steps)
        runner._check_capture(self.capture)  # the verify forward below calls the runner's layers directly
        dev, n = runner.device, self.spec.num_draft_tokens
        self.chain = self.spec.topk == 1
        self._cols = torch.arange(runner.max_len + n + 1, device=dev)
        # a chain's fixed verify layout: node i is the child of node i-1 at depth i
        self._chain_parents = (self._cols[:n] - 1).clamp(min=0)
        self._chain_ancestors = torch.ones(n, n, dtype=torch.bool, device=dev).tril()
        k, steps = self.spec.topk, self.spec.num_steps
        self._cand_depths = torch.tensor([1] * k + [d + 1 for d in range(1, steps) for _ in range(k * k)], device=dev)
        self._d2t = getattr(self.drafter, "d2t", None) if self.eagle3 else None
        # the root's place in a fused tree expansion: score 0, no parent candidate, no scratch node seen
        self._root_scores = torch.zeros(runner.max_slots, 1, device=dev)
        self._root_cand = torch.full((runner.max_slots, 1), -1, dtype=torch.long, device=dev)
        self._root_visible = torch.zeros(runner.max_slots, 1, 0, dtype=torch.long, device=dev)
        # fixed for the generator's life: the drafter's top-k as the Triton kernels (`topk_logprobs`), with the fast
        # drafter and no token map, unless EAGLEPIPE_TOPK_KERNEL=0; and with them, a tree's bookkeeping as the
        # draft-tree kernels (`tree_grow` per depth, `tree_select`, `tree_accept`, `compact_path_kv`), unless
        # EAGLEPIPE_TREE_KERNELS=0
        fast = self.draft.fast
        self._topk_kernel = fast is not None and self.loaded.hot_ids is None \
            and cfg.draft_vocab_size <= self._kernels().topk.MAX_VOCAB and k <= self._kernels().topk.CHUNK \
            and os.environ.get("EAGLEPIPE_TOPK_KERNEL", "1") != "0"
        self._tree_kernels = self._topk_kernel and os.environ.get("EAGLEPIPE_TREE_KERNELS", "1") != "0"
        if graph_rounds is None:
            graph_rounds = dev.type == "cuda" and os.environ.get("EAGLEPIPE_GRAPH_ROUNDS", "1") != "0"
        self.round_graph = None
        if graph_rounds:
            from .round_graph import RoundGraph  # it builds on this module

            self.round_graph = RoundGraph(self)
            if not any(runner.lengths[:1]):  # batch-1 rounds (the engine's speculative slot 0) captured up front
                self.round_graph.prepare(1)

    @staticmethod
    def _kernels():
        """The speculative-decoding Triton kernels (imported only when the fast drafter is used)."""
        from . import kernels

        return kernels

    def reset_stats(self) -> None:
        """Zero the round/acceptance counters."""
        self.stats = SpecStats(accepted_at=[0] * self.spec.num_steps)

    # ------------------------------------------------------------------ engine hook
    def generate(self, prompt_ids: Sequence[int], params: SamplingParams, slot: int, on_tokens: OnTokens) -> int:
        """Decode one request in `slot`; `on_tokens(new)` returns True to stop. Returns spec_verify_ct."""
        return self.generate_batch([prompt_ids], [params], [slot], [on_tokens])[0]

    def generate_batch(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams],
                       slots: Sequence[int], on_tokens: Sequence[OnTokens],
                       generators: Sequence[torch.Generator | None] | None = None) -> list[int]:
        """Decode several requests in lockstep (one verify forward per round for all). Returns spec_verify_ct
        per request: the number of verification rounds it took part in."""
        if not (len(prompts) == len(params) == len(slots) == len(on_tokens)) or not prompts:
            raise ValueError("generate_batch needs one params, slot and callback per prompt")
        gens = list(generators) if generators is not None else [make_generator(p, self.runner.device) for p in params]
        verify_ct = {s: 0 for s in slots}
        with torch.inference_mode():
            rows = self._prefill(prompts, list(params), list(slots), gens, list(on_tokens), verify_ct)
            if rows is not None and self.round_graph is not None and all(p.greedy for p in rows.params):
                rows = self.round_graph.decode(rows)  # hands back the rows that near the cache's end
            while rows is not None:
                rows = self._round(rows)
        return [verify_ct[s] for s in slots]

    # ------------------------------------------------------------------ pieces
    def _draft_hidden(self, aux: torch.Tensor) -> torch.Tensor:
        """What the drafter is fed from the target: fused aux layers (EAGLE-3) or the final post-norm hidden
        state (EAGLE-1/2, as the target's lm_head consumes it and as SGLang hands it over)."""
        if self.eagle3:
            return self.drafter.fuse(aux)
        return rms_norm(aux, self.runner.weights.norm, self.runner.shapes.rms_norm_eps)

    def _drafter_logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        return draft_logprobs(logits, self.loaded.hot_ids)

    def _draft_topk(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The drafter's `topk` best tokens at each of F nodes: (log-probs, draft ids) [B, F, topk]. With the
        fast drafter, two short Triton launches (`topk_logprobs`) instead of a log-softmax and PyTorch's top-k
        (unless EAGLEPIPE_TOPK_KERNEL=0)."""
        k = self.spec.topk
        b, f, v = logits.shape
        if self._topk_kernel:
            values, ids = self._kernels().topk_logprobs(logits.reshape(b * f, v), k)
            return values.view(b, f, k), ids.view(b, f, k)
        return self._drafter_logprobs(logits).topk(k, dim=-1)

    def _to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return target_ids(draft_ids, self._d2t, self.loaded.hot_ids)

    def _draft_argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """The drafter's top-1 proposal as a target id (a chain needs no log-probs: no selection follows)."""
        if self.loaded.hot_ids is not None:
            logits = logits[..., self.loaded.hot_ids]
        return self._to_target_ids(logits.argmax(dim=-1))

    def _prefill(self, prompts: Sequence[Sequence[int]], params: list[SamplingParams], slots: list[int],
                 gens: list[torch.Generator | None], on_tokens: list[OnTokens],
                 verify_ct: dict[int, int]) -> _Rows | None:
        """Prefill the target (capturing the drafter's inputs) and the drafter, then emit the first token. The
        drafter's work is queued before the host waits for the first token, so on a GPU its launches overlap the
        target's prefill; every host-to-device copy comes before the target's forward, where it waits on nothing."""
        dev = self.runner.device
        shifted = [torch.tensor(list(p[1:]), dtype=torch.long, device=dev) for p in prompts]
        slots_t = torch.tensor(list(slots), device=dev)
        zero = torch.zeros(1, dtype=torch.long, device=dev)
        out = self.runner.prefill(prompts, slots, capture_layers=self.capture)
        first_t = sample_rows(out.last_logits, params, gens)
        drafted = []
        for i, slot in enumerate(slots):
            ids = torch.cat([shifted[i], first_t[i:i + 1]])[None]  # the drafter's tokens: one ahead of the target's
            fused = self._draft_hidden(out.aux_hidden[i][None])
            h, lg = self.draft.extend(slots_t[i:i + 1], zero, 0, ids, fused, slice(slot, slot + 1))
            drafted.append((h[0, -1], lg[0, -1]))
        first = first_t.tolist()
        keep = [i for i, tok in enumerate(first) if not on_tokens[i]([tok])]
        hidden = [drafted[i][0] for i in keep]
        logits = [drafted[i][1] for i in keep]
        if not keep:
            return None
        kept = [slots[i] for i in keep]
        idx = torch.tensor(keep, device=dev)
        return _Rows(kept, [params[i] for i in keep], [gens[i] for i in keep], [on_tokens[i] for i in keep],
                     verify_ct, torch.stack(hidden), torch.stack(logits), first_t[idx],
                     torch.tensor([self.runner.lengths[s] for s in kept], device=dev), torch.tensor(kept, device=dev),
                     _span(kept), [params[i].max_new_tokens - 1 for i in keep])

    def _draft(self, roots: torch.Tensor, draft_hidden: torch.Tensor, draft_logits: torch.Tensor,
               slots_t: torch.Tensor, lengths: torch.Tensor, max_length: int, keep: int,
               span: slice | None) -> VerifyTree:
        """The round's verify tree: the root and `keep` drafted nodes per row, a chain or an EAGLE-2 tree. Device
        only, no host sync; `max_length` >= every row's committed length."""
        if self.chain:
            return self._chain_tree(self._draft_chain(roots, draft_hidden, draft_logits, slots_t, lengths, max_length,
                                                      keep, span))
        return self._draft_tree(roots, draft_hidden, draft_logits, slots_t, lengths, max_length, keep, span)

    def _draft_chain(self, roots: torch.Tensor, draft_hidden: torch.Tensor, draft_logits: torch.Tensor,
                     slots_t: torch.Tensor, lengths: torch.Tensor, max_length: int, keep: int,
                     span: slice | None) -> torch.Tensor:
        """The root and a chain of `keep` drafted tokens after it [B, keep+1] (topk = 1): keep-1 drafter steps, no
        host sync. `max_length` >= every row's committed length."""
        drafted = [roots]
        if keep:
            drafted.append(self._draft_argmax(draft_logits))
        hidden = draft_hidden[:, None]
        for depth in range(1, keep):
            hidden, lg = self.draft.chain_step(slots_t, lengths, max_length, drafted[-1][:, None], hidden, depth, span)
            drafted.append(self._draft_argmax(lg[:, 0]))
        return torch.stack(drafted, dim=1)

    def _chain_tree(self, tokens: torch.Tensor) -> VerifyTree:
        """A drafted chain [B, S] in the verify layout (node i is the child of node i-1)."""
        b, s = tokens.shape
        return VerifyTree(tokens, self._chain_parents[:s].expand(b, s), self._cols[:s].expand(b, s),
                          self._chain_ancestors[:s, :s].expand(b, s, s))

    def _draft_tree(self, roots: torch.Tensor, draft_hidden: torch.Tensor, draft_logits: torch.Tensor,
                    slots_t: torch.Tensor, lengths: torch.Tensor, max_length: int, keep: int,
                    span: slice | None) -> VerifyTree:
        """Propose candidates for every row and keep the best `keep` of them (EAGLE-2). Between drafter steps the
        bookkeeping runs as the draft-tree kernels (`_draft_tree_fused`) or else as compiled functions on CUDA
        (`grow`, `tree_rows`, `select_tree`)."""
        if keep and self._tree_kernels:
            return self._draft_tree_fused(roots, draft_hidden, draft_logits, slots_t, lengths, max_length, keep)
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
            h, lg = self.draft.tree_step(slots_t, lengths, max_length, frontier_tokens, frontier_hidden, depth, start,
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

    def _draft_tree_fused(self, roots: torch.Tensor, draft_hidden: torch.Tensor, draft_logits: torch.Tensor,
                          slots_t: torch.Tensor, lengths: torch.Tensor, max_length: int, keep: int) -> VerifyTree:
        """`_draft_tree` with the fast drafter and two kernels of bookkeeping: per depth the drafter's top-k, then
        `tree_grow` (the candidates written in place, the next frontier and its token rows), and at the end
        `tree_select`. Each depth is two launches besides the drafter's own."""
        kn, k, steps = self._kernels(), self.spec.topk, self.spec.num_steps
        b, dev = roots.shape[0], roots.device
        n_cand = self._cand_depths.numel()
        cand = (torch.empty(b, n_cand, dtype=torch.long, device=dev),
                torch.empty(b, n_cand, dtype=torch.float32, device=dev),
                torch.empty(b, n_cand, dtype=torch.long, device=dev))
        values, ids = kn.topk_logprobs(draft_logits, k)
        front = kn.tree_grow(self._root_scores[:b], values[:, None], ids[:, None], self._d2t, draft_hidden[:, None],
                             self._root_cand[:b], self._root_visible[:b], slots_t, lengths, *cand, 0, 0)
        for depth in range(1, steps):
            node_start = (depth - 1) * k
            h, lg = self.draft.tree_step_rows(front.rows(), max_length, node_start, k)
            values, ids = kn.topk_logprobs(lg, k)
            front = kn.tree_grow(front.scores, values.view(b, k, k), ids.view(b, k, k), self._d2t, h.view(b, k, -1),
                                 front.cand, front.visible.view(b, k, depth), slots_t, lengths, *cand,
                                 node_start * k + k, depth * k)
        return VerifyTree(*kn.tree_select(*cand, self._cand_depths, roots, keep, steps))

    def _verify(self, rows: _Rows, tree: VerifyTree, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The target's forward over the tree nodes, attending over the tightest span (`max_length` = the longest
        committed length). Returns (logits [B, S, V], captured aux hidden states [B, S, ...])."""
        return self._verify_static(tree.tokens, rows.lengths[:, None] + tree.depths, rows.lengths, tree.ancestors,
                                   max_length + tree.tokens.shape[1], rows.slots_t, rows.span)

    def _verify_static(self, tokens: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor,
                       ancestors: torch.Tensor, ctx: int, slots_t: torch.Tensor,
                       span: slice | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The target's forward over S pending tokens per row (`LlamaRunner.tree_forward`: static shapes, device
        state only, no host sync, so safe to capture in a CUDA graph). Node i sees node j when
        ancestors[b, i, j]; `ctx` >= lengths.max() + S. Returns (logits [B, S, V], aux hidden states [B, S, ...])."""
        return self.runner.tree_forward(tokens, positions, lengths, ancestors, slots_t, ctx, self.capture, span)

    def _round(self, rows: _Rows) -> _Rows | None:
        """One draft-verify-commit round for all rows; returns the rows still decoding (None when all stopped)."""
        runner, dev = self.runner, self.runner.device
        lengths_h = [runner.lengths[s] for s in rows.slots]
        max_length = max(lengths_h)
        room = runner.max_len - max_length
        if room < 1:
            return None
        keep = min(self.spec.num_draft_tokens - 1, room - 1)
        tree = self._draft(rows.roots, rows.draft_hidden, rows.draft_logits, rows.slots_t, rows.lengths, max_length,
                           keep, rows.span)
        logits, aux = self._verify(rows, tree, max_length)
        if all(p.greedy for p in rows.params):
            acc = greedy_accept(tree, logits)  # the round's one host sync
            paths, bonus, tree_tokens = acc.paths, acc.bonus, acc.tree_tokens
            idx = path_nodes(acc.device, max(len(p) for p in paths))
            n, roots = acc.device.count, acc.device.bonus
        else:
            paths, bonus, tree_tokens = self._sample_accept(rows, tree, logits)
            n_max = max(len(p) for p in paths)
            idx = torch.tensor([p + [p[-1]] * (n_max - len(p)) for p in paths], device=dev)
            n = torch.tensor([len(p) for p in paths], device=dev)
            roots = torch.tensor(bonus, device=dev)
        if any(p != list(range(len(p))) for p in paths):  # compact the accepted K/V on the device
            self._compact_kv(rows.slots_t, rows.lengths, idx)
        for r, slot in enumerate(rows.slots):
            runner.commit(slot, len(paths[r]))  # K/V already in place: only the host length moves
            rows.verify_ct[slot] += 1
        self._count(rows, [len(p) for p in paths])
        new_tokens = [[tree_tokens[r][i] for i in path[1:]] + [bonus[r]] for r, path in enumerate(paths)]
        ids = emitted_tokens(tree.tokens, idx, n, roots)
        rows.draft_hidden, rows.draft_logits = self._extend_draft(rows.slots_t, rows.lengths, max_length, ids, aux,
                                                                  idx, n, rows.span)
        rows.roots = roots
        rows.lengths = rows.lengths + n
        alive = [r for r in range(len(rows.slots)) if not rows.on_tokens[r](new_tokens[r])]
        if not alive:
            return None
        if len(alive) < len(rows.slots):
            rows = _select(rows, alive)
        return rows

    def _sample_accept(self, rows: _Rows, tree: VerifyTree,
                       logits: torch.Tensor) -> tuple[list[list[int]], list[int], list[list[int]]]:
        """Per-row acceptance when some row samples: (paths in verify order, bonus tokens, tree tokens)."""
        tree_tokens, parents = tree.tokens.tolist(), tree.parents.tolist()
        paths, bonus = [], []
        for r, p in enumerate(rows.params):
            if p.greedy:
                one = greedy_accept(tree.row(r), logits[r:r + 1])
                paths.append(one.paths[0])
                bonus.append(one.bonus[0])
            else:
                path, tok = sample_accept_row(tree_tokens[r], parents[r], filtered_probs(logits[r], p),
                                              rows.generators[r])
                paths.append(path)
                bonus.append(tok)
        return paths, bonus, tree_tokens

    def _compact_kv(self, slots_t: torch.Tensor, lengths: torch.Tensor, path: torch.Tensor) -> None:
        """Move the target's K/V of the accepted path (verify-order nodes `path` [B, W], root first) to consecutive
        cache positions after each row's committed length, on the device with static shapes. Columns past a
        path's end copy its deepest node past the new committed end, where nothing reads it. With the tree
        kernels, one launch (`compact_path_kv`)."""
        if self._tree_kernels:
            self._kernels().compact_path_kv(self.runner.k_cache, self.runner.v_cache, slots_t, lengths,
                                                    path.contiguous())
            return
        b, w = path.shape
        src = lengths[:, None] + path
        dst = lengths[:, None] + self._cols[:w]
        r = slots_t[:, None].expand(b, w)
        for cache in (self.runner.k_cache, self.runner.v_cache):
            cache[:, r, :, dst] = cache[:, r, :, src]

    def _extend_draft(self, slots_t: torch.Tensor, lengths: torch.Tensor, max_length: int, ids: torch.Tensor,
                      aux: torch.Tensor, path: torch.Tensor, count: torch.Tensor,
                      span: slice | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Extend the drafter with the emitted tokens `ids` [B, W], each fed the verify forward's hidden state at
        its path node (`path` [B, W]). Returns the drafter's (hidden [B, H], logits [B, V_d]) after the last
        emitted token (column count-1); later columns are padding that no real query sees."""
        hidden = self._draft_hidden(aux.gather(1, path[..., None].expand(-1, -1, aux.shape[-1])))
        h, lg = self.draft.extend(slots_t, lengths, max_length, ids, hidden, span)
        last = (count - 1)[:, None, None]
        return h.gather(1, last.expand(-1, 1, h.shape[-1]))[:, 0], lg.gather(1, last.expand(-1, 1, lg.shape[-1]))[:, 0]

    def _count(self, rows: _Rows, path_lengths: list[int]) -> None:
        """Count one round per row; a path of n nodes (the root included) emits n tokens: n-1 drafts + the bonus,
        which come off each row's `left`."""
        rows.left = [left - n for left, n in zip(rows.left, path_lengths)]
        for n in path_lengths:
            self.stats.rounds += 1
            self.stats.tokens += n
            for d in range(n - 1):
                self.stats.accepted_at[d] += 1


@compiled_on_cuda
def emitted_tokens(tokens: torch.Tensor, path: torch.Tensor, count: torch.Tensor, bonus: torch.Tensor) -> torch.Tensor:
    """The tokens a round emits [B, W]: the tree `tokens` at the path's nodes after the root (`path` [B, W] in
    verify order, root first, `count` [B] nodes), then the bonus token, repeated as padding."""
    cols = torch.arange(path.shape[1], device=path.device)
    return torch.cat([tokens.gather(1, path[:, 1:]), bonus[:, None]], dim=1).where(
        cols < (count - 1)[:, None], bonus[:, None])


def _select(rows: _Rows, keep: list[int]) -> _Rows:
    idx = torch.tensor(keep, device=rows.draft_hidden.device)
    pick = lambda xs: [xs[i] for i in keep]  # noqa: E731
    slots = pick(rows.slots)
    return _Rows(slots, pick(rows.params), pick(rows.generators), pick(rows.on_tokens), rows.verify_ct,
                 rows.draft_hidden[idx], rows.draft_logits[idx], rows.roots[idx], rows.lengths[idx],
                 rows.slots_t[idx], _span(slots), pick(rows.left))
