"""The tokenize stage's logic: conversations → (input_ids, loss_mask) samples, split into train/val."""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
from jinja2.exceptions import TemplateError
from tqdm import tqdm

from .loss_mask import ChatMasker, TemplateMismatch

log = logging.getLogger("eaglepipe.data")


@dataclass
class TokenizeResult:
    """Kept samples (in input order) and what happened to the rest."""

    samples: list[dict[str, Any]] = field(default_factory=list)
    conversations_in: int = 0
    dropped: Counter = field(default_factory=Counter)
    first_errors: dict[str, str] = field(default_factory=dict)
    truncated: int = 0
    misaligned_tokens: int = 0


def tokenize_conversations(masker: ChatMasker, conversations: Iterable[dict[str, Any]], seq_length: int,
                           total: int | None = None) -> TokenizeResult:
    """Render and mask each conversation; drop (and count) those the template rejects or with nothing to learn."""
    res = TokenizeResult()
    for conv in tqdm(conversations, total=total, desc="tokenize", unit="conv", disable=None):
        res.conversations_in += 1
        try:
            s = masker.encode(conv["messages"], seq_length)
        except (TemplateError, TemplateMismatch) as e:
            reason = "template_error" if isinstance(e, TemplateError) else "template_not_prefix"
            res.dropped[reason] += 1
            res.first_errors.setdefault(reason, f"{conv['id']}: {e}")
            continue
        if not s.loss_mask.any():
            res.dropped["no_supervised_tokens"] += 1
            continue
        res.truncated += s.truncated
        res.misaligned_tokens += s.misaligned_tokens
        res.samples.append({"id": conv["id"], "input_ids": s.input_ids, "loss_mask": s.loss_mask})
    return res


def split_train_val(num_samples: int, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean array marking validation samples: round(val_fraction·n) of them (at least one when the fraction
    is positive and two or more samples exist), chosen by a permutation seeded with `seed`."""
    n_val = round(num_samples * val_fraction)
    if val_fraction > 0 and num_samples >= 2:
        n_val = min(max(n_val, 1), num_samples - 1)
    is_val = np.zeros(num_samples, dtype=bool)
    is_val[np.random.default_rng(seed).permutation(num_samples)[:n_val]] = True
    return is_val


def split_stats(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Token counts of a list of samples."""
    lengths = np.array([len(s["input_ids"]) for s in samples], dtype=np.int64)
    supervised = int(sum(int(s["loss_mask"].sum()) for s in samples))
    tokens = int(lengths.sum())
    return {"samples": len(samples), "tokens": tokens, "supervised_tokens": supervised,
            "supervised_fraction": supervised / tokens if tokens else 0.0,
            "mean_length": float(lengths.mean()) if len(lengths) else 0.0,
            "max_length": int(lengths.max()) if len(lengths) else 0}
