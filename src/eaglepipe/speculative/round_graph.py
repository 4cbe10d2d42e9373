"""`RoundGraph`: the greedy round of `SpeculativeGenerator` (chains and EAGLE-2 trees) as one static-shape,
host-sync-free body over preallocated device buffers, captured as one CUDA graph per (rows, context bucket, slots).

The body drafts (a chain with the drafter's argmax, or an EAGLE-2 tree of num_draft_tokens - 1 nodes), verifies
root + drafts in one target forward, picks the longest accepted path on the device, moves the path's K/V to
consecutive cache positions (a tree's path may skip nodes; a chain's is already in place) and advances the
device lengths, extends the drafter with the path's tokens fed the verify forward's hidden states, and leaves the
emitted tokens and their count in one buffer that the host reads with a single copy. Shapes depend only on the
number of rows B and the context bucket `ctx` (a power of two >= the longest committed length +
num_draft_tokens): attention spans `ctx` cache positions and masks everything past each row's own tokens, which
gives what the eager round computes over its tighter span (up to float summation order). Every per-path tensor
is num_steps + 1 wide (the longest path, root included), padded past each row's path.

Row r of the buffers is the r-th row of the batch (its cache slot is `slots[r]`). On CPU, or with
`use_cuda_graph=False`, the body simply runs eagerly: the tests exercise the same code that is captured on CUDA.
"""
from __future__ import annotations

from typing import Callable

import torch

from .generator import Rows, SpeculativeGenerator
from .steps import emitted_tokens


def context_buckets(max_len: int, min_ctx: int) -> list[int]:
    """Attention spans a round may use: min_ctx, 2*min_ctx, ... below max_len, then max_len."""
    ctx, sizes = min(min_ctx, max_len), []
    while ctx < max_len:
        sizes.append(ctx)
        ctx *= 2
    return sizes + [max_len]


