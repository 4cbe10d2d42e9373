"""Triton kernels of speculative decoding: the drafter's top-k log-probabilities and a draft tree's bookkeeping.

Import this package only where Triton is wanted: `TRITON_INTERPRET=1` (the CPU tests) must be set before.
"""
from .draft_tree import tree_accept, tree_grow, tree_select
from .topk import topk_logprobs

__all__ = ["topk_logprobs", "tree_accept", "tree_grow", "tree_select"]
