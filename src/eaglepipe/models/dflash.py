"""The DFlash drafter (arXiv 2602.06036) with the weight names SGLang and vLLM load (layers.{i}.*, fc, hidden_norm,
norm).

Several Qwen3-style decoder layers (pre-norm, q/k RMSNorm per head, SwiGLU) denoise a block [anchor token,
MASK x (B-1)] in one forward. The target's captured layers, fused once by `hidden_norm(fc(cat))`, are the context:
every layer projects them with its own k/v projections (k_norm and RoPE at their positions) and the block's queries
attend to those K/V and to the block itself. There is no embedding or lm_head of its own: the block is embedded and
its outputs scored with the target's (the frozen copies here are not exported).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .config import DrafterConfig
from .drafter import DrafterModule, FullVocab
from .layers import DraftDecoderLayer, RMSNorm, Rotary, SelfAttention, rotate

# attention of layer i's block queries q [B, heads, Q, d] over the block's own k/v [B, kv_heads, Q, d] and the
# context K/V the caller holds for that layer
BlockAttend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class QKNormAttention(SelfAttention):
    """q/k/v/o projections with an RMSNorm over each head's q and k (Qwen3's)."""

    def __init__(self, cfg: DrafterConfig) -> None:
        super().__init__(cfg, cfg.hidden_size)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def heads_of(self, proj: nn.Linear, norm: nn.Module | None, x: torch.Tensor, heads: int) -> torch.Tensor:
        """`proj(x)` [B, S, heads*d] as [B, heads, S, d], normed per head by `norm` when given."""
        b, s, _ = x.shape
        y = proj(x).view(b, s, heads, self.head_dim)
        return (y if norm is None else norm(y)).transpose(1, 2)


class DFlashLayer(DraftDecoderLayer):
    """A pre-norm decoder layer whose keys also come from the context features (`context_kv`)."""

    def __init__(self, cfg: DrafterConfig) -> None:
        super().__init__(cfg, cfg.hidden_size, input_norms=False)
        self.self_attn = QKNormAttention(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The block's x [B, S, H] -> q [B, heads, S, d], k/v [B, kv_heads, S, d]: input_layernorm, the projections,
        q/k norms, RoPE on q and k."""
        a, h = self.self_attn, self.input_layernorm(x)
        q = a.heads_of(a.q_proj, a.q_norm, h, a.heads)
        k = a.heads_of(a.k_proj, a.k_norm, h, a.kv_heads)
        return rotate(q, cos, sin), rotate(k, cos, sin), a.heads_of(a.v_proj, None, h, a.kv_heads)

    def context_kv(self, context: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's K/V [B, kv_heads, T, d] of the fused context features [B, T, H] (no input norm: they are
        normed once by hidden_norm), with k_norm and RoPE at the context's positions."""
        a = self.self_attn
        k = a.heads_of(a.k_proj, a.k_norm, context, a.kv_heads)
        return rotate(k, cos, sin), a.heads_of(a.v_proj, None, context, a.kv_heads)


class DFlashDrafter(FullVocab, DrafterModule):
    """fc + hidden_norm fuse the target's layers into the context; `num_hidden_layers` DFlashLayers over the block;
    the final norm, then the target's lm_head over its whole vocabulary."""

    def __init__(self, cfg: DrafterConfig, target_lm_head: torch.Tensor) -> None:
        super().__init__()
        if tuple(target_lm_head.shape) != (cfg.vocab_size, cfg.hidden_size):
            raise ValueError(f"target lm_head must be [{cfg.vocab_size}, {cfg.hidden_size}], "
                             f"got {tuple(target_lm_head.shape)}")
        if cfg.mask_token_id is None or not 0 <= cfg.mask_token_id < cfg.vocab_size:
            raise ValueError(f"a DFlash drafter needs a mask token id in 0..{cfg.vocab_size - 1}, "
                             f"got {cfg.mask_token_id!r}")
        if cfg.block_size < 2 or cfg.num_hidden_layers < 1:
            raise ValueError(f"a DFlash drafter needs block_size >= 2 and num_hidden_layers >= 1, got "
                             f"{cfg.block_size} and {cfg.num_hidden_layers}")
        self.config = cfg
        h = cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, h)
        self.embed_tokens.weight.requires_grad_(False)
        self.fc = nn.Linear(len(cfg.aux_layers) * cfg.target_hidden_size, h, bias=False)
        self.hidden_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.layers = nn.ModuleList(DFlashLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        self.rotary = Rotary(cfg)
        self.register_buffer("lm_head_weight", target_lm_head.detach().clone(), persistent=False)

    def fuse(self, aux_hidden: torch.Tensor) -> torch.Tensor:
        """The target's captured layers [B, T, n*H_t] (low->high) -> the context features hidden_norm(fc(.))."""
        return self.hidden_norm(self.fc(aux_hidden))

    def context_kv(self, context: torch.Tensor, position_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's context K/V [B, kv_heads, T, d] of the fused features [B, T, H] at RoPE positions
        `position_ids` [B, T]."""
        cos, sin = self.rotary(context, position_ids)
        return [layer.context_kv(context, cos, sin) for layer in self.layers]

    def block_ids(self, anchors: torch.Tensor, size: int) -> torch.Tensor:
        """The blocks' tokens [..., size]: each anchor token [...] followed by size-1 mask tokens."""
        ids = torch.full((*anchors.shape, size), self.config.mask_token_id, dtype=torch.long, device=anchors.device)
        ids[..., 0] = anchors
        return ids

    def forward_block(self, ids: torch.Tensor, position_ids: torch.Tensor, attend: BlockAttend) -> torch.Tensor:
        """The layers' output [B, Q, H] (before the final norm) for the block tokens `ids` [B, Q] at RoPE positions
        `position_ids` [B, Q]; layer i's attention is `attend(i, q, k, v)` (the caller adds the context K/V and
        the mask)."""
        x = self.embed_tokens(ids)
        cos, sin = self.rotary(x, position_ids)
        for i, layer in enumerate(self.layers):
            q, k, v = layer.project(x, cos, sin)
            x = layer.finish(attend(i, q, k, v), x)
        return x

    def logits(self, layer_out: torch.Tensor) -> torch.Tensor:
        """Full-vocab logits: the target's lm_head over norm(out)."""
        normed = self.norm(layer_out)
        return normed @ self.lm_head_weight.to(normed.dtype).t()

    def draft_layers(self) -> list[DraftDecoderLayer]:
        return list(self.layers)
