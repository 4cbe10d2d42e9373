"""FLOP counts for MFU: the target forward plus the drafter forward and backward over all TTT steps."""
from __future__ import annotations

import time

import torch

from ..families.registry import family_of
from ..models.config import DrafterConfig
from .batches import Batch


def attention_pairs(batch: Batch) -> int:
    """Causal (query, key) pairs of the batch: sum over documents of L (L + 1) / 2."""
    ids = batch.doc_ids
    total = 0
    for row in ids.cpu():
        _, counts = torch.unique_consecutive(row[row >= 0], return_counts=True)
        total += int((counts * (counts + 1) // 2).sum())
    return total


def target_flops(info: dict, tokens: int, pairs: int, label_rows: int) -> float:
    """Forward FLOPs of the target: 2 x matmul params per token, attention scores and values, lm_head rows."""
    h, i, n = info["hidden_size"], info["intermediate_size"], info["num_layers"]
    q = info["num_attention_heads"] * info["head_dim"]
    kv = info["num_key_value_heads"] * info["head_dim"]
    per_layer = 2 * (h * (q + 2 * kv) + q * h + 3 * h * i)
    return float(tokens * n * per_layer + n * 4 * q * pairs + 2 * h * info["vocab_size"] * label_rows)


def drafter_flops(cfg: DrafterConfig, tokens: int, pairs: int, logit_rows: int, ttt_steps: int) -> float:
    """Forward + backward (3x forward) FLOPs of the drafter over `ttt_steps` steps."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    in_dim = 2 * h
    fuse = family_of(cfg).fuse_flops(cfg) * tokens
    layer = 2 * (in_dim * (q + 2 * kv) + q * h + 3 * h * i) * tokens
    attn = sum(4 * q * (pairs + k * tokens) for k in range(ttt_steps))
    head = 2 * h * cfg.draft_vocab_size * logit_rows
    return 3.0 * (fuse + ttt_steps * layer + attn + head)


def measure_matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul throughput in FLOP/s (the MFU denominator): best of several large matmuls."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(10 if device.type == "cuda" else 3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / 5)
    return 2.0 * n ** 3 / best
