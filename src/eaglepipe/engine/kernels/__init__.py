"""Row-invariant Triton kernels of the token path (decode steps and draft verification), and the K/V compaction
after a verify.

Every kernel computes each token row from that row's inputs alone, with tiles that depend only on the weight
shape (N, K) and never on the number of rows M. A token therefore gets the same bits whether it is decoded
alone, in a batch, or as a node of a draft tree, which is what makes greedy speculative decoding exact in bf16.

Import this package only where Triton is wanted: `TRITON_INTERPRET=1` (the CPU tests) must be set before.
"""
from .attention import virtual_attention
from .compact import compact_kv
from .linear import embed_hidden_linear, norm_gate_up, norm_linear
from .rope_cache import rope_write_kv

__all__ = ["compact_kv", "embed_hidden_linear", "norm_gate_up", "norm_linear", "rope_write_kv", "virtual_attention"]
