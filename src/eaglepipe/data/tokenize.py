"""The tokenize stage's logic: conversations → (input_ids, loss_mask) samples, split into train/val."""
from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from jinja2.exceptions import TemplateError
from tqdm import tqdm

from .loss_mask import ChatMasker, TemplateMismatch
from .sample_ids import source_id

log = logging.getLogger("eaglepipe.data")
CHUNK = 256
# a worker process costs about ten seconds (start, imports, tokenizer, sending its samples back) and shares the CPUs
# with the batches' tokenizer threads, while one process batches ~800 conversations a second on 16 CPUs: a worker
# is only worth it for this many conversations each
WORKER_MIN = 20000


@dataclass
class TokenizeResult:
    """Kept samples (in input order) and what happened to the rest."""

    samples: list[dict[str, Any]] = field(default_factory=list)
    conversations_in: int = 0
    dropped: Counter = field(default_factory=Counter)
    first_errors: dict[str, str] = field(default_factory=dict)
    truncated: int = 0
    misaligned_tokens: int = 0

    def extend(self, other: "TokenizeResult") -> None:
        """Append the result of the conversations that follow this one's."""
        self.samples.extend(other.samples)
        self.conversations_in += other.conversations_in
        self.dropped.update(other.dropped)
        for reason, err in other.first_errors.items():
            self.first_errors.setdefault(reason, err)
        self.truncated += other.truncated
        self.misaligned_tokens += other.misaligned_tokens


def tokenize_chunk(masker: ChatMasker, conversations: Iterable[dict[str, Any]], seq_length: int) -> TokenizeResult:
    """Render and mask each conversation (the chunk's texts tokenized as one batch); drop (and count) those the
    template rejects or with nothing to learn."""
    res = TokenizeResult()

    def drop(conv: dict[str, Any], e: Exception) -> None:
        reason = "template_error" if isinstance(e, TemplateError) else "template_not_prefix"
        res.dropped[reason] += 1
        res.first_errors.setdefault(reason, f"{conv['id']}: {e}")

    rendered: list[tuple[dict[str, Any], str | TemplateError]] = []
    for conv in conversations:
        res.conversations_in += 1
        try:
            rendered.append((conv, masker.render(conv["messages"], False)))
        except TemplateError as e:
            rendered.append((conv, e))
    tokens = iter(masker.tokenize([text for _, text in rendered if isinstance(text, str)]))
    for conv, text in rendered:
        if isinstance(text, TemplateError):
            drop(conv, text)
            continue
        try:
            s = masker.masked(conv["messages"], text, next(tokens), seq_length)
        except (TemplateError, TemplateMismatch) as e:
            drop(conv, e)
            continue
        if not s.loss_mask.any():
            res.dropped["no_supervised_tokens"] += 1
            continue
        res.truncated += s.truncated
        res.misaligned_tokens += s.misaligned_tokens
        res.samples.append({"id": conv["id"], "input_ids": s.input_ids, "loss_mask": s.loss_mask})
    return res


def _chunks(items: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


_worker_masker: ChatMasker | None = None


def _init_worker(tokenizer_dir: str) -> None:
    global _worker_masker
    from transformers import AutoTokenizer

    _worker_masker = ChatMasker(AutoTokenizer.from_pretrained(tokenizer_dir))


def _work(args: tuple[list[dict[str, Any]], int]) -> TokenizeResult:
    assert _worker_masker is not None
    return tokenize_chunk(_worker_masker, *args)


def tokenize_conversations(masker: ChatMasker, conversations: Iterable[dict[str, Any]], seq_length: int,
                           total: int | None = None, workers: int = 1, tokenizer_dir: str | None = None,
                           chunk_size: int = CHUNK) -> TokenizeResult:
    """Tokenize every conversation, in order; with `workers` > 1 (and the tokenizer's dir) in worker processes."""
    res = TokenizeResult()
    with tqdm(total=total, desc="tokenize", unit="conv", disable=None) as bar:
        if workers <= 1 or tokenizer_dir is None:
            for chunk in _chunks(conversations, chunk_size):
                res.extend(tokenize_chunk(masker, chunk, seq_length))
                bar.update(len(chunk))
            return res
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer_dir,)) as pool:
            jobs = ((chunk, seq_length) for chunk in _chunks(conversations, chunk_size))
            for part in pool.imap(_work, jobs):
                res.extend(part)
                bar.update(part.conversations_in)
    return res


def pick_workers(total: int, cpus: int | None = None) -> int:
    """Worker processes worth starting: one per WORKER_MIN conversations, at most one per two CPUs (each process's
    tokenizer already spreads its batches over threads, so the processes only add the template rendering)."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus // 2, total // WORKER_MIN))


def split_train_val(num_samples: int, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean array marking validation samples: round(val_fraction·n) of them (at least one when the fraction
    is positive and two or more samples exist), chosen by a permutation seeded with `seed`."""
    n_val = round(num_samples * val_fraction)
    if val_fraction > 0 and num_samples >= 2:
        n_val = min(max(n_val, 1), num_samples - 1)
    is_val = np.zeros(num_samples, dtype=bool)
    is_val[np.random.default_rng(seed).permutation(num_samples)[:n_val]] = True
    return is_val


def split_by_source(ids: Sequence[str], val_fraction: float, seed: int) -> np.ndarray:
    """Boolean array marking validation rows: `split_train_val` over the rows' source conversations
    (`sample_ids.source_id`), so that the sampled versions of one conversation all land on the same side.
    Rows with distinct sources split exactly as `split_train_val(len(ids), ...)` does."""
    index: dict[str, int] = {}
    group = np.array([index.setdefault(source_id(i), len(index)) for i in ids], dtype=np.int64)
    return split_train_val(len(index), val_fraction, seed)[group]


def split_stats(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Token counts of a list of samples."""
    lengths = np.array([len(s["input_ids"]) for s in samples], dtype=np.int64)
    supervised = int(sum(int(s["loss_mask"].sum()) for s in samples))
    tokens = int(lengths.sum())
    return {"samples": len(samples), "tokens": tokens, "supervised_tokens": supervised,
            "supervised_fraction": supervised / tokens if tokens else 0.0,
            "mean_length": float(lengths.mean()) if len(lengths) else 0.0,
            "max_length": int(lengths.max()) if len(lengths) else 0}
