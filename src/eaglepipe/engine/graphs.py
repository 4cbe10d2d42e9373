"""CUDA graphs of the decode step: one replay per token, greedy argmax and bookkeeping inside the graph."""
from __future__ import annotations

from typing import Callable

import torch
from tqdm import tqdm

from .model import LlamaRunner

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# Called after each replay with (logits [rows, V], rows); returns tokens [rows] to use instead of the argmax.
SampleHook = Callable[[torch.Tensor, int], torch.Tensor]


class DecodeGraphs:
    """Captured decode steps for a few batch sizes x context lengths over the runner's static KV cache.

    Row r of a graph is cache slot r. Each replay reads `tokens`/`lens`, writes K/V at position lens[r],
    puts the argmax into `tokens` and into `ring[step]`, and increments `lens` and `step`, so consecutive
    replays decode consecutive tokens with no host work in between.
    """

    def __init__(self, runner: LlamaRunner, max_batch: int, ring_size: int = 16, min_ctx: int = 256):
        if runner.device.type != "cuda":
            raise ValueError("CUDA graphs need a runner on a CUDA device")
        self.runner = runner
        self.ring_size = ring_size
        self.batch_sizes = sorted({b for b in BATCH_SIZES if b < max_batch} | {max_batch})
        ctx, self.ctx_sizes = min(min_ctx, runner.max_len), []
        while ctx < runner.max_len:
            self.ctx_sizes.append(ctx)
            ctx *= 2
        self.ctx_sizes.append(runner.max_len)
        dev = runner.device
        self.tokens = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.lens = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.step = torch.zeros(1, dtype=torch.long, device=dev)
        self.ring = torch.zeros(ring_size, max_batch, dtype=torch.long, device=dev)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.logits: dict[tuple[int, int], torch.Tensor] = {}
        self._capture_all()
        runner.lengths = [0] * runner.max_slots  # capture wrote garbage K/V only; no sequence is live yet

    def _capture_all(self) -> None:
        self.graphs.clear()
        self.logits.clear()
        pool = torch.cuda.graph_pool_handle()
        shapes = [(b, c) for b in reversed(self.batch_sizes) for c in reversed(self.ctx_sizes)]
        with torch.no_grad():
            for b, c in tqdm(shapes, desc="capturing CUDA graphs", disable=None):
                self._capture(b, c, pool)

    def _body(self, b: int, ctx: int) -> torch.Tensor:
        logits = self.runner.decode_logits(self.tokens[:b], self.lens[:b], ctx)
        nxt = logits.argmax(dim=-1)
        self.tokens[:b].copy_(nxt)
        self.ring[:, :b].index_copy_(0, self.step, nxt[None])
        self.lens[:b].add_(1)
        self.step.add_(1)
        return logits

    def _reset(self) -> None:
        self.tokens.zero_()
        self.lens.zero_()
        self.step.zero_()

    def _capture(self, b: int, ctx: int, pool) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._reset()
                self._body(b, ctx)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        self._reset()
        with torch.cuda.graph(graph, pool=pool):
            self.logits[(b, ctx)] = self._body(b, ctx)
        self.graphs[(b, ctx)] = graph

    def batch_for(self, rows: int) -> int:
        """Rows the graph that decodes `rows` rows computes (the smallest captured batch size that holds them):
        rows past `rows` run too, from position 0 of their slots."""
        return next(x for x in self.batch_sizes if x >= rows)

    def fits(self, rows: int, max_len_after: int) -> bool:
        """Whether some captured graph covers `rows` rows and a context of `max_len_after` positions."""
        return rows <= self.batch_sizes[-1] and max_len_after <= self.ctx_sizes[-1]

    @torch.no_grad()
    def run(self, tokens: list[int], lens: list[int], steps: int, sample: SampleHook | None = None) -> list[list[int]]:
        """Decode `steps` tokens for rows 0..len(tokens)-1 (inactive rows: token 0, len 0).

        tokens[r] is row r's last token (not yet in the cache), lens[r] its committed length. Returns the new
        tokens per step [steps][rows]. The caller updates the runner's lengths (each row advances by `steps`).
        """
        rows = len(tokens)
        if not 1 <= steps <= self.ring_size:
            raise ValueError(f"steps must be in [1, {self.ring_size}]")
        b = self.batch_for(rows)
        ctx = next(c for c in self.ctx_sizes if c >= max(lens) + steps)
        self._reset()
        self.tokens[:rows].copy_(torch.tensor(tokens, dtype=torch.long), non_blocking=True)
        self.lens[:rows].copy_(torch.tensor(lens, dtype=torch.long), non_blocking=True)
        graph, logits = self.graphs[(b, ctx)], self.logits[(b, ctx)]
        for j in range(steps):
            graph.replay()
            if sample is not None:
                chosen = sample(logits[:rows], rows)
                self.tokens[:rows].copy_(chosen)
                self.ring[j, :rows].copy_(chosen)
        return self.ring[:steps, :rows].cpu().tolist()
