"""`SpeculativeGenerator`: EAGLE chain/tree speculative decoding on the native engine's LlamaRunner.

Each round: the drafter proposes a tree (num_steps deep, topk wide, EAGLE-2 expansion), the best
num_draft_tokens-1 nodes plus the root are verified in ONE target forward with a tree mask, the longest
accepted path is committed to the target's KV cache (the rest rolled back), and the drafter's cache is
extended with the accepted tokens, fed the target's hidden states from that same verify forward.

Per round and greedy: the drafter runs num_steps times (the first on the newly accepted tokens only, over its own
KV cache), the target once over the num_draft_tokens tree nodes, and the host waits on the device once (the
acceptance decision). Lengths, slots, roots and the accepted tokens stay on the device between rounds; chains
(topk = 1) use a fixed tree layout and argmax drafting instead of the EAGLE-2 scoring and selection. The
device side of a round is `RoundSteps`.

All-greedy rows (chains and trees) run through `RoundGraph` when the `graph_rounds` option is on (by default on
CUDA): the same round with static shapes and no host sync in it, captured as one CUDA graph per (rows, context
bucket).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..config.schema import EngineOptions
from ..engine.model import LlamaRunner
from ..engine.options import resolve_options
from ..engine.sampling import SamplingParams, filtered_probs, make_rng, sample_rows
from ..families.registry import family_of
from .accept import greedy_accept, sample_accept_row
from .config import SpecConfig
from .drafter_loader import LoadedDrafter, load_exported_drafter
from .parallel_round import ParallelRoundSteps
from .steps import RoundSteps, emitted_tokens, kernels_fit
from .tree import VerifyTree

OnTokens = Callable[[list[int]], bool]
# the device side of a round for each family's `draft_round`
ROUNDS = {"sequential": RoundSteps, "parallel": ParallelRoundSteps}


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


def slot_span(slots: list[int]) -> slice | None:
    """`slots` as a slice when they are consecutive (cache rows are then read as views), else None."""
    return slice(slots[0], slots[0] + len(slots)) if slots == list(range(slots[0], slots[0] + len(slots))) else None


@dataclass
class Rows:
    """Device state of the requests decoded together (`SpeculativeGenerator.start` makes it, rounds advance it)."""

    slots: list[int]
    params: list[SamplingParams]
    rngs: list[random.Random | None]
    on_tokens: list[OnTokens]
    verify_ct: dict[int, int]  # slot -> verification rounds so far (shared by all row subsets of one batch)
    draft_hidden: torch.Tensor  # [B, H] drafter state after the root
    draft_logits: torch.Tensor  # [B, V_d] drafter logits after the root
    roots: torch.Tensor  # [B] the last committed token (the next tree's root), on the device
    lengths: torch.Tensor  # [B] committed lengths on the device (the host copy is runner.lengths)
    slots_t: torch.Tensor  # [B] `slots` on the device
    span: slice | None = None  # `slots` as a slice when consecutive (cache rows read as views)
    left: list[int] = field(default_factory=list)  # tokens each row may still emit by its max_new_tokens

    def select(self, keep: list[int]) -> "Rows":
        """The rows at the indices `keep` (in that order)."""
        idx = torch.tensor(keep, device=self.draft_hidden.device)
        slots = [self.slots[i] for i in keep]
        return Rows(slots, [self.params[i] for i in keep], [self.rngs[i] for i in keep],
                    [self.on_tokens[i] for i in keep], self.verify_ct, self.draft_hidden[idx], self.draft_logits[idx],
                    self.roots[idx], self.lengths[idx], self.slots_t[idx], slot_span(slots),
                    [self.left[i] for i in keep])


class SpeculativeGenerator:
    """Speculative decoding with an exported SGLang-format drafter over the engine's LlamaRunner.

    `spec`: SpecConfig or dict(num_steps, topk, num_draft_tokens) in SGLang semantics (default 3, 1, 4).
    `options`: the fast paths (default: the runner's). With `token_path`, an EAGLE-3/3.1 or EAGLE-1/2 drafter's
    steps, top-k and tree bookkeeping run as Triton kernels; with `graph_rounds`, all-greedy rows decode through
    `RoundGraph` (captured CUDA graphs on CUDA, the same static body run eagerly elsewhere).
    """

    def __init__(self, runner: LlamaRunner, draft_dir: str | Path, spec: SpecConfig | dict | None = None,
                 drafter: LoadedDrafter | None = None, options: EngineOptions | None = None):
        self.runner = runner
        self.spec = SpecConfig.from_any(spec)
        self.options = runner.options if options is None else resolve_options(options, runner.device)
        self.loaded = drafter or load_exported_drafter(draft_dir, runner.model_dir, runner.device, runner.dtype,
                                                       target_embed=runner.weights.embed,
                                                       target_lm_head=runner.weights.lm_head)
        if self.loaded.config.vocab_size != runner.shapes.vocab_size:
            raise ValueError(f"the drafter's vocab ({self.loaded.config.vocab_size}) differs from the target's "
                             f"({runner.shapes.vocab_size})")
        fast = self.options.token_path and kernels_fit(self.loaded, self.spec)
        draft_round = family_of(self.loaded.config).draft_round
        if draft_round not in ROUNDS:
            raise ValueError(f"no speculative round drafts as {draft_round!r} (a {self.loaded.config.algorithm} "
                             f"drafter); the rounds are {sorted(ROUNDS)}")
        self.steps = ROUNDS[draft_round](runner, self.loaded, self.spec, fast)
        self.stats = SpecStats(accepted_at=[0] * self.spec.num_steps)
        self.round_graph = None
        if self.options.graph_rounds:
            from .round_graph import RoundGraph  # it builds on this module

            self.round_graph = RoundGraph(self)
            if not any(runner.lengths[:1]):  # batch-1 rounds (the engine's speculative slot 0) captured up front
                self.round_graph.prepare(1)

    def reset_stats(self) -> None:
        """Zero the round/acceptance counters."""
        self.stats = SpecStats(accepted_at=[0] * self.spec.num_steps)

    # ------------------------------------------------------------------ engine hook
    def generate(self, prompt_ids: Sequence[int], params: SamplingParams, slot: int, on_tokens: OnTokens) -> int:
        """Decode one request in `slot`; `on_tokens(new)` returns True to stop. Returns spec_verify_ct."""
        return self.generate_batch([prompt_ids], [params], [slot], [on_tokens])[0]

    def generate_batch(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams],
                       slots: Sequence[int], on_tokens: Sequence[OnTokens],
                       rngs: Sequence[random.Random | None] | None = None) -> list[int]:
        """Decode several requests in lockstep (one verify forward per round for all). Returns spec_verify_ct
        per request: the number of verification rounds it took part in."""
        if not (len(prompts) == len(params) == len(slots) == len(on_tokens)) or not prompts:
            raise ValueError("generate_batch needs one params, slot and callback per prompt")
        verify_ct = {s: 0 for s in slots}
        with torch.inference_mode():
            rows = self.start(prompts, params, slots, on_tokens, rngs, verify_ct)
            if rows is not None and self.round_graph is not None and all(p.greedy for p in rows.params):
                rows = self.round_graph.decode(rows)  # hands back the rows that near the cache's end
            while rows is not None:
                rows = self.round(rows)
        return [verify_ct[s] for s in slots]

    # ------------------------------------------------------------------ the request flow
    def start(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams], slots: Sequence[int],
              on_tokens: Sequence[OnTokens], rngs: Sequence[random.Random | None] | None = None,
              verify_ct: dict[int, int] | None = None) -> Rows | None:
        """Prefill the target (capturing the drafter's inputs) and the drafter, then emit each request's first token.
        Returns the rows still decoding (None when every request stopped at its first token); their verification
        rounds are counted in `verify_ct` (default: a new dict, `Rows.verify_ct`).

        The drafter's work is queued before the host waits for the first token, so on a GPU its launches overlap
        the target's prefill; every host-to-device copy comes before the target's forward, where it waits on
        nothing."""
        dev = self.runner.device
        params, slots = list(params), list(slots)
        rngs = list(rngs) if rngs is not None else [make_rng(p) for p in params]
        verify_ct = {s: 0 for s in slots} if verify_ct is None else verify_ct
        shifted = [torch.tensor(list(p[1:]), dtype=torch.long, device=dev) for p in prompts]
        slots_t = torch.tensor(slots, device=dev)
        out = self.runner.prefill(prompts, slots, capture_layers=self.steps.capture)
        first_t = sample_rows(out.last_logits, params, rngs)
        drafted = []
        for i, slot in enumerate(slots):
            ids = torch.cat([shifted[i], first_t[i:i + 1]])[None]  # the drafter's tokens: one ahead of the target's
            fused = self.steps.draft_input(out.aux_hidden[i][None])
            drafted.append(self.steps.start(slots_t[i:i + 1], ids, fused, slice(slot, slot + 1)))
        first = first_t.tolist()
        keep = [i for i, tok in enumerate(first) if not on_tokens[i]([tok])]
        if not keep:
            return None
        kept = [slots[i] for i in keep]
        idx = torch.tensor(keep, device=dev)
        return Rows(kept, [params[i] for i in keep], [rngs[i] for i in keep], [on_tokens[i] for i in keep],
                    verify_ct, torch.stack([drafted[i][0] for i in keep]), torch.stack([drafted[i][1] for i in keep]),
                    first_t[idx], torch.tensor([self.runner.lengths[s] for s in kept], device=dev),
                    torch.tensor(kept, device=dev), slot_span(kept), [params[i].max_new_tokens - 1 for i in keep])

    def round(self, rows: Rows) -> Rows | None:
        """One draft-verify-commit round for all rows, eagerly (any sampling, any room left in the cache); returns
        the rows still decoding (None when all stopped)."""
        runner, dev, steps = self.runner, self.runner.device, self.steps
        max_length = max(runner.lengths[s] for s in rows.slots)
        room = runner.max_len - max_length
        if room < 1:
            return None
        keep = min(self.spec.num_draft_tokens - 1, room - 1)
        tree = steps.draft_tree(rows.roots, rows.draft_hidden, rows.draft_logits, rows.slots_t, rows.lengths,
                                max_length, keep, rows.span)
        size = tree.tokens.shape[1]
        logits, aux = steps.verify(tree, rows.lengths, max_length + size, rows.slots_t, rows.span)
        if all(p.greedy for p in rows.params):
            idx, n, roots = steps.accept(tree, logits, size)
            packed = torch.cat([n[:, None], roots[:, None], idx, tree.tokens], dim=1).tolist()  # the one host sync
            counts, bonus = [row[0] for row in packed], [row[1] for row in packed]
            paths = [row[2:2 + c] for row, c in zip(packed, counts)]
            tree_tokens = [row[2 + size:] for row in packed]
            idx = idx[:, :max(counts)]  # the columns past a path's end repeat its deepest node
        else:
            paths, bonus, tree_tokens = self._sample_accept(rows, tree, logits)
            counts = [len(p) for p in paths]
            idx = torch.tensor([p + [p[-1]] * (max(counts) - len(p)) for p in paths], device=dev)
            n = torch.tensor(counts, device=dev)
            roots = torch.tensor(bonus, device=dev)
        if any(p != list(range(len(p))) for p in paths):  # compact the accepted K/V on the device
            steps.compact(rows.slots_t, rows.lengths, idx)
        for slot, count in zip(rows.slots, counts):
            runner.commit(slot, count)  # K/V already in place: only the host length moves
            rows.verify_ct[slot] += 1
        self.record_round(rows, counts)
        new_tokens = [[tree_tokens[r][i] for i in path[1:]] + [bonus[r]] for r, path in enumerate(paths)]
        ids = emitted_tokens(tree.tokens, idx, n, roots)
        rows.draft_hidden, rows.draft_logits = steps.extend(rows.slots_t, rows.lengths, max_length, ids, aux, idx,
                                                            n, rows.span)
        rows.roots = roots
        rows.lengths = rows.lengths + n
        alive = [r for r in range(len(rows.slots)) if not rows.on_tokens[r](new_tokens[r])]
        if not alive:
            return None
        return rows.select(alive) if len(alive) < len(rows.slots) else rows

    def _sample_accept(self, rows: Rows, tree: VerifyTree,
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
                                              rows.rngs[r])
                paths.append(path)
                bonus.append(tok)
        return paths, bonus, tree_tokens

    def record_round(self, rows: Rows, path_lengths: list[int]) -> None:
        """Count one round per row; a path of n nodes (the root included) emits n tokens: n-1 drafts + the bonus,
        which come off each row's `left`."""
        rows.left = [left - n for left, n in zip(rows.left, path_lengths)]
        for n in path_lengths:
            self.stats.rounds += 1
            self.stats.tokens += n
            for d in range(n - 1):
                self.stats.accepted_at[d] += 1
