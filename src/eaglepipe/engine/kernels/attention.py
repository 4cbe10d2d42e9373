"""Attention of each token row over its own *virtual* key sequence, in fixed chunks then an ordered merge.

A row's virtual keys are its slot's committed prefix (cache positions 0..L-1) followed by the pending tokens
it may see, given as pending indices j (cache position L + j) in ascending order: for a draft-tree node, its
ancestors and itself; for a plain decode step, itself. Once a path is committed its tokens sit at L, L+1, ...
and a later token sees exactly the same keys in the same order, so the chunking (by virtual index, CHUNK keys
each) and the merge order are the same too: the result is bit-identical either way.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 64


@triton.jit
def chunk_kernel(q_ptr, kc_ptr, vc_ptr, slot_ptr, plen_ptr, anc_ptr, cnt_ptr, m_ptr, l_ptr, o_ptr,
                 stride_qm, stride_qh, stride_cs, stride_ch, stride_cp, stride_anc,
                 stride_sm, stride_sh, stride_om, stride_oh, stride_oc, scale,
                 G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, C: tl.constexpr):
    m = tl.program_id(0)
    kvh = tl.program_id(1)
    c = tl.program_id(2)
    plen = tl.load(plen_ptr + m)
    total = plen + tl.load(cnt_ptr + m)
    if c * C < total:
        v = c * C + tl.arange(0, C)
        valid = v < total
        in_prefix = v < plen
        j = tl.load(anc_ptr + m * stride_anc + (v - plen), mask=valid & (v >= plen), other=0)
        pos = tl.where(in_prefix, v, plen + j)
        slot = tl.load(slot_ptr + m)
        d = tl.arange(0, DP)
        d_ok = d < D
        g = tl.arange(0, GP)
        g_ok = g < G
        kv_off = slot * stride_cs + kvh * stride_ch + pos[:, None] * stride_cp + d[None, :]
        kv_mask = valid[:, None] & d_ok[None, :]
        k = tl.load(kc_ptr + kv_off, mask=kv_mask, other=0.0)
        q = tl.load(q_ptr + m * stride_qm + (kvh * G + g)[:, None] * stride_qh + d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [GP, C]
        s = tl.where(valid[None, :], s, float("-inf"))
        mx = tl.max(s, axis=1)
        p = tl.exp(s - mx[:, None])
        vv = tl.load(vc_ptr + kv_off, mask=kv_mask, other=0.0)
        o = tl.dot(p.to(vv.dtype), vv, input_precision="ieee")  # [GP, DP]
        heads = kvh * G + g
        stat_off = m * stride_sm + heads * stride_sh + c
        tl.store(m_ptr + stat_off, mx, mask=g_ok)
        tl.store(l_ptr + stat_off, tl.sum(p, axis=1), mask=g_ok)
        tl.store(o_ptr + m * stride_om + heads[:, None] * stride_oh + c * stride_oc + d[None, :], o,
                 mask=g_ok[:, None] & d_ok[None, :])


@triton.jit
def merge_kernel(m_ptr, l_ptr, o_ptr, plen_ptr, cnt_ptr, out_ptr, stride_sm, stride_sh, stride_om, stride_oh,
                 stride_oc, stride_out, D: tl.constexpr, DP: tl.constexpr, C: tl.constexpr):
    m = tl.program_id(0)
    h = tl.program_id(1)
    chunks = (tl.load(plen_ptr + m) + tl.load(cnt_ptr + m) + C - 1) // C
    d = tl.arange(0, DP)
    d_ok = d < D
    run_max = tl.load(m_ptr + m * stride_sm + h * stride_sh)
    run_sum = tl.load(l_ptr + m * stride_sm + h * stride_sh)
    acc = tl.load(o_ptr + m * stride_om + h * stride_oh + d, mask=d_ok, other=0.0)
    for c in range(1, chunks):
        c_max = tl.load(m_ptr + m * stride_sm + h * stride_sh + c)
        c_sum = tl.load(l_ptr + m * stride_sm + h * stride_sh + c)
        c_out = tl.load(o_ptr + m * stride_om + h * stride_oh + c * stride_oc + d, mask=d_ok, other=0.0)
        new_max = tl.maximum(run_max, c_max)
        old_scale = tl.exp(run_max - new_max)
        new_scale = tl.exp(c_max - new_max)
        acc = acc * old_scale + c_out * new_scale
        run_sum = run_sum * old_scale + c_sum * new_scale
        run_max = new_max
    out = acc / run_sum
    tl.store(out_ptr + m * stride_out + h * D + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def virtual_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                      prefix_lens: torch.Tensor, pending: torch.Tensor, pending_count: torch.Tensor,
                      max_keys: int, scale: float) -> torch.Tensor:
    """q [M, Hq, D] over one layer's caches [slots, Hkv, L, D] -> [M, Hq * D] in q's dtype.

    Row m sees cache positions 0..prefix_lens[m]-1, then prefix_lens[m] + pending[m, i] for
    i < pending_count[m] (ascending pending indices). `max_keys` bounds prefix + count over all rows; it only
    sizes the launch (a static bound keeps the call capturable in a CUDA graph).
    """
    m, hq, d = q.shape
    hkv = k_cache.shape[1]
    if hq % hkv or k_cache.shape[-1] != d or q.stride(-1) != 1 or k_cache.stride(-1) != 1:
        raise ValueError("q heads must group over kv heads, with a contiguous head dim of equal size")
    if k_cache.stride() != v_cache.stride() or pending.stride(-1) != 1:
        raise ValueError("k/v caches must share a layout and pending indices must be row-major")
    group = hq // hkv
    chunks = triton.cdiv(max(max_keys, 1), CHUNK)
    dev = q.device
    run_max = torch.empty(m, hq, chunks, dtype=torch.float32, device=dev)
    run_sum = torch.empty_like(run_max)
    partial = torch.empty(m, hq, chunks, d, dtype=torch.float32, device=dev)
    out = torch.empty(m, hq * d, dtype=q.dtype, device=dev)
    dp = triton.next_power_of_2(d)
    chunk_kernel[(m, hkv, chunks)](
        q, k_cache, v_cache, slots, prefix_lens, pending, pending_count, run_max, run_sum, partial,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), pending.stride(0),
        run_max.stride(0), run_max.stride(1), partial.stride(0), partial.stride(1), partial.stride(2), scale,
        G=group, GP=max(16, triton.next_power_of_2(group)), D=d, DP=max(16, dp), C=CHUNK)
    merge_kernel[(m, hq)](
        run_max, run_sum, partial, prefix_lens, pending_count, out, run_max.stride(0), run_max.stride(1),
        partial.stride(0), partial.stride(1), partial.stride(2), out.stride(0), D=d, DP=dp, C=CHUNK)
    return out