class RoundGraph:
    """Greedy rounds of `gen` (chain or tree) on static device buffers, replayed from CUDA graphs captured lazily
    per (B, ctx bucket, slot layout), or run eagerly off CUDA.

    `decode(rows)` runs rounds until every row stops, or hands the rows back (their device state written back)
    once a row nears the cache's end, for the eager `SpeculativeGenerator.round` to finish with smaller trees.
    """

    def __init__(self, gen: SpeculativeGenerator, min_ctx: int = 256, use_cuda_graph: bool | None = None):
        runner = gen.runner
        dev = runner.device
        self.use_cuda_graph = dev.type == "cuda" if use_cuda_graph is None else use_cuda_graph
        if self.use_cuda_graph and dev.type != "cuda":
            raise ValueError("CUDA graphs need a runner on a CUDA device")
        self.gen = gen
        self.size = gen.spec.num_draft_tokens  # S: tokens verified per round, the root included
        self.width = min(self.size, gen.spec.num_steps + 1)  # P: the longest accepted path, the root included
        self.ctx_sizes = context_buckets(runner.max_len, min_ctx)
        rows = runner.max_slots
        self.slots = torch.zeros(rows, dtype=torch.long, device=dev)
        self.roots = torch.zeros(rows, dtype=torch.long, device=dev)  # the last committed token per row
        self.lengths = torch.zeros(rows, dtype=torch.long, device=dev)  # the target's committed lengths
        # the drafter's state after each row's root, as the round's steps keep it
        self.draft_hidden, self.draft_logits = gen.steps.state_buffers(rows)
        # per row: the round's emitted tokens (accepted drafts, the bonus token, padding), then their count
        self.emitted = torch.zeros(rows, self.width + 1, dtype=torch.long, device=dev)
        # two pinned host copies of `emitted` and their copy-done events: the round in flight writes one while the
        # host reads the other
        self.host = [torch.zeros(rows, self.width + 1, dtype=torch.long, pin_memory=self.use_cuda_graph)
                     for _ in range(2)]
        self.copied = [torch.cuda.Event() for _ in range(2)] if self.use_cuda_graph else []
        self.flip = 0
        self.graphs: dict[tuple[int, int, int | None], torch.cuda.CUDAGraph] = {}
        self.pool = None  # one memory pool shared by every graph, made at the first capture

    def prepare(self, rows: int = 1) -> None:
        """Capture the rounds of `rows` rows in slots 0..rows-1 for every context bucket now, so that no capture
        lands inside a timed decode. Only while those slots hold no sequence: the warm-up runs write K/V there."""
        if any(self.gen.runner.lengths[:rows]):
            raise RuntimeError(f"slots 0..{rows - 1} hold live sequences; prepare() would overwrite their K/V")
        if not self.use_cuda_graph:
            return
        for buf in self._state(rows):
            buf.zero_()
        self.slots[:rows].copy_(torch.arange(rows, device=self.slots.device))
        for ctx in self.ctx_sizes:
            self.graph(rows, ctx, slice(0, rows))

    # ------------------------------------------------------------------ host side
    def decode(self, rows: Rows) -> Rows | None:
        """Run greedy rounds for `rows` (every row greedy). Returns None once every row has stopped, or the rows
        still decoding when one of them has no room left for a whole tree.

        Rounds are pipelined: round k+1 is launched before round k's tokens reach the host, so the host's work
        (the graph launch, the copy, committing and streaming) overlaps the device's. When a row stops, the
        round already in flight is drained: its tokens go to the rows that go on and are dropped for the rows
        that stopped (never counted as their verification). Only the round after the last stop is wasted whole,
        and not when a row's max_new_tokens could end with the round in flight: then that round is waited for
        before the next one is launched."""
        self.load(rows)
        inflight: Callable[[], list[list[int]]] | None = None
        while True:
            # with a round in flight that could end a row on max_new_tokens, launch nothing until it is read
            last = inflight is not None and any(left <= self.width for left in rows.left)
            ctx = None if last else self._bucket(rows.slots, ahead=inflight is not None)
            launched = self._launch(len(rows.slots), ctx, rows.span) if ctx is not None else None
            if inflight is not None:
                alive = self.emit(rows, inflight())
                if len(alive) < len(rows.slots):
                    if not alive:
                        if launched is not None:
                            launched()  # nothing may still write the slots once decode returns
                        return None
                    rows = self._drain(rows, alive, launched)
                    if rows is None:
                        return None
                    inflight = None
                    continue
            if launched is None:
                if inflight is not None:  # the round in flight said no: try again once the host has read it
                    inflight = None
                    continue
                self.store(rows)
                return rows
            inflight = launched

    def _drain(self, rows: Rows, alive: list[int], launched: Callable[[], list[list[int]]] | None) -> Rows | None:
        """After rows stopped with a round in flight: finish that round, keep the rows in `alive`, emit the
        round's tokens for them alone, and reload the buffers. Returns the rows still decoding (None if none)."""
        emitted = launched() if launched is not None else None  # waits, so the buffers hold its state
        self.store(rows)
        rows = rows.select(alive)
        if emitted is not None:
            more = self.emit(rows, [emitted[r] for r in alive])
            if not more:
                return None
            rows = rows.select(more) if len(more) < len(rows.slots) else rows
        self.load(rows)
        return rows

    def _bucket(self, slots: list[int], ahead: bool = False) -> int | None:
        """The smallest context bucket that holds every row's next tree; None when a row would pass max_len.
        `ahead`: a round is in flight, so the device lengths may be up to one path (`width` tokens) past the
        host's."""
        needed = max(self.gen.runner.lengths[s] for s in slots) + self.size + (self.width if ahead else 0)
        return next((c for c in self.ctx_sizes if c >= needed), None)

    def _launch(self, b: int, ctx: int, span: slice | None) -> Callable[[], list[list[int]]]:
        """Start one round for rows 0..b-1; returns a function that waits for it and gives the `emitted` rows.
        On CUDA the rows come back through one of two pinned host buffers, so a round's copy can be in flight
        while the host reads the round before it."""
        if not self.use_cuda_graph:
            self.body(b, ctx, span)
            emitted = self.emitted[:b].tolist()
            return lambda: emitted
        self.graph(b, ctx, span).replay()
        host, done = self.host[self.flip][:b], self.copied[self.flip]
        self.flip ^= 1
        host.copy_(self.emitted[:b], non_blocking=True)
        done.record()

        def result() -> list[list[int]]:
            done.synchronize()
            return host.tolist()
        return result

    def emit(self, rows: Rows, emitted: list[list[int]]) -> list[int]:
        """Commit a round's tokens (`emitted`: the host copy of the round's `emitted` rows) on the host, count and
        stream them as the eager round does; returns the indices of the rows that go on."""
        gen, p = self.gen, self.width
        counts = [row[p] for row in emitted]
        for slot, n in zip(rows.slots, counts):
            gen.runner.commit(slot, n)  # the K/V are in place: only the host length moves
            rows.verify_ct[slot] += 1
        gen.record_round(rows, counts)
        return [r for r, (row, n) in enumerate(zip(emitted, counts)) if not rows.on_tokens[r](row[:n])]

    def _state(self, b: int) -> tuple[torch.Tensor, ...]:
        """The round's inputs for rows 0..b-1: slots, roots, lengths, draft_hidden, draft_logits."""
        return self.slots[:b], self.roots[:b], self.lengths[:b], self.draft_hidden[:b], self.draft_logits[:b]

    def load(self, rows: Rows) -> None:
        """Copy the rows' device state into the buffers (rows 0..len(rows.slots)-1)."""
        sources = (rows.slots_t, rows.roots, rows.lengths, rows.draft_hidden, rows.draft_logits)
        for buf, src in zip(self._state(len(rows.slots)), sources):
            buf.copy_(src)

    def store(self, rows: Rows) -> None:
        """Hand the buffers' state back to `rows` (copies: the buffers belong to the next decode)."""
        _, roots, lengths, hidden, logits = (t.clone() for t in self._state(len(rows.slots)))
        rows.roots, rows.lengths, rows.draft_hidden, rows.draft_logits = roots, lengths, hidden, logits

    # ------------------------------------------------------------------ device side
    def body(self, b: int, ctx: int, span: slice | None) -> None:
        """One greedy round for rows 0..b-1 on the buffers alone: static shapes, no host sync, every update in
        place (what a graph captures). `span`: the rows' slots as a slice when consecutive (cache rows read as
        views)."""
        for _, run in self.phases(b, ctx, span):
            run()

    def phases(self, b: int, ctx: int, span: slice | None) -> list[tuple[str, Callable[[], None]]]:
        """The round body as named steps run in order (draft, verify, accept, extend), passing tensors on
        through a shared dict: `body` runs them back to back; a profiler can capture and time each alone."""
        steps, st = self.gen.steps, {}
        slots, roots, lengths, draft_hidden, draft_logits = self._state(b)
        bound = ctx - self.size  # >= every committed length: stands for the eager round's `max_length`

        def draft() -> None:
            st["tree"] = steps.draft_tree(roots, draft_hidden, draft_logits, slots, lengths, bound, self.size - 1,
                                          span)

        def verify() -> None:
            st["logits"], st["aux"] = steps.verify(st["tree"], lengths, ctx, slots, span)

        def accept() -> None:
            path, n, bonus = steps.accept(st["tree"], st["logits"], self.width)
            steps.compact(slots, lengths, path)
            st["path"], st["n"], st["bonus"] = path, n, bonus

        def extend() -> None:
            path, n, bonus = st["path"], st["n"], st["bonus"]
            ids = emitted_tokens(st["tree"].tokens, path, n, bonus)
            hidden, lg = steps.extend(slots, lengths, bound, ids, st["aux"], path, n, span)
            draft_hidden.copy_(hidden)
            draft_logits.copy_(lg)
            roots.copy_(bonus)
            lengths.add_(n)
            self.emitted[:b, :self.width].copy_(ids)
            self.emitted[:b, self.width].copy_(n)

        return [("draft", draft), ("verify", verify), ("accept", accept), ("extend", extend)]

    def graph(self, b: int, ctx: int, span: slice | None) -> torch.cuda.CUDAGraph:
        """The captured round for this shape and slot layout (captured on first use)."""
        key = (b, ctx, None if span is None else span.start)
        if key not in self.graphs:
            self.graphs[key] = self._capture(b, ctx, span)
        return self.graphs[key]

    def _capture(self, b: int, ctx: int, span: slice | None) -> torch.cuda.CUDAGraph:
        """The round, warmed up and captured into the shared pool (capture runs nothing)."""
        self._warm_up(b, ctx, span)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.body(b, ctx, span)
        return graph

    def capture_phases(self, b: int, ctx: int, span: slice | None) -> list[tuple[str, torch.cuda.CUDAGraph]]:
        """The round as one graph per phase (`phases`), in a private pool: replayed in order, they make one
        round. For profiling only: every launch between phases costs what the single graph saves."""
        self._warm_up(b, ctx, span)
        pool, graphs = torch.cuda.graph_pool_handle(), []
        for name, run in self.phases(b, ctx, span):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                run()
            graphs.append((name, graph))
        return graphs

    def _warm_up(self, b: int, ctx: int, span: slice | None) -> None:
        """Run the body twice on a side stream (restoring the round's inputs after each run; the K/V it writes
        lie past the committed lengths), so that capture finds every kernel compiled and the pool made."""
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        inputs = [t.clone() for t in self._state(b)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.body(b, ctx, span)
                for buf, saved in zip(self._state(b), inputs):
                    buf.copy_(saved)
        torch.cuda.current_stream().wait_stream(side)
