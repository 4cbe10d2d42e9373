"""The drafter's own KV cache across rounds: committed entries per slot, plus a scratch region for the nodes of
the current draft tree.

Slot t of a sequence holds token x_{t+1} with the target's hidden state h_t at RoPE position t, so the drafter's
committed length always equals the target's. Tree nodes are appended after the committed entries and are
forgotten at the next `extend`, which overwrites them with the accepted tokens.

With `fast=True` (a drafter whose family's step has the Triton form, EAGLE-3/3.1 and EAGLE-1/2, on the
engine's token path) `extend` and `chain_step` run through the token path's Triton kernels (`fast_drafter.py`):
K/V are written straight into this cache and each row attends to its committed prefix plus a list of visible
scratch/new positions, computed directly by each method. A tree's steps then come as flat token rows from the
draft-tree kernels (`tree_step_rows`); `tree_step` is the PyTorch path.
"""
from __future__ import annotations

import torch

from ..engine.token_path import flat_rows
from ..models.build import Drafter


class DraftRunner:
    """Runs `drafter.step` over a preallocated per-slot KV cache [slots, kv_heads, capacity, head_dim]."""

    def __init__(self, drafter: Drafter, max_slots: int, capacity: int, device: torch.device, dtype: torch.dtype,
                 fast: bool = False):
        cfg = drafter.config
        device = torch.device(device)
        self.drafter = drafter
        shape = (max_slots, cfg.num_key_value_heads, capacity, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.device = device
        self._cols = torch.arange(capacity + 1, device=device)  # sliced, never rebuilt per step
        self.fast = None
        if fast:
            from .fast_drafter import fast_drafter_for

            self.fast = fast_drafter_for(drafter, capacity, device, dtype)

    def _run_fast(self, slots: torch.Tensor, ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                  write_pos: torch.Tensor, prefix_lens: torch.Tensor, pending: torch.Tensor,
                  pending_count: torch.Tensor, max_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`_run` through the Triton kernels. ids/positions/write_pos/prefix_lens/pending_count [B, S] (any
        strides), pending [B * S, P] with a unit last stride. Returns (hidden_out, fp32 logits) [B, S, ...]."""
        b, s = ids.shape

        def flat(t: torch.Tensor) -> torch.Tensor:
            return flat_rows(t, b, s)

        rows = flat(slots[:, None])
        out, logits = self.fast.step(self.k, self.v, rows, flat(ids), hidden.reshape(b * s, -1).to(self.k.dtype)
                                     .contiguous(), flat(positions), flat(write_pos), flat(prefix_lens), pending,
                                     flat(pending_count), max_keys)
        return out.view(b, s, -1), logits.view(b, s, -1)

    def _run(self, slots: torch.Tensor, ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
             past_len: int, allowed: torch.Tensor, write_pos: torch.Tensor,
             span: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One drafter step of S tokens per row over cache columns [0, past_len); stores the new K/V at
        `write_pos` [B, S]. allowed bool [B, S, past_len + S]. `span`: the same slots as a slice when they are
        consecutive (the past is then read as a view, not gathered). Returns (hidden_out, logits)."""
        if not past_len:
            past = None
        elif span is not None:
            past = (self.k[span, :, :past_len], self.v[span, :, :past_len])
        else:
            past = (self.k[slots, :, :past_len], self.v[slots, :, :past_len])
        out, logits, (k, v) = self.drafter.step(ids, hidden, positions, past, allowed[:, None])
        b, s = ids.shape
        rows = slots[:, None].expand(b, s)
        self.k[rows, :, write_pos] = k[:, :, past_len:].transpose(1, 2)
        self.v[rows, :, write_pos] = v[:, :, past_len:].transpose(1, 2)
        return out, logits

    @torch.inference_mode()
    def extend(self, slots: torch.Tensor, lengths: torch.Tensor, max_length: int, ids: torch.Tensor,
               hidden: torch.Tensor, span: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Commit new tokens after each row's `lengths` (causal; `max_length` = lengths.max() known on the host).
        Rows may be right-padded: padded queries are ignored by the caller and padded keys lie beyond the
        committed length, so no real query ever sees them. Returns (hidden_out, logits) [B, S, ...]."""
        b, s = ids.shape
        cols = self._cols[:s]
        if self.fast is not None:  # row (b, j) sees its committed prefix, then new tokens 0..j
            positions = lengths[:, None] + cols[None, :]
            return self._run_fast(slots, ids, hidden, positions, positions, lengths[:, None],
                                  cols.expand(b * s, s), (cols + 1)[None, :], max_length + s)
        key = self._cols[:max_length + s]
        new = key - max_length
        allowed = (key[None, None, :] < lengths[:, None, None]) | (
            (new[None, None, :] >= 0) & (new[None, None, :] <= cols[None, :, None]))
        positions = lengths[:, None] + cols[None, :]
        return self._run(slots, ids, hidden, positions, max_length, allowed, positions, span)

    @torch.inference_mode()
    def chain_step(self, slots: torch.Tensor, lengths: torch.Tensor, max_length: int, ids: torch.Tensor,
                   hidden: torch.Tensor, depth: int, span: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`tree_step` for a chain (topk = 1): the one frontier node at `depth` (>= 1) sees every committed entry
        and all depth-1 scratch nodes before it, and is stored as scratch node depth-1. ids [B, 1],
        hidden [B, 1, H]. Returns (hidden_out, logits) [B, 1, ...]."""
        node = depth - 1
        past_len = max_length + node
        if self.fast is not None:  # committed entries and earlier chain nodes are contiguous: one prefix, then self
            b = ids.shape[0]
            end = (lengths + node)[:, None]
            one = self._cols[1:2]
            return self._run_fast(slots, ids, hidden, end, end, end, self._cols[:1].expand(b, 1), one[None, :],
                                  past_len + 1)
        key = self._cols[:past_len + 1]
        end = lengths + node  # [B]: committed entries + the chain's scratch nodes so far
        allowed = (key[None, :] < end[:, None]) | (key[None, :] == past_len)
        positions = end[:, None]
        return self._run(slots, ids, hidden, positions, past_len, allowed[:, None], positions, span)

    @torch.inference_mode()
    def tree_step(self, slots: torch.Tensor, lengths: torch.Tensor, max_length: int, ids: torch.Tensor,
                  hidden: torch.Tensor, depth: int, node_start: int,
                  visible: torch.Tensor, span: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draft the children of F frontier nodes at tree `depth` (>= 1), stored as scratch nodes
        node_start..node_start+F-1, on the PyTorch path. visible long [B, F, depth]: the scratch nodes each frontier
        node sees, in ascending order (its ancestors below the root, then itself). Returns (hidden_out, logits)
        [B, F, ...]."""
        b, f = ids.shape
        past_len = max_length + node_start
        ancestors = torch.zeros(b, f, node_start + f, dtype=torch.bool, device=ids.device).scatter_(2, visible, True)
        rel = self._cols[:past_len][None, :] - lengths[:, None]  # [B, past_len]
        allowed_past = (rel < 0)[:, None, :].expand(b, f, past_len)
        if node_start:
            seen = ancestors[:, :, :node_start].gather(2, rel.clamp(0, node_start - 1)[:, None, :].expand(b, f, -1))
            allowed_past = allowed_past | (seen & ((rel >= 0) & (rel < node_start))[:, None, :])
        allowed = torch.cat([allowed_past, ancestors[:, :, node_start:]], dim=2)
        positions = (lengths + depth - 1)[:, None].expand(b, f)
        write = lengths[:, None] + node_start + self._cols[:f][None, :]
        return self._run(slots, ids, hidden, positions, past_len, allowed, write, span)

    def tree_step_rows(self, rows: tuple[torch.Tensor, ...], max_length: int, node_start: int,
                       f: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`tree_step` through the fast drafter on the flat token rows the draft-tree kernels build (`Frontier.rows`:
        slots, target ids, hidden states [B*F, H], RoPE positions, write positions, prefix lengths, the visible
        scratch nodes [B*F, depth] and their count): F frontier nodes per batch row, stored as scratch nodes
        node_start.. after committed lengths <= max_length. Returns (hidden_out [B*F, H], fp32 logits
        [B*F, V_d])."""
        return self.fast.step(self.k, self.v, *rows, max_length + node_start + f)
