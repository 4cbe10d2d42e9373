"""Drafter steps through the token path's row-invariant Triton kernels: EAGLE-3 / EAGLE-3.1 and EAGLE-1/2.

A drafter step in PyTorch is ~40 small kernels; here it is about nine launches. The layer's input: for EAGLE-3 the
qkv projection as one fused norm+GEMM over both inputs (`embed_hidden_linear`: input_layernorm over the embedding
rows, read in place, and hidden_norm over the hidden state, summed as one GEMM over their concatenation, which is
never materialised); for EAGLE-1 fc(cat(embed, h)) + bias, then the plain qkv GEMM. Then the shared layer: RoPE +
the K/V write straight into the `DraftRunner`'s cache, virtual attention (chunks + merge), o_proj + residual,
post-norm + gate/up + SiLU, down + residual. Last the fp32 logits: EAGLE-3's final norm fused into its draft
lm_head (plus the final norm alone for EAGLE-3.1's norm_output), EAGLE-1's target lm_head over the whole vocab.
Static shapes, no host syncs: capturable in a CUDA graph.

EAGLE-3.1's extra norms (fc_norm over each captured layer, the final norm of norm_output) run as one fused norm
and one gain multiply each, in HF's op order (normalise in fp32, round, then scale), where the drafter module's
RMSNorms cost ~7 kernels apiece.
"""
from __future__ import annotations

from typing import Callable, Union

import torch
import torch.nn.functional as F

from ..engine.model import rms_norm
from ..families.registry import family_of
from ..models.config import DrafterConfig
from ..models.eagle1 import Eagle1Drafter
from ..models.eagle3 import Eagle3Drafter
from ..models.layers import DraftDecoderLayer, Rotary


def check_rows(slots: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor, write_pos: torch.Tensor,
               prefix_lens: torch.Tensor, pending: torch.Tensor, pending_count: torch.Tensor) -> None:
    """The kernels index token rows by position: every per-row tensor contiguous 1-D, `pending` unit last stride."""
    per_row = (slots, ids, positions, write_pos, prefix_lens, pending_count)
    if any(x.dim() != 1 or x.stride(0) != 1 for x in per_row) or pending.stride(-1) != 1:
        raise ValueError("token rows must be contiguous 1-D tensors (the kernels index them by row)")


class FastLayer:
    """A drafter decoder layer's attention and MLP for the kernels: its weights in the engine's dtype, fused as the
    kernels read them (q/k/v stacked, gate/up stacked), and the RoPE tables of its rotary module."""

    def __init__(self, layer: DraftDecoderLayer, rotary: Rotary, cfg: DrafterConfig, max_positions: int,
                 device: torch.device, dtype: torch.dtype):
        from ..engine import kernels

        self.kernels = kernels
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.eps = cfg.rms_norm_eps
        self.scale = cfg.head_dim ** -0.5  # SDPA's default, as `cached_attention` uses
        attn = layer.self_attn
        with torch.no_grad():
            self.qkv = weight(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]), device, dtype)
            self.o = weight(attn.o_proj.weight, device, dtype)
            self.post_norm = weight(layer.post_attention_layernorm.weight, device, dtype)
            self.gate_up = weight(torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]), device, dtype)
            self.down = weight(layer.mlp.down_proj.weight, device, dtype)
            # every HF rope type and its attention scaling, as the drafter module computes them
            like = torch.empty(0, dtype=dtype, device=device)
            cos, sin = rotary(like, torch.arange(max_positions, device=device)[None])
            self.cos, self.sin = cos[0].to(dtype).contiguous(), sin[0].to(dtype).contiguous()

    def finish(self, qkv: torch.Tensor, residual: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               slots: torch.Tensor, positions: torch.Tensor, write_pos: torch.Tensor, prefix_lens: torch.Tensor,
               pending: torch.Tensor, pending_count: torch.Tensor, max_keys: int) -> torch.Tensor:
        """From the rows' q/k/v [M, (Hq + 2 Hkv) D] to the layer's output [M, H]: RoPE and the K/V write, attention,
        o_proj + `residual`, post-norm MLP + residual."""
        kn = self.kernels
        q = kn.rope_write_kv(qkv, self.cos, self.sin, positions, slots, write_pos, k_cache, v_cache,
                             self.heads, self.kv_heads, self.head_dim)
        attn = kn.virtual_attention(q, k_cache, v_cache, slots, prefix_lens, pending, pending_count, max_keys,
                                    self.scale)
        x = kn.norm_linear(attn, self.o, residual=residual)
        act = kn.norm_gate_up(x, self.gate_up, norm_weight=self.post_norm, eps=self.eps)
        return kn.norm_linear(act, self.down, residual=x)


