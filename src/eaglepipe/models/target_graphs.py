"""The frozen target's forward replayed from CUDA graphs during training.

At a few packed rows a step the training loop is bound by the host: the target's forward alone issues over a
thousand launches (a dozen per decoder layer). Captured once per micro-batch shape, it costs one graph launch and
two input copies a step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

TargetForward = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class CapturedForward:
    """One capture: its graph, the static inputs it reads and the static outputs it writes."""

    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    aux: torch.Tensor
    final: torch.Tensor


class TargetGraphs:
    """`forward(input_ids, position_ids) -> (aux, final)` replayed from a CUDA graph per input shape.

    Up to `max_shapes` shapes are captured (a packed run sees two: full micro-batches and the epoch's last one);
    further shapes run `forward` eagerly. The returned tensors are the graph's own output buffers, which the next
    replay of that shape overwrites: the caller uses them before its next call, as the training step does (the
    drafter's forward and backward are queued on the same stream before the next micro-batch's target forward).
    `forward` must not synchronise with the host, and runs twice eagerly before each capture so that lazy
    initialisation (cuBLAS workspaces, compiled kernels) happens outside it.
    """

    def __init__(self, forward: TargetForward, max_shapes: int = 4) -> None:
        self.forward = forward
        self.max_shapes = max_shapes
        self.captured: dict[tuple[int, ...], CapturedForward] = {}

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if input_ids.device.type != "cuda":
            raise ValueError(f"CUDA graphs replay on a GPU; the inputs are on {input_ids.device}")
        key = tuple(input_ids.shape)
        captured = self.captured.get(key)
        if captured is None:
            if len(self.captured) >= self.max_shapes:
                return self.forward(input_ids, position_ids)
            captured = self.captured[key] = self.capture(input_ids, position_ids)
        captured.input_ids.copy_(input_ids)
        captured.position_ids.copy_(position_ids)
        captured.graph.replay()
        return captured.aux, captured.final

    def capture(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> CapturedForward:
        """Capture `forward` on static copies of the inputs (warmed up twice on a side stream first)."""
        ids, positions = input_ids.clone(), position_ids.clone()
        main = torch.cuda.current_stream(ids.device)
        side = torch.cuda.Stream(ids.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            for _ in range(2):
                self.forward(ids, positions)
        main.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            aux, final = self.forward(ids, positions)
        return CapturedForward(graph, ids, positions, aux, final)
