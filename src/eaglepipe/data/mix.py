"""Deterministic subsampling and mixing of several sources by per-source counts or weights."""
from __future__ import annotations

import zlib
from typing import Optional, Sequence

import numpy as np


def allocate(available: Sequence[int], samples: Sequence[Optional[int]], weights: Sequence[float],
             max_samples: Optional[int]) -> list[int]:
    """Rows to take from each source.

    A source with `samples` gets exactly that many (capped at what it has). The others share what is left
    of `max_samples` in proportion to their weights (largest remainder rounding); a source that runs out
    passes its unused share on to the rest. Without `max_samples` they give everything they have.
    """
    take = [min(s, a) if s is not None else 0 for s, a in zip(samples, available)]
    free = [i for i, s in enumerate(samples) if s is None]
    if max_samples is None:
        for i in free:
            take[i] = available[i]
        return take
    budget = max(0, max_samples - sum(take))
    while free and budget > 0:
        total_w = sum(weights[i] for i in free)
        exact = {i: budget * weights[i] / total_w for i in free}
        share = {i: int(exact[i]) for i in free}
        rest = budget - sum(share.values())
        for i in sorted(free, key=lambda i: (-(exact[i] - share[i]), i))[:rest]:
            share[i] += 1
        exhausted = [i for i in free if share[i] >= available[i] - take[i]]
        if not exhausted:
            for i in free:
                take[i] += share[i]
            break
        for i in exhausted:
            budget -= available[i] - take[i]
            take[i] = available[i]
        free = [i for i in free if i not in exhausted]
    return take


def choose_rows(num_rows: int, k: int, seed: int, source_name: str) -> np.ndarray:
    """`k` of `num_rows` row indices, sorted, picked by a permutation seeded by (seed, source name).

    Seeding per source keeps one source's picks unchanged when another source is added or resized.
    """
    if k >= num_rows:
        return np.arange(num_rows)
    rng = np.random.default_rng([seed, zlib.crc32(source_name.encode())])
    return np.sort(rng.permutation(num_rows)[:k])