def weight(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A parameter as the kernels read it: detached, in the engine's dtype, row-major."""
    return t.detach().to(device=device, dtype=dtype).contiguous()


def require_fast_step(cfg: DrafterConfig) -> None:
    """Refuse a drafter whose family's step has no token-path form."""
    if not family_of(cfg).has_fast_step(cfg):
        raise ValueError(f"the fast drafter path has no form of a {cfg.algorithm} drafter's step")


class FastDrafter:
    """Token-path form of `Eagle3Drafter.step` over flat token rows and a [slots, kv_heads, L, head_dim] cache."""

    def __init__(self, drafter: Eagle3Drafter, max_positions: int, device: torch.device, dtype: torch.dtype):
        cfg = drafter.config
        require_fast_step(cfg)
        self.layer = FastLayer(drafter.midlayer, drafter.rotary, cfg, max_positions, device, dtype)
        self.norm_output = bool(cfg.norm_output)
        layer = drafter.midlayer
        with torch.no_grad():
            self.embed = weight(drafter.embed_tokens.weight, device, dtype)
            self.input_norm = weight(layer.input_layernorm.weight, device, dtype)
            self.hidden_norm = weight(layer.hidden_norm.weight, device, dtype)
            self.norm = weight(drafter.norm.weight, device, dtype)
            self.fc = weight(drafter.fc.weight, device, dtype)
            # EAGLE-3.1's fc_norm gains as one [n_aux, H_t] tensor, applied to all captured layers at once
            self.fc_norm = weight(torch.stack([n.weight for n in drafter.fc_norm]), device, dtype) \
                if cfg.fc_norm else None
            self.lm_head = weight(drafter.lm_head.weight, device, dtype)

    def step(self, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, ids: torch.Tensor,
             hidden: torch.Tensor, positions: torch.Tensor, write_pos: torch.Tensor, prefix_lens: torch.Tensor,
             pending: torch.Tensor, pending_count: torch.Tensor, max_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        """M flat token rows: ids, RoPE positions, cache slot and write position, contiguous 1-D [M]; hidden
        [M, H] row-major. Row m's K/V go to (slots[m], write_pos[m]); it attends to its slot's first
        prefix_lens[m] positions, then prefix_lens[m] + pending[m, :pending_count[m]] (ascending; its own write
        position among them). `max_keys` >= prefix + count over all rows (a static launch bound).
        Returns (next hidden state [M, H], fp32 draft logits [M, V_d])."""
        check_rows(slots, ids, positions, write_pos, prefix_lens, pending, pending_count)
        kn, eps = self.layer.kernels, self.layer.eps
        qkv = kn.embed_hidden_linear(ids, self.embed, self.input_norm, hidden, self.hidden_norm, self.layer.qkv, eps)
        x = self.layer.finish(qkv, hidden, k_cache, v_cache, slots, positions, write_pos, prefix_lens, pending,
                              pending_count, max_keys)  # the residual is the incoming hidden state h
        logits = kn.norm_linear(x, self.lm_head, norm_weight=self.norm, eps=eps, out_dtype=torch.float32)
        nxt = self.norm * rms_norm(x, None, eps) if self.norm_output else x  # EAGLE-3.1: the post-norm state
        return nxt, logits

    def fuse(self, aux: torch.Tensor) -> torch.Tensor:
        """`Eagle3Drafter.fuse`: fc over the captured layers [..., n_aux * H_t] -> [..., H], EAGLE-3.1's fc_norm
        as one norm over the [..., n_aux, H_t] view and one multiply by the stacked gains."""
        aux = aux.to(self.fc.dtype)
        if self.fc_norm is not None:
            chunks = aux.unflatten(-1, tuple(self.fc_norm.shape))
            aux = (self.fc_norm * rms_norm(chunks, None, self.layer.eps)).flatten(-2)
        return F.linear(aux, self.fc)

    def draft_input(self, captured: torch.Tensor, final_norm: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The family's `draft_input` on this path: the captured layers' fusion."""
        return self.fuse(captured)


class FastEagle1Drafter:
    """Token-path form of `Eagle1Drafter.step`: x = fc(cat(embed(tok), h)) + bias, the layer without input norm
    (x is its residual), logits through the target's lm_head over the whole vocabulary, the output fed on."""

    def __init__(self, drafter: Eagle1Drafter, max_positions: int, device: torch.device, dtype: torch.dtype):
        cfg = drafter.config
        require_fast_step(cfg)
        self.layer = FastLayer(drafter.layers[0], drafter.rotary, cfg, max_positions, device, dtype)
        with torch.no_grad():
            self.embed = weight(drafter.embed_tokens.weight, device, dtype)
            self.fc = weight(drafter.fc.weight, device, dtype)
            self.fc_bias = weight(drafter.fc.bias, device, dtype)
            self.lm_head = weight(drafter.lm_head_weight, device, dtype)

    def step(self, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, ids: torch.Tensor,
             hidden: torch.Tensor, positions: torch.Tensor, write_pos: torch.Tensor, prefix_lens: torch.Tensor,
             pending: torch.Tensor, pending_count: torch.Tensor, max_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`FastDrafter.step`'s rows and result; the logits are over the target's whole vocabulary."""
        check_rows(slots, ids, positions, write_pos, prefix_lens, pending, pending_count)
        kn = self.layer.kernels
        x = kn.norm_linear(torch.cat([self.embed.index_select(0, ids), hidden], dim=-1), self.fc, bias=self.fc_bias)
        out = self.layer.finish(kn.norm_linear(x, self.layer.qkv), x, k_cache, v_cache, slots, positions, write_pos,
                                prefix_lens, pending, pending_count, max_keys)
        return out, kn.norm_linear(out, self.lm_head, out_dtype=torch.float32)

    def draft_input(self, captured: torch.Tensor, final_norm: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The family's `draft_input` on this path: the target's final post-norm hidden state."""
        return final_norm(captured)


AnyFastDrafter = Union[FastDrafter, FastEagle1Drafter]


def fast_drafter_for(drafter: torch.nn.Module, max_positions: int, device: torch.device,
                     dtype: torch.dtype) -> AnyFastDrafter:
    """The token-path form of `drafter`'s step (its family must have one: `has_fast_step`)."""
    if isinstance(drafter, Eagle1Drafter):
        return FastEagle1Drafter(drafter, max_positions, device, dtype)
    return FastDrafter(drafter, max_positions, device, dtype)
