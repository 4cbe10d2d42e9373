"""TTT attention without a [T, T*(k+1)] mask.

At TTT step k the query at slot t sees the step-0 keys at slots s <= t of its own document and, of steps
1..k, only the key at slot t (the diagonal). We attend over the step-0 keys once (causal + document mask,
giving output o0 and log-sum-exp L0) and merge the k diagonal scores q_t.k_j[t] by log-sum-exp:
    out = (e^{L0} o0 + sum_j e^{s_j} v_j[t]) / (e^{L0} + sum_j e^{s_j}).
Two step-0 kernels: FlexAttention (CUDA, block-sparse document mask, compiled) and an explicit-score
version (CPU / reference speed path); both are differentiable including through L0.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

try:  # torch >= 2.9 names the log-sum-exp output through AuxRequest
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:  # pragma: no cover - older torch
    AuxRequest = None

Step0Fn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, T, T]: key s visible to query t iff s <= t and both lie in the same document."""
    t = doc_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=doc_ids.device).tril()
    return (causal[None] & (doc_ids[:, :, None] == doc_ids[:, None, :]))[:, None]


def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (fp64 stays fp64) for scores and softmax weights."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def math_step0(mask: torch.Tensor) -> Step0Fn:
    """Step-0 attention with explicit [B, h, T, T] scores under `mask` (from `document_causal_mask`)."""
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
        scores = _wide(q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
        scores = scores.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - lse[..., None]).to(v.dtype)
        return probs @ v, lse
    return run


_compiled_flex: Optional[Callable] = None


def flex_step0(doc_ids: torch.Tensor, heads: int) -> Step0Fn:
    """Step-0 attention with FlexAttention and a block-sparse causal document mask (built once per batch)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False) if doc_ids.is_cuda else flex_attention
    b, t = doc_ids.shape

    def mask_mod(bi, _h, qi, ki):
        return (ki <= qi) & (doc_ids[bi, qi] == doc_ids[bi, ki])

    block_mask = create_block_mask(mask_mod, b, None, t, t, device=doc_ids.device)

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gqa = k.shape[1] != heads
        if AuxRequest is not None:
            out, aux = _compiled_flex(q, k, v, block_mask=block_mask, return_aux=AuxRequest(lse=True),
                                      enable_gqa=gqa)
            return out, _wide(aux.lse)
        out, lse = _compiled_flex(q, k, v, block_mask=block_mask, return_lse=True, enable_gqa=gqa)
        return out, _wide(lse)
    return run


def ttt_attention(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                  step0: Step0Fn) -> torch.Tensor:
    """Attention of step-k queries q [B, h, T, d] given keys/values of steps 0..k ([B, kv_h, T, d] each).

    The diagonal merge runs in at least fp32 (autocast off) with the query heads grouped by their kv head, so
    the keys and values of steps 1..k are never repeated to every query head."""
    o0, lse0 = step0(q, keys[0], values[0])
    if len(keys) == 1:
        return o0
    b, heads, t, d = q.shape
    groups = keys[0].shape[1]
    with torch.autocast(q.device.type, enabled=False):
        grouped = (b, groups, heads // groups, t)
        qg = _wide(q).reshape(*grouped, d)                                    # [B, g, r, T, d]
        diag_k = _wide(torch.stack(keys[1:]))                                 # [k, B, g, T, d]
        diag_v = _wide(torch.stack(values[1:]))
        diag_scores = torch.einsum("bgrtd,kbgtd->kbgrt", qg, diag_k) * (1.0 / math.sqrt(d))
        lse = lse0.reshape(grouped)
        total = torch.logsumexp(torch.cat([lse[None], diag_scores], dim=0), dim=0)  # [B, g, r, T]
        w0 = torch.exp(lse - total)[..., None]
        wd = torch.exp(diag_scores - total[None])
        out = w0 * _wide(o0).reshape(*grouped, d) + torch.einsum("kbgrt,kbgtd->bgrtd", wd, diag_v)
    return out.reshape(b, heads, t, d).to(q.dtype)
