"""Triton kernels of speculative decoding: the drafter's top-k log-probabilities and a draft tree's bookkeeping.

Import this package only where Triton is wanted: `TRITON_INTERPRET=1` (the CPU tests) must be set before.
"""
from .draft_tree import compact_path_kv, tree_accept, tree_grow, tree_select
from .topk import topk_logprobs

__all__ = ["compact_path_kv", "topk_logprobs", "tree_accept", "tree_grow", "tree_select"]
