"""`ContextCacheDrafter`: the `parallel` round's block drafter (speculative/parallel_round.py) for a drafter whose
layers attend to the target's context features as extra K/V (DFlash: models/dflash.py `context_kv`,
`forward_block`).

Its cache holds, per layer and slot, the K/V of the context features of every committed position: position p
holds the target's features after token p, so a row's cache is as long as the target's. `commit` writes the K/V
of new positions (no query runs over them: DFlash's context is keys only); `propose` runs the block [root, MASK x
K] at positions L..L+K of a row of committed length L, over the cached keys < L and the block itself
(bidirectional), and keeps none of the block's K/V. The rows carry no state between rounds (zero-width tensors).
"""
from __future__ import annotations

import torch

from ..engine.model import LlamaRunner
from ..models.layers import cached_attention
from .config import SpecConfig


class ContextCacheDrafter:
    """The block drafter over a per-layer context K/V cache [layers, slots, kv_heads, capacity, head_dim]."""

    fast = False

    def __init__(self, drafter: torch.nn.Module, runner: LlamaRunner, spec: SpecConfig):
        cfg = drafter.config
        self.drafter = drafter
        self.block = spec.num_steps + 1  # the root and its drafts
        # a round commits at most num_steps + 1 positions past a committed length < max_len
        capacity = runner.max_len + spec.num_steps + 1
        shape = (cfg.num_hidden_layers, runner.max_slots, cfg.num_key_value_heads, capacity, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=runner.dtype, device=runner.device)
        self.v = torch.zeros(shape, dtype=runner.dtype, device=runner.device)
        self._cols = torch.arange(capacity, device=runner.device)
        self._block_keys = torch.ones(1, self.block, self.block, dtype=torch.bool, device=runner.device)

    def state_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """No state between rounds: the cache is the drafter's whole memory."""
        return (0,), (0,)

    @torch.inference_mode()
    def commit(self, slots: torch.Tensor, lengths: torch.Tensor, max_length: int, ids: torch.Tensor,
               features: torch.Tensor, count: torch.Tensor, span: slice | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the K/V of the context features [B, W, H] at positions lengths .. lengths+W-1 of each row's slot (the
        columns past `count` are padding, overwritten by the next commit before any query sees them)."""
        b, w = features.shape[:2]
        positions = lengths[:, None] + self._cols[:w]
        rows = slots[:, None].expand(b, w)
        for layer, (k, v) in enumerate(self.drafter.context_kv(features, positions)):
            self.k[layer][rows, :, positions] = k.transpose(1, 2)
            self.v[layer][rows, :, positions] = v.transpose(1, 2)
        empty = features.new_zeros(b, 0)
        return empty, empty

    @torch.inference_mode()
    def propose(self, roots: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor], slots: torch.Tensor,
                lengths: torch.Tensor, max_length: int, span: slice | None) -> torch.Tensor:
        """The drafter's logits [B, K, V] at block positions 1..K after each row's root, over the cached context
        (positions < the row's length; `max_length` >= every length bounds the columns read)."""
        b = roots.shape[0]
        ids = self.drafter.block_ids(roots, self.block)
        positions = lengths[:, None] + self._cols[:self.block]
        context = self._cols[:max_length][None, None, :] < lengths[:, None, None]  # [B, 1, max_length]
        mask = torch.cat([context.expand(b, self.block, max_length), self._block_keys.expand(b, -1, -1)], dim=2)
        where = span if span is not None else slots

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            past = (self.k[layer][where, :, :max_length], self.v[layer][where, :, :max_length])
            return cached_attention(q, k, v, past, mask[:, None])[0]

        out = self.drafter.forward_block(ids, positions, attend)
        return self.drafter.logits(out[:, 1:])
