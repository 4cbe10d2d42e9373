"""Attention of the block objective's queries (train/block_objective.py).

Row r holds A blocks of B queries; block j's queries see the context keys (the target's fused features, one per
row position) strictly before its anchor and in the anchor's document, and every key of their own block
(bidirectional). Two kernels with the same signature: FlexAttention over [context; blocks] keys with that mask as
a block-sparse mask (CUDA), and explicit scores over the context and the own block only (CPU / reference).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

# (q [R, h, A*B, d], context k/v [R, kv_h, T, d], block k/v [R, kv_h, A*B, d]) -> out [R, h, A*B, d]
BlockAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def context_visible(anchors: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """bool [R, A, T]: context key s is visible to block j iff s < anchor j and both lie in one document (padding
    blocks, anchor -1, see none)."""
    t = doc_ids.shape[1]
    doc = doc_ids.gather(1, anchors.clamp(min=0))
    keys = torch.arange(t, device=anchors.device)
    return (keys[None, None, :] < anchors[..., None]) & (doc_ids[:, None, :] == doc[..., None])


def math_block_attention(anchors: torch.Tensor, doc_ids: torch.Tensor, block: int) -> BlockAttention:
    """Explicit scores: [A*B, T] over the context under `context_visible`, [B, B] within each block, one softmax
    over both."""
    visible = context_visible(anchors, doc_ids).repeat_interleave(block, dim=1)[:, None]  # [R, 1, A*B, T]

    def run(q: torch.Tensor, k_ctx: torch.Tensor, v_ctx: torch.Tensor, k_blk: torch.Tensor,
            v_blk: torch.Tensor) -> torch.Tensor:
        r, h, n, d = q.shape
        a = n // block
        wide = torch.promote_types(q.dtype, torch.float32)
        scale = 1.0 / math.sqrt(d)
        k_ctx, v_ctx = _expand_kv(k_ctx, h), _expand_kv(v_ctx, h)
        k_blk, v_blk = (_expand_kv(x, h).view(r, h, a, block, d) for x in (k_blk, v_blk))
        ctx = (q @ k_ctx.transpose(-1, -2)).to(wide).masked_fill(~visible, float("-inf"))
        own = (q.view(r, h, a, block, d) @ k_blk.transpose(-1, -2)).to(wide).view(r, h, n, block)
        probs = torch.softmax(torch.cat([ctx, own], dim=-1) * scale, dim=-1)
        t = k_ctx.shape[2]
        out = probs[..., :t].to(v_ctx.dtype) @ v_ctx
        out = out + (probs[..., t:].view(r, h, a, block, block).to(v_blk.dtype) @ v_blk).view(r, h, n, d)
        return out.to(q.dtype)
    return run


_compiled_flex: Optional[Callable] = None


def flex_block_attention(anchors: torch.Tensor, doc_ids: torch.Tensor, block: int, heads: int) -> BlockAttention:
    """FlexAttention over the keys [context (T); blocks (A*B)] with the block objective's mask, built once per
    batch."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False) if anchors.is_cuda else flex_attention
    r, t = doc_ids.shape
    n = anchors.shape[1] * block
    anchor_doc = doc_ids.gather(1, anchors.clamp(min=0))

    def mask_mod(b, _h, qi, ki):
        j = qi // block
        in_context = (ki < t) & (ki < anchors[b, j]) & (doc_ids[b, ki.clamp(max=t - 1)] == anchor_doc[b, j])
        return in_context | ((ki >= t) & ((ki - t) // block == j))

    block_mask = create_block_mask(mask_mod, r, None, n, t + n, device=anchors.device)

    def run(q: torch.Tensor, k_ctx: torch.Tensor, v_ctx: torch.Tensor, k_blk: torch.Tensor,
            v_blk: torch.Tensor) -> torch.Tensor:
        k, v = torch.cat([k_ctx, k_blk], dim=2), torch.cat([v_ctx, v_blk], dim=2)
        return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != heads)
    return run
