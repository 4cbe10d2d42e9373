"""The drafter's top-k log-probabilities in one launch: log-softmax and top-k over each row of logits.

PyTorch's `topk` on a few rows of a 16,384-token draft vocabulary runs a single-block radix select per row
(55 µs a call on an H200, the largest cost of a tree round). Here one program holds a whole row in registers,
takes its log-sum-exp, then picks the k largest by k max-reductions (ties: the lowest index first). On the
H200 it took 11 µs a call, and a (6,8,32) draft 0.52 ms against 0.79 with PyTorch's top-k
(benchmarks/RESULTS.md, sixth lease); EAGLEPIPE_TOPK_KERNEL=0 goes back to PyTorch's top-k.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_VOCAB = 16384  # a row must fit one program's registers


@triton.jit
def _topk_logprob_kernel(x_ptr, val_ptr, idx_ptr, V, stride_x, K: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride_x + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    top = tl.max(x, axis=0)
    log_sum = tl.log(tl.sum(tl.exp(x - top), axis=0))
    for i in tl.static_range(K):
        best, arg = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
        tl.store(val_ptr + row * K + i, (best - top) - log_sum)
        tl.store(idx_ptr + row * K + i, arg.to(tl.int64))
        x = tl.where(offs == arg, float("-inf"), x)


def topk_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [R, V] (V <= MAX_VOCAB, unit last stride) -> (the k largest fp32 log-probabilities, descending, and
    their indices) [R, k], as `log_softmax(logits.float()).topk(k)` gives them up to rounding and tie order."""
    r, v = logits.shape
    if v > MAX_VOCAB or logits.stride(-1) != 1 or not 1 <= k <= v:
        raise ValueError(f"topk_logprobs takes rows of at most {MAX_VOCAB} contiguous logits and 1 <= k <= V")
    values = torch.empty(r, k, dtype=torch.float32, device=logits.device)
    indices = torch.empty(r, k, dtype=torch.long, device=logits.device)
    block = triton.next_power_of_2(v)
    _topk_logprob_kernel[(r,)](logits, values, indices, v, logits.stride(0), K=k, BLOCK=block,
                               num_warps=16 if block >= 8192 else 4)
    return values, indices
