"""`ChainRoundGraph`: the greedy chain round (topk = 1) of `SpeculativeGenerator` as one static-shape,
host-sync-free body over preallocated device buffers, captured as one CUDA graph per (rows, context bucket, slots).

The body drafts num_steps tokens after the root with the drafter's argmax, verifies root + drafts in one target
forward, accepts up to the first mismatch on the device, commits by advancing the device lengths (a chain's
accepted K/V are already consecutive in the cache), extends the drafter with the accepted tokens fed the verify
forward's hidden states, and leaves the emitted tokens and their count in one buffer that the host reads with a
single copy. Shapes depend only on the number of rows B and the context bucket `ctx` (a power of two >= the
longest committed length + num_draft_tokens): attention spans `ctx` cache positions and masks everything past
each row's own tokens, which gives what the eager round computes over its tighter span (up to float
summation order).

Row r of the buffers is the r-th row of the batch (its cache slot is `slots[r]`). On CPU, or with
`use_cuda_graph=False`, the body simply runs eagerly: the tests exercise the same code that is captured on CUDA.
"""
from __future__ import annotations

import torch

from .generator import SpeculativeGenerator, _Rows, _select


def context_buckets(max_len: int, min_ctx: int) -> list[int]:
    """Attention spans a round may use: min_ctx, 2*min_ctx, ... below max_len, then max_len."""
    ctx, sizes = min(min_ctx, max_len), []
    while ctx < max_len:
        sizes.append(ctx)
        ctx *= 2
    return sizes + [max_len]


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


