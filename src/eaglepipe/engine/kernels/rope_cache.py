"""RoPE (after an optional per-head q/k RMSNorm, as Qwen3 has) and the K/V cache write, one program per head."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def rope_write_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, wpos_ptr, qk_gain_ptr, q_ptr, kc_ptr, vc_ptr,
                      stride_qkv, stride_rope, stride_qm, stride_qh, stride_cs, stride_ch, stride_cp, eps,
                      HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
                      QK_NORM: tl.constexpr):
    m = tl.program_id(0)
    h = tl.program_id(1)  # q heads, then k heads, then v heads, as they lie in the fused qkv row
    i = tl.arange(0, HALF)
    ok = i < D // 2
    base = qkv_ptr + m * stride_qkv + h * D
    x1 = tl.load(base + i, mask=ok, other=0.0)
    x2 = tl.load(base + D // 2 + i, mask=ok, other=0.0)
    dtype = x1.dtype
    slot = tl.load(slot_ptr + m)
    wpos = tl.load(wpos_ptr + m)
    if h >= HQ + HKV:
        dst = vc_ptr + slot * stride_cs + (h - HQ - HKV) * stride_ch + wpos * stride_cp
        tl.store(dst + i, x1, mask=ok)
        tl.store(dst + D // 2 + i, x2, mask=ok)
    else:
        a = x1.to(tl.float32)
        b = x2.to(tl.float32)
        if QK_NORM:
            rstd = 1.0 / tl.sqrt((tl.sum(a * a, axis=0) + tl.sum(b * b, axis=0)) / D + eps)
            gain = qk_gain_ptr + (h >= HQ).to(tl.int32) * D
            a = (a * rstd).to(dtype).to(tl.float32) * tl.load(gain + i, mask=ok, other=0.0).to(tl.float32)
            b = (b * rstd).to(dtype).to(tl.float32) * tl.load(gain + D // 2 + i, mask=ok, other=0.0).to(tl.float32)
            a = a.to(dtype).to(tl.float32)
            b = b.to(dtype).to(tl.float32)
        pos = tl.load(pos_ptr + m)
        c1 = tl.load(cos_ptr + pos * stride_rope + i, mask=ok, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + pos * stride_rope + D // 2 + i, mask=ok, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + pos * stride_rope + i, mask=ok, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + pos * stride_rope + D // 2 + i, mask=ok, other=0.0).to(tl.float32)
        y1 = (a * c1 - b * s1).to(dtype)
        y2 = (b * c2 + a * s2).to(dtype)
        if h < HQ:
            dst = q_ptr + m * stride_qm + h * stride_qh
        else:
            dst = kc_ptr + slot * stride_cs + (h - HQ) * stride_ch + wpos * stride_cp
        tl.store(dst + i, y1, mask=ok)
        tl.store(dst + D // 2 + i, y2, mask=ok)


def rope_write_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                  slots: torch.Tensor, write_pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  num_heads: int, num_kv_heads: int, head_dim: int, qk_gain: torch.Tensor | None = None,
                  eps: float = 1e-6) -> torch.Tensor:
    """Rotate q and k of fused qkv rows [M, (Hq + 2 Hkv) D] at their RoPE `positions` and write k, v into
    one layer's caches [slots, Hkv, L, D] at (slots[m], write_pos[m]). Returns q [M, Hq, D].

    `qk_gain` = cat([q_norm, k_norm]) [2D] applies Qwen3's per-head RMSNorm before the rotation.
    cos/sin are [max_len, D] tables (rotate-half layout, halves equal).
    """
    m = qkv.shape[0]
    if qkv.shape[1] != (num_heads + 2 * num_kv_heads) * head_dim or qkv.stride(1) != 1:
        raise ValueError(f"qkv must be row-major [M, {(num_heads + 2 * num_kv_heads) * head_dim}]")
    if k_cache.stride(-1) != 1 or k_cache.stride() != v_cache.stride():
        raise ValueError("k/v caches must share a layout with a contiguous head dim")
    q = torch.empty(m, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    grid = (m, num_heads + 2 * num_kv_heads)
    rope_write_kernel[grid](
        qkv, cos, sin, positions, slots, write_pos, qk_gain if qk_gain is not None else cos, q, k_cache, v_cache,
        qkv.stride(0), cos.stride(0), q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), eps, HQ=num_heads, HKV=num_kv_heads, D=head_dim,
        HALF=triton.next_power_of_2(head_dim // 2), QK_NORM=qk_gain is not None)
    return q
