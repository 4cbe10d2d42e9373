"""The EAGLE-3 / EAGLE-3.1 drafter step through the token path's row-invariant Triton kernels.

A drafter step in PyTorch is ~40 small kernels; here it is nine launches: the qkv projection as one fused
norm+GEMM over both inputs (`embed_hidden_linear`: input_layernorm over the embedding rows, read in place, and
hidden_norm over the hidden state, summed as one GEMM over their concatenation, which is never materialised),
RoPE + the K/V write straight into the `DraftRunner`'s cache, virtual attention (chunks + merge), o_proj +
residual h, post-norm + gate/up + SiLU, down + residual, and the final norm fused into an fp32 draft lm_head (plus
the final norm alone for EAGLE-3.1's norm_output). Static shapes, no host syncs: capturable in a CUDA graph.

EAGLE-3.1's extra norms (fc_norm over each captured layer, the final norm of norm_output) run as one fused norm
and one gain multiply each, in HF's op order (normalise in fp32, round, then scale), where the drafter module's
RMSNorms cost ~7 kernels apiece.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..engine.model import rms_norm
from ..families.registry import family_of
from ..models.eagle3 import Eagle3Drafter


class FastDrafter:
    """Token-path form of `Eagle3Drafter.step` over flat token rows and a [slots, kv_heads, L, head_dim] cache."""

    def __init__(self, drafter: Eagle3Drafter, max_positions: int, device: torch.device, dtype: torch.dtype):
        from ..engine import kernels

        cfg = drafter.config
        if not family_of(cfg).has_fast_step(cfg):
            raise ValueError(f"the fast drafter path has no form of a {cfg.algorithm} drafter's step")
        self.kernels = kernels
        self.drafter = drafter
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.eps = cfg.rms_norm_eps
        self.scale = cfg.head_dim ** -0.5  # SDPA's default, as `cached_attention` uses
        self.norm_output = bool(cfg.norm_output)
        layer, attn = drafter.midlayer, drafter.midlayer.self_attn

        def w(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(device=device, dtype=dtype).contiguous()

        with torch.no_grad():
            self.embed = w(drafter.embed_tokens.weight)
            self.qkv = w(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))  # [(Hq+2Hkv)D, 2H]
            self.input_norm = w(layer.input_layernorm.weight)
            self.hidden_norm = w(layer.hidden_norm.weight)
            self.o = w(attn.o_proj.weight)
            self.post_norm = w(layer.post_attention_layernorm.weight)
            self.gate_up = w(torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]))
            self.down = w(layer.mlp.down_proj.weight)
            self.norm = w(drafter.norm.weight)
            self.fc = w(drafter.fc.weight)
            # EAGLE-3.1's fc_norm gains as one [n_aux, H_t] tensor, applied to all captured layers at once
            self.fc_norm = w(torch.stack([n.weight for n in drafter.fc_norm])) if cfg.fc_norm else None
            self.lm_head = w(drafter.lm_head.weight)
            # RoPE tables from the drafter's own rotary module (every HF rope type and its attention scaling)
            like = torch.empty(0, dtype=dtype, device=device)
            pos = torch.arange(max_positions, device=device)[None]
            cos, sin = drafter.rotary(like, pos)
            self.cos, self.sin = cos[0].to(dtype).contiguous(), sin[0].to(dtype).contiguous()

    def step(self, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, ids: torch.Tensor,
             hidden: torch.Tensor, positions: torch.Tensor, write_pos: torch.Tensor, prefix_lens: torch.Tensor,
             pending: torch.Tensor, pending_count: torch.Tensor, max_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        """M flat token rows: ids, RoPE positions, cache slot and write position, contiguous 1-D [M]; hidden
        [M, H] row-major. Row m's K/V go to (slots[m], write_pos[m]); it attends to its slot's first
        prefix_lens[m] positions, then prefix_lens[m] + pending[m, :pending_count[m]] (ascending; its own write
        position among them). `max_keys` >= prefix + count over all rows (a static launch bound).
        Returns (next hidden state [M, H], fp32 draft logits [M, V_d])."""
        per_row = (slots, ids, positions, write_pos, prefix_lens, pending_count)
        if any(x.dim() != 1 or x.stride(0) != 1 for x in per_row) or pending.stride(-1) != 1:
            raise ValueError("token rows must be contiguous 1-D tensors (the kernels index them by row)")
        kn, eps = self.kernels, self.eps
        qkv = kn.embed_hidden_linear(ids, self.embed, self.input_norm, hidden, self.hidden_norm, self.qkv, eps)
        q = kn.rope_write_kv(qkv, self.cos, self.sin, positions, slots, write_pos, k_cache, v_cache,
                             self.heads, self.kv_heads, self.head_dim)
        attn = kn.virtual_attention(q, k_cache, v_cache, slots, prefix_lens, pending, pending_count, max_keys,
                                    self.scale)
        x = kn.norm_linear(attn, self.o, residual=hidden)  # the residual is the incoming hidden state h
        act = kn.norm_gate_up(x, self.gate_up, norm_weight=self.post_norm, eps=eps)
        x = kn.norm_linear(act, self.down, residual=x)
        logits = kn.norm_linear(x, self.lm_head, norm_weight=self.norm, eps=eps, out_dtype=torch.float32)
        nxt = self.norm * rms_norm(x, None, eps) if self.norm_output else x  # EAGLE-3.1: the post-norm state
        return nxt, logits

    def fuse(self, aux: torch.Tensor) -> torch.Tensor:
        """`Eagle3Drafter.fuse`: fc over the captured layers [..., n_aux * H_t] -> [..., H], EAGLE-3.1's fc_norm
        as one norm over the [..., n_aux, H_t] view and one multiply by the stacked gains."""
        aux = aux.to(self.fc.dtype)
        if self.fc_norm is not None:
            chunks = aux.unflatten(-1, tuple(self.fc_norm.shape))
            aux = (self.fc_norm * rms_norm(chunks, None, self.eps)).flatten(-2)
        return F.linear(aux, self.fc)