class ChainRoundGraph:
    """Greedy chain rounds of `gen` on static device buffers, replayed from CUDA graphs captured lazily per
    (B, ctx bucket, slot layout), or run eagerly off CUDA.

    `decode(rows)` runs rounds until every row stops, or hands the rows back (their device state written back)
    once a row nears the cache's end, for the eager `_round` to finish with shorter chains.
    """

    def __init__(self, gen: SpeculativeGenerator, min_ctx: int = 256, use_cuda_graph: bool | None = None):
        if not gen.chain:
            raise ValueError(f"ChainRoundGraph needs a chain (topk = 1), got {gen.spec.name}")
        runner = gen.runner
        dev = runner.device
        self.use_cuda_graph = dev.type == "cuda" if use_cuda_graph is None else use_cuda_graph
        if self.use_cuda_graph and dev.type != "cuda":
            raise ValueError("CUDA graphs need a runner on a CUDA device")
        self.gen = gen
        self.size = gen.spec.num_draft_tokens  # S: tokens verified per round, the root included
        self.ctx_sizes = context_buckets(runner.max_len, min_ctx)
        rows, cfg = runner.max_slots, gen.loaded.config
        self.slots = torch.zeros(rows, dtype=torch.long, device=dev)
        self.roots = torch.zeros(rows, dtype=torch.long, device=dev)  # the last committed token per row
        self.lengths = torch.zeros(rows, dtype=torch.long, device=dev)  # the target's committed lengths
        self.draft_hidden = torch.zeros(rows, cfg.hidden_size, dtype=runner.dtype, device=dev)
        self.draft_logits = torch.zeros(rows, cfg.draft_vocab_size, dtype=runner.dtype, device=dev)
        # per row: the round's emitted tokens (accepted drafts, the bonus token, padding), then their count
        self.emitted = torch.zeros(rows, self.size + 1, dtype=torch.long, device=dev)
        self.cols = torch.arange(self.size, device=dev)
        self.graphs: dict[tuple[int, int, int | None], torch.cuda.CUDAGraph] = {}
        self.pool = None  # one memory pool shared by every graph, made at the first capture

    def prepare(self, rows: int = 1) -> None:
        """Capture the rounds of `rows` rows in slots 0..rows-1 for every context bucket now, so that no capture
        lands inside a timed decode. Only while those slots hold no sequence: the warm-up runs write K/V there."""
        if not self.use_cuda_graph:
            return
        if any(self.gen.runner.lengths[:rows]):
            raise RuntimeError(f"slots 0..{rows - 1} hold live sequences; prepare() would overwrite their K/V")
        for buf in self._state(rows):
            buf.zero_()
        self.slots[:rows].copy_(torch.arange(rows, device=self.slots.device))
        for ctx in self.ctx_sizes:
            self._graph(rows, ctx, slice(0, rows))

    # ------------------------------------------------------------------ host side
    def decode(self, rows: _Rows) -> _Rows | None:
        """Run greedy chain rounds for `rows` (every row greedy). Returns None once every row has stopped, or
        the rows still decoding when one of them has no room left for a whole chain."""
        self._load(rows)
        while True:
            ctx = self._bucket(rows.slots)
            if ctx is None:
                self._store(rows)
                return rows
            alive = self._emit(rows, self._run(len(rows.slots), ctx, rows.span))
            if not alive:
                return None
            if len(alive) < len(rows.slots):
                self._store(rows)
                rows = _select(rows, alive)
                self._load(rows)

    def _bucket(self, slots: list[int]) -> int | None:
        """The smallest context bucket that holds every row's next chain; None when a row would pass max_len."""
        needed = max(self.gen.runner.lengths[s] for s in slots) + self.size
        return next((c for c in self.ctx_sizes if c >= needed), None)

    def _run(self, b: int, ctx: int, span: slice | None) -> list[list[int]]:
        """One round for rows 0..b-1; returns the `emitted` rows, read with the round's one device->host copy."""
        if self.use_cuda_graph:
            self._graph(b, ctx, span).replay()
        else:
            self._body(b, ctx, span)
        return self.emitted[:b].cpu().tolist()

    def _emit(self, rows: _Rows, emitted: list[list[int]]) -> list[int]:
        """Commit on the host, count, and stream the round's tokens as `_round` does; returns the rows that go on."""
        gen, s = self.gen, self.size
        counts = [row[s] for row in emitted]
        for slot, n in zip(rows.slots, counts):
            gen.runner.commit(slot, n)  # the K/V are in place: only the host length moves
            rows.verify_ct[slot] += 1
        gen._count(counts)
        return [r for r, (row, n) in enumerate(zip(emitted, counts)) if not rows.on_tokens[r](row[:n])]

    def _state(self, b: int) -> tuple[torch.Tensor, ...]:
        """The round's inputs for rows 0..b-1: slots, roots, lengths, draft_hidden, draft_logits."""
        return self.slots[:b], self.roots[:b], self.lengths[:b], self.draft_hidden[:b], self.draft_logits[:b]

    def _load(self, rows: _Rows) -> None:
        """Copy the rows' device state into the buffers."""
        sources = (rows.slots_t, rows.roots, rows.lengths, rows.draft_hidden, rows.draft_logits)
        for buf, src in zip(self._state(len(rows.slots)), sources):
            buf.copy_(src)

    def _store(self, rows: _Rows) -> None:
        """Hand the buffers' state back to `rows` (copies: the buffers belong to the next decode)."""
        _, roots, lengths, hidden, logits = (t.clone() for t in self._state(len(rows.slots)))
        rows.roots, rows.lengths, rows.draft_hidden, rows.draft_logits = roots, lengths, hidden, logits

    # ------------------------------------------------------------------ device side
    def _body(self, b: int, ctx: int, span: slice | None) -> None:
        """One greedy chain round for rows 0..b-1 on the buffers alone: static shapes, no host sync, every
        update in place. `span`: the rows' slots as a slice when consecutive (cache rows read as views)."""
        gen, s = self.gen, self.size
        slots, roots, lengths, draft_hidden, draft_logits = self._state(b)
        bound = ctx - s  # >= every committed length: stands for the eager round's `max_length`
        tokens = gen._draft_chain(roots, draft_hidden, draft_logits, slots, lengths, bound, s - 1, span)
        logits, aux = gen._verify_static(tokens, lengths[:, None] + self.cols, lengths,
                                         gen._chain_ancestors.expand(b, s, s), ctx, slots, span)
        accepted, bonus = chain_accept(tokens, logits)
        # emitted token j: draft j+1 while j < accepted, then the bonus token (repeated as padding)
        ids = torch.cat([tokens[:, 1:], bonus[:, None]], dim=1).where(self.cols < accepted[:, None], bonus[:, None])
        # node j's hidden state goes with emitted token j; past the accepted path both are ignored (causal)
        h, lg = gen.draft.extend(slots, lengths, bound, ids, gen._draft_hidden(aux), span)
        last = accepted[:, None, None]
        draft_hidden.copy_(h.gather(1, last.expand(-1, 1, h.shape[-1]))[:, 0])
        draft_logits.copy_(lg.gather(1, last.expand(-1, 1, lg.shape[-1]))[:, 0])
        roots.copy_(bonus)
        lengths.add_(accepted + 1)
        self.emitted[:b, :s].copy_(ids)
        self.emitted[:b, s].copy_(accepted + 1)

    def _graph(self, b: int, ctx: int, span: slice | None) -> torch.cuda.CUDAGraph:
        """The captured round for this shape and slot layout (captured on first use)."""
        key = (b, ctx, None if span is None else span.start)
        if key not in self.graphs:
            self.graphs[key] = self._capture(b, ctx, span)
        return self.graphs[key]

    def _capture(self, b: int, ctx: int, span: slice | None) -> torch.cuda.CUDAGraph:
        """Warm the body up twice on a side stream (restoring the round's inputs after each run; the K/V it
        writes lie past the committed lengths), then capture it into the shared pool (capture runs nothing)."""
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        inputs = [t.clone() for t in self._state(b)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._body(b, ctx, span)
                for buf, saved in zip(self._state(b), inputs):
                    buf.copy_(saved)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._body(b, ctx, span)
        return graph
