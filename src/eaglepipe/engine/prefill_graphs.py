"""`PrefillGraphs`: a single prompt's prefill replayed from a CUDA graph per padded length.

An eager prefill of a small target is bound by the host: SmolLM2-135M's 30 layers launch about 900 kernels, several
times the GPU's work (benchmarks/RESULTS.md, eighth H200 lease: a lone prompt of 20-500 tokens took a median
2.48 ms from its graph against 18.24 ms eager). Here the prompt is padded to the next bucket (32, 64, ... up to
1,024 tokens or the runner's max_len) and the forward is captured once per (bucket, captured layers). Longer
prompts stay eager: there the GPU's work dominates, and padding could nearly double it. Pad tokens sit after the
prompt, so causal attention keeps them out of every real token's result; they write K/V past the prompt's end,
where nothing reads before a later write. Outputs are those of the eager prefill up to GEMM rounding (the padded
shapes may pick other kernels); every request of a runner goes through the same path, so speculative and plain
decoding still start from the same state. Off CUDA, or with `use_cuda_graph=False`, the same padded body runs
eagerly (the tests run it so).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

# The runner's padded forward on the static buffers: (ids, positions, slots [1, bucket], the prompt's last index
# [1], captured layers) -> (the last token's logits [1, V], the captured hidden states [bucket, n * H] or None).
PrefillBody = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[int]],
                       tuple[torch.Tensor, torch.Tensor | None]]


def prefill_buckets(max_len: int, smallest: int = 32, largest: int = 1024) -> list[int]:
    """Padded prompt lengths: smallest, 2*smallest, ... up to `largest`, none past max_len (max_len itself when
    it falls below `largest`)."""
    top = min(largest, max_len)
    size, sizes = min(smallest, top), []
    while size < top:
        sizes.append(size)
        size *= 2
    return sizes + [top]


class PrefillGraphs:
    """Captured single-prompt prefills of `body` (`LlamaRunner.padded_prefill`), one per (bucket, capture
    layers), sharing one memory pool."""

    def __init__(self, body: PrefillBody, max_len: int, device: torch.device, smallest: int = 32,
                 largest: int = 1024, use_cuda_graph: bool | None = None):
        self.use_cuda_graph = device.type == "cuda" if use_cuda_graph is None else use_cuda_graph
        if self.use_cuda_graph and device.type != "cuda":
            raise ValueError("CUDA graphs need a runner on a CUDA device")
        self.body = body
        self.buckets = prefill_buckets(max_len, smallest, largest)
        n = self.buckets[-1]
        self.ids = torch.zeros(1, n, dtype=torch.long, device=device)
        self.positions = torch.arange(n, device=device)[None]
        self.slots = torch.zeros(1, n, dtype=torch.long, device=device)
        self.last = torch.zeros(1, dtype=torch.long, device=device)  # the prompt's last index
        self.graphs: dict[tuple[int, tuple[int, ...]], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, tuple[int, ...]], tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.pool = None

    def fits(self, size: int) -> bool:
        """Whether a prompt of `size` tokens goes through a bucket (else the eager prefill takes it)."""
        return 1 <= size <= self.buckets[-1]

    def bucket(self, size: int) -> int:
        """The padded length for a prompt of `size` tokens."""
        for b in self.buckets:
            if b >= size:
                return b
        raise ValueError(f"a {size}-token prompt is longer than the largest bucket ({self.buckets[-1]})")

    def prefill(self, prompt: Sequence[int], slot: int,
                layers: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prefill `prompt` (it `fits`) into `slot`; the caller commits its length. Returns copies of the last
        token's logits [1, V] and of the captured layers' hidden states [len(prompt), n * H] (None without)."""
        size = len(prompt)
        bucket = self.bucket(size)
        host = torch.zeros(1, bucket, dtype=torch.long)
        host[0, :size] = torch.as_tensor(list(prompt), dtype=torch.long)
        self.ids[:, :bucket].copy_(host)
        self.slots.fill_(slot)
        self.last.fill_(size - 1)
        key = (bucket, tuple(layers))
        if not self.use_cuda_graph:
            logits, aux = self._run(bucket, layers)
        else:
            if key not in self.graphs:
                self.graphs[key] = self._capture(bucket, layers)
            self.graphs[key].replay()
            logits, aux = self.outputs[key]
        return logits.clone(), aux[:size].clone() if aux is not None else None

    def _run(self, bucket: int, layers: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The padded forward on the static buffers, as captured."""
        return self.body(self.ids[:, :bucket], self.positions[:, :bucket], self.slots[:, :bucket], self.last, layers)

    def _capture(self, bucket: int, layers: list[int]) -> torch.cuda.CUDAGraph:
        """Warm the body up on a side stream (it writes only the current slot, which this prefill replaces), then
        capture it into the shared pool; the outputs stay in `self.outputs`."""
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._run(bucket, layers)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.outputs[(bucket, tuple(layers))] = self._run(bucket, layers)
        return graph
