"""Moving kept pending tokens' K/V into place: after a verify forward, the accepted path's nodes go to consecutive
cache positions after the committed prefix, every layer in one launch per (row, layer)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def compact_kv_kernel(kc_ptr, vc_ptr, slot_ptr, len_ptr, path_ptr, W, stride_l, stride_s, stride_h, stride_p,
                      HEADS: tl.constexpr, D: tl.constexpr, WB: tl.constexpr, DB: tl.constexpr):
    b = tl.program_id(0)
    layer = tl.program_id(1)
    t = tl.arange(0, WB)
    d = tl.arange(0, DB)
    live = t < W
    keep = live[:, None] & (d[None, :] < D)
    slot = tl.load(slot_ptr + b)
    length = tl.load(len_ptr + b)
    src = length + tl.load(path_ptr + b * W + t, mask=live, other=0)
    dst = length + t
    for h in tl.static_range(HEADS):
        base = layer * stride_l + slot * stride_s + h * stride_h
        k = tl.load(kc_ptr + base + src[:, None] * stride_p + d[None, :], mask=keep)
        v = tl.load(vc_ptr + base + src[:, None] * stride_p + d[None, :], mask=keep)
        tl.debug_barrier()  # every source read before any destination (a later node's source) is written
        tl.store(kc_ptr + base + dst[:, None] * stride_p + d[None, :], k, mask=keep)
        tl.store(vc_ptr + base + dst[:, None] * stride_p + d[None, :], v, mask=keep)


def compact_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, lengths: torch.Tensor,
               path: torch.Tensor) -> None:
    """Move the K/V of each row's kept pending tokens (pending indices `path` [B, W], ascending) to consecutive
    positions after its committed length `lengths` [B] in cache row `slots` [B], in every layer. Caches [layers,
    slots, kv_heads, positions, head_dim] with a unit last stride; columns past a row's last kept token repeat
    it, and their copies land past the new committed end."""
    layers, _, heads, _, d = k_cache.shape
    b, w = path.shape
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1 or not path.is_contiguous():
        raise ValueError("compact_kv takes two caches of one layout and a contiguous path")
    compact_kv_kernel[(b, layers)](k_cache, v_cache, slots, lengths, path, w, k_cache.stride(0), k_cache.stride(1),
                                   k_cache.stride(2), k_cache.stride(3), HEADS=heads, D=d,
                                   WB=triton.next_power_of_2(w), DB=triton.next_power_of_2(d))
