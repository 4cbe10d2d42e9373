"""Building blocks of the drafters: RMSNorm, RoPE, the SwiGLU MLP and a Llama decoder layer split in two
halves (`project` gives rotated q/k/v, `finish` applies o_proj, residuals and the MLP) so that training can
run its own TTT attention between them and inference can run cached attention."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import DrafterConfig


class RMSNorm(nn.Module):
    """Llama RMSNorm, computed in fp32 like HF's."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class Rotary(nn.Module):
    """RoPE cos/sin for given positions; every HF rope type (llama3, yarn, ...) through LlamaRotaryEmbedding."""

    def __init__(self, cfg: DrafterConfig) -> None:
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        self.inner = LlamaRotaryEmbedding(cfg.llama_config())

    def forward(self, like: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inner(like, position_ids)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply RoPE to x [B, heads, S, d] with cos/sin [B, S, d]; the result keeps x's dtype (under bf16
    autocast cos/sin are fp32, and FlexAttention's backward rejects q/k/v of mixed dtypes)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class MLP(nn.Module):
    """SwiGLU MLP (gate/up/down, no bias)."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SelfAttention(nn.Module):
    """q/k/v/o projections of a Llama attention whose input width is `in_dim` (2H for EAGLE-3)."""

    def __init__(self, cfg: DrafterConfig, in_dim: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(in_dim, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(in_dim, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(in_dim, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=False)


class DraftDecoderLayer(nn.Module):
    """One Llama decoder layer whose attention input is `in_dim` wide; `input_norms` adds input_layernorm and
    hidden_norm, the norms of its two input halves (EAGLE-3: `in_dim` = 2H; EAGLE-1: `in_dim` = H, no input
    norm)."""

    def __init__(self, cfg: DrafterConfig, in_dim: int, input_norms: bool) -> None:
        super().__init__()
        self.self_attn = SelfAttention(cfg, in_dim)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if input_norms:
            self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, S, in_dim] -> q [B, heads, S, d], k/v [B, kv_heads, S, d] with RoPE applied to q and k."""
        a = self.self_attn
        b, s, _ = x.shape
        q = a.q_proj(x).view(b, s, a.heads, a.head_dim).transpose(1, 2)
        k = a.k_proj(x).view(b, s, a.kv_heads, a.head_dim).transpose(1, 2)
        v = a.v_proj(x).view(b, s, a.kv_heads, a.head_dim).transpose(1, 2)
        return rotate(q, cos, sin), rotate(k, cos, sin), v

    def finish(self, attn: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """attn [B, heads, S, d] -> layer output [B, S, H] (o_proj + residual, post-norm MLP + residual)."""
        b, _, s, _ = attn.shape
        h = self.self_attn.o_proj(attn.transpose(1, 2).reshape(b, s, -1)) + residual
        return h + self.mlp(self.post_attention_layernorm(h))


# attention of a drafter layer's rotated q [B, heads, S, d] over its new k/v [B, kv_heads, S, d]
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     past_kv: Optional[tuple[torch.Tensor, torch.Tensor]],
                     attn_mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Inference attention of S new queries over past + new keys; mask bool [B, 1, S, L+S] (True = attend),
    None = causal over the new tokens with every past key visible. Returns (out, (k_all, v_all))."""
    if past_kv is not None:
        k = torch.cat([past_kv[0], k], dim=2)
        v = torch.cat([past_kv[1], v], dim=2)
    s, total = q.shape[2], k.shape[2]
    if attn_mask is None:
        past = total - s
        attn_mask = torch.ones(s, total, dtype=torch.bool, device=q.device).tril(diagonal=past)[None, None]
    elif attn_mask.shape[-2:] != (s, total):
        raise ValueError(f"attn_mask must be [B, 1, {s}, {total}], got {tuple(attn_mask.shape)}")
    rep = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                         attn_mask=attn_mask)
    return out, (k, v)
