"""The token path: the runner's decoder layers through row-invariant Triton kernels, for decode and verify.

Seven launches per layer (norm+qkv, RoPE+cache write, attention chunks, merge, o_proj+residual,
norm+gate/up+SiLU, down+residual) and an fp32 LM head with the final norm fused in. Every token row is
computed from its own inputs only, so a token gets the same logits decoded alone, batched, or as a node of a
draft tree: greedy speculative decoding then reproduces plain greedy decoding exactly, in bf16 too.
Prefill stays on the PyTorch path (its K/V are shared by both decoders, so exactness is unaffected).
"""
from __future__ import annotations

import os

from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F

from ..utils.compiled import compiled_on_cuda

if TYPE_CHECKING:
    from .model import LlamaRunner

MAX_ROWS = 64  # token rows per forward in the row-invariant regime; larger batches use the PyTorch path


def triton_available() -> bool:
    """Whether Triton can be imported (it ships with CUDA builds of PyTorch)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def token_kernels_default(device: torch.device) -> bool:
    """Whether the engine and the drafter use the Triton token-path kernels unless told: on CUDA when Triton
    imports, and not when the environment sets EAGLEPIPE_TOKEN_PATH=0 (the PyTorch path, for diagnosis)."""
    return device.type == "cuda" and os.environ.get("EAGLEPIPE_TOKEN_PATH", "1") != "0" and triton_available()


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


@compiled_on_cuda
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
    """Forward of up to MAX_ROWS pending tokens over a `LlamaRunner`'s weights and KV cache."""

    def __init__(self, runner: "LlamaRunner"):
        from . import kernels

        self.k = kernels
        self.runner = runner
        s = runner.shapes
        self.qk_gain = [torch.cat([w.q_norm, w.k_norm]) if s.qk_norm else None for w in runner.weights.layers]

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
        r, s, k = self.runner, self.runner.shapes, self.k
        eps = s.rms_norm_eps
        x = F.embedding(ids, r.weights.embed)
        captured = {0: x} if 0 in capture else {}
        for i, w in enumerate(r.weights.layers):
            qkv = k.norm_linear(x, w.qkv, norm_weight=w.input_norm, eps=eps, bias=w.qkv_bias)
            q = k.rope_write_kv(qkv, r.cos, r.sin, positions, slots, write_pos, r.k_cache[i], r.v_cache[i],
                                s.num_heads, s.num_kv_heads, s.head_dim, self.qk_gain[i], eps)
            attn = k.virtual_attention(q, r.k_cache[i], r.v_cache[i], slots, prefix_lens, pending, pending_count,
                                       max_keys, r.scale)
            x = k.norm_linear(attn, w.o, bias=w.o_bias, residual=x)
            act = k.norm_gate_up(x, w.gate_up, norm_weight=w.post_norm, eps=eps, bias=w.gate_up_bias)
            x = k.norm_linear(act, w.down, bias=w.down_bias, residual=x)
            if i + 1 in capture:
                captured[i + 1] = x
        logits = k.norm_linear(x, r.weights.lm_head, norm_weight=r.weights.norm, eps=eps, out_dtype=torch.float32)
        aux = torch.cat([captured[i] for i in capture], dim=-1) if capture else None
        return logits, aux
