"""The drafter's top-k log-probabilities in two short launches: log-softmax and top-k over each row of logits.

PyTorch's `topk` on a few rows of a 16,384-token draft vocabulary runs a single-block radix select per row, and a
tree has only a few rows (8 in a (6,8,32) tree). So each row is cut into chunks of CHUNK logits, one program per
(row, chunk): each takes its chunk's max, its sum of exp below that max, and its k best by k max-reductions (ties:
the lowest index first). A second launch per row merges the chunks' sums into the log-sum-exp and picks the k best
of the chunks' candidates, which keep index order among equal values. benchmarks/RESULTS.md (sixth H200 lease,
`round_profile.py`) has the figure: a (6,8,32) round of 1.784 ms wall with a top-k kernel, 2.215 ms with
PyTorch's top-k.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 1024  # logits per program in the first launch
MAX_VOCAB = 65536  # the merge holds every chunk's candidates in one program


@triton.jit
def chunk_topk_kernel(x_ptr, cval_ptr, cidx_ptr, cmax_ptr, csum_ptr, V, stride_x, C,
                      K: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    c = tl.program_id(1)
    local = tl.arange(0, BLOCK)
    offs = c * BLOCK + local
    x = tl.load(x_ptr + row * stride_x + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    top = tl.max(x, axis=0)
    safe_top = tl.where(top == float("-inf"), 0.0, top)
    tl.store(cmax_ptr + row * C + c, top)
    tl.store(csum_ptr + row * C + c, tl.sum(tl.exp(x - safe_top), axis=0))
    base = (row * C + c) * K
    for i in tl.static_range(K):
        best, arg = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
        tl.store(cval_ptr + base + i, best)
        tl.store(cidx_ptr + base + i, (c * BLOCK + arg).to(tl.int64))
        x = tl.where(local == arg, float("-inf"), x)


@triton.jit
def merge_topk_kernel(cval_ptr, cidx_ptr, cmax_ptr, csum_ptr, val_ptr, idx_ptr, C,
                      K: tl.constexpr, CP: tl.constexpr, NP: tl.constexpr):
    row = tl.program_id(0)
    cs = tl.arange(0, CP)
    c_ok = cs < C
    maxes = tl.load(cmax_ptr + row * C + cs, mask=c_ok, other=float("-inf"))
    sums = tl.load(csum_ptr + row * C + cs, mask=c_ok, other=0.0)
    top = tl.max(maxes, axis=0)
    scale = tl.where(maxes == float("-inf"), 0.0, tl.exp(maxes - top))
    log_sum = tl.log(tl.sum(sums * scale, axis=0))
    n = tl.arange(0, NP)
    n_ok = n < C * K
    v = tl.load(cval_ptr + row * C * K + n, mask=n_ok, other=float("-inf"))
    # candidates lie in (chunk, rank) order, so the first of equal values has the lowest index
    for i in tl.static_range(K):
        best, arg = tl.max(v, axis=0, return_indices=True, return_indices_tie_break_left=True)
        tl.store(val_ptr + row * K + i, (best - top) - log_sum)
        tl.store(idx_ptr + row * K + i, tl.load(cidx_ptr + row * C * K + arg))
        v = tl.where(n == arg, float("-inf"), v)


def topk_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [R, V] (V <= MAX_VOCAB, unit last stride) -> (the k largest fp32 log-probabilities, descending, and
    their indices) [R, k], as `log_softmax(logits.float()).topk(k)` gives them up to rounding and tie order."""
    r, v = logits.shape
    block = min(CHUNK, triton.next_power_of_2(v))
    if v > MAX_VOCAB or logits.stride(-1) != 1 or not 1 <= k <= min(v, block):
        raise ValueError(f"topk_logprobs takes rows of at most {MAX_VOCAB} contiguous logits and "
                         f"1 <= k <= min(V, {CHUNK})")
    chunks = triton.cdiv(v, block)
    dev = logits.device
    cand_values = torch.empty(r, chunks, k, dtype=torch.float32, device=dev)
    cand_indices = torch.empty(r, chunks, k, dtype=torch.long, device=dev)
    chunk_max = torch.empty(r, chunks, dtype=torch.float32, device=dev)
    chunk_sum = torch.empty_like(chunk_max)
    chunk_topk_kernel[(r, chunks)](logits, cand_values, cand_indices, chunk_max, chunk_sum, v, logits.stride(0),
                                   chunks, K=k, BLOCK=block, num_warps=4)
    values = torch.empty(r, k, dtype=torch.float32, device=dev)
    indices = torch.empty(r, k, dtype=torch.long, device=dev)
    merge_topk_kernel[(r,)](cand_values, cand_indices, chunk_max, chunk_sum, values, indices, chunks, K=k,
                            CP=triton.next_power_of_2(chunks), NP=triton.next_power_of_2(chunks * k), num_warps=4)
    return values, indices
