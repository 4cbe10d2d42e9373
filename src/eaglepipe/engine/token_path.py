"""The token path: the runner's decoder layers through row-invariant Triton kernels, for decode and verify.

Seven launches per layer (norm+qkv, RoPE+cache write, attention chunks, merge, o_proj+residual,
norm+gate/up+SiLU, down+residual) and an fp32 LM head with the final norm fused in. Every token row is
computed from its own inputs only, so a token gets the same logits decoded alone, batched, or as a node of a
draft tree: greedy speculative decoding then reproduces plain greedy decoding exactly, in bf16 too. It is also the
faster path: benchmarks/RESULTS.md (second H200 lease) has SmolLM2's batch-1 decode at 1,063.7 tok/s on it against
506.7 on the PyTorch path, both in CUDA graphs.
Prefill stays on the PyTorch path (its K/V are shared by both decoders, so exactness is unaffected).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .shapes import ModelShapes
from .weights import ModelWeights

MAX_ROWS = 64  # token rows per forward in the row-invariant regime; larger batches use the PyTorch path


def flat_rows(x: torch.Tensor, b: int, t: int) -> torch.Tensor:
    """`x` broadcast to [B, T] and flattened to a contiguous [B*T]: one entry per token row. (A plain reshape of
    an expanded tensor, or of any [1, T] one, can be a stride-0 view, which the kernels cannot index by row.)"""
    return x.expand(b, t).reshape(-1).contiguous()


def visible_order(mask: torch.Tensor) -> torch.Tensor:
    """bool [..., S] -> the indices of its True columns in ascending order, then S as padding [..., S]: the
    pending positions a row sees, in the order the kernels read them (count them with mask.sum(-1))."""
    s = mask.shape[-1]
    cols = torch.arange(s, device=mask.device)
    return torch.where(mask, cols, s).sort(dim=-1).values


def verify_rows(ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, write_pos: torch.Tensor,
                lengths: torch.Tensor, pending_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`TokenPath.run`'s flat rows for S pending tokens on each of B sequences: (ids, positions, slots, write
    positions, prefix lengths, visible pending tokens [B*S, S], their count). ids/positions/write_pos [B, S],
    slots/lengths [B], pending_mask bool [B, S, S]."""
    b, t = ids.shape
    return (flat_rows(ids, b, t), flat_rows(positions, b, t), flat_rows(slots[:, None], b, t),
            flat_rows(write_pos, b, t), flat_rows(lengths[:, None], b, t),
            visible_order(pending_mask).reshape(b * t, t), flat_rows(pending_mask.sum(-1), b, t))


class TokenPath:
    """Forward of up to MAX_ROWS pending tokens over a decoder's weights and KV caches
    [layers, slots, kv_heads, positions, head_dim], with the RoPE tables `cos`/`sin` [positions, head_dim]."""

    def __init__(self, shapes: ModelShapes, weights: ModelWeights, cos: torch.Tensor, sin: torch.Tensor,
                 k_cache: torch.Tensor, v_cache: torch.Tensor):
        from . import kernels

        self.k = kernels
        self.shapes, self.weights = shapes, weights
        self.cos, self.sin, self.k_cache, self.v_cache = cos, sin, k_cache, v_cache
        self.scale = shapes.head_dim ** -0.5
        self.qk_gain = [torch.cat([w.q_norm, w.k_norm]) if shapes.qk_norm else None for w in weights.layers]

    def run(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, write_pos: torch.Tensor,
            prefix_lens: torch.Tensor, pending: torch.Tensor, pending_count: torch.Tensor, max_keys: int,
            capture: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Flat token rows [M]: token ids, RoPE positions, cache slot and write position of each; each row
        attends to its slot's first prefix_lens[m] positions, then to prefix_lens[m] + pending[m, :count[m]].
        `max_keys` bounds prefix + count (a static launch bound). Returns (fp32 logits [M, V], the captured
        hidden states h[i] for i in `capture`, concatenated [M, len(capture) * H], or None)."""
        per_row = (ids, positions, slots, write_pos, prefix_lens, pending_count)
        if any(x.dim() != 1 or x.stride(0) != 1 for x in per_row) or pending.stride(-1) != 1:
            raise ValueError("token rows must be contiguous 1-D tensors (the kernels index them by row)")
        s, w, k = self.shapes, self.weights, self.k
        eps = s.rms_norm_eps
        x = F.embedding(ids, w.embed)
        captured = {0: x} if 0 in capture else {}
        for i, layer in enumerate(w.layers):
            qkv = k.norm_linear(x, layer.qkv, norm_weight=layer.input_norm, eps=eps, bias=layer.qkv_bias)
            q = k.rope_write_kv(qkv, self.cos, self.sin, positions, slots, write_pos, self.k_cache[i],
                                self.v_cache[i], s.num_heads, s.num_kv_heads, s.head_dim, self.qk_gain[i], eps)
            attn = k.virtual_attention(q, self.k_cache[i], self.v_cache[i], slots, prefix_lens, pending,
                                       pending_count, max_keys, self.scale)
            x = k.norm_linear(attn, layer.o, bias=layer.o_bias, residual=x)
            act = k.norm_gate_up(x, layer.gate_up, norm_weight=layer.post_norm, eps=eps, bias=layer.gate_up_bias)
            x = k.norm_linear(act, layer.down, bias=layer.down_bias, residual=x)
            if i + 1 in capture:
                captured[i + 1] = x
        logits = k.norm_linear(x, w.lm_head, norm_weight=w.norm, eps=eps, out_dtype=torch.float32)
        aux = torch.cat([captured[i] for i in capture], dim=-1) if capture else None
        return logits, aux

    def compact(self, slots: torch.Tensor, lengths: torch.Tensor, path: torch.Tensor) -> None:
        """`LlamaRunner.compact` in one launch per (row, layer)."""
        self.k.compact_kv(self.k_cache, self.v_cache, slots, lengths, path.contiguous())
