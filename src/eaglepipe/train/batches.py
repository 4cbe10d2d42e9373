"""Rows and micro-batches: packing samples into rows with document ids, and the per-TTT-step index tensors
(built on the CPU so the training step never synchronises with the GPU to find supervised slots).

Alignment (documented contract): slot t holds token x_{t+1} and the target feature at t; at TTT step k
slot t holds token x_{t+1+k} at RoPE position t+k (position counted from its document start) and is
supervised iff x_{t+1+k} is an assistant token (loss_mask[t+1+k] = 1) of the same document. Its label is the
target's prediction at position t+1+k (the distribution of x_{t+2+k}).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from typing import Optional, Sequence

import numpy as np
import torch


@dataclass
class Batch:
    """One micro-batch. Shapes: B rows of T slots, K TTT steps, N supervised positions."""

    input_ids: torch.Tensor      # [B, T] long, the target's input
    position_ids: torch.Tensor   # [B, T] long, restarting at 0 per document
    doc_ids: torch.Tensor        # [B, T] long, -1 on padding
    step_ids: torch.Tensor       # [K, B, T] long: drafter input token of slot t at step k (x_{t+1+k})
    label_pos: torch.Tensor      # [N] long, flat (b*T + p) positions whose target prediction is a label
    step_slots: list             # K x [N_k] long, flat slots supervised at step k
    step_rows: list              # K x [N_k] long, index into label_pos of each supervised slot's label
    num_tokens: int              # real (non-padding) tokens
    sample_ids: list             # ids of the samples in the batch, row by row
    first_answer: torch.Tensor   # [B*T] bool: slots whose step-0 label lies in their sample's first answer
    # the block objective's anchor positions [B, A] (-1: padding); its step k lists blocks, not slots
    anchors: Optional[torch.Tensor] = None

    def to(self, device: torch.device | str, pinned: bool = True) -> "Batch":
        """Every tensor on `device` (`to_device`: to a GPU through pinned memory unless `pinned` is false, so the
        host can launch the next step while the GPU still runs the previous one)."""
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = to_device(v, device, pinned)
            elif isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
                v = [to_device(x, device, pinned) for x in v]
            moved[f.name] = v
        return Batch(**moved)

    def supervised_counts(self) -> list[int]:
        """Supervised slots per TTT step."""
        return [int(s.numel()) for s in self.step_slots]


def to_device(x: torch.Tensor, device: torch.device | str, pinned: bool = True) -> torch.Tensor:
    """`x` on `device`, copied without blocking the host: a CPU tensor bound for a GPU is staged in pinned
    memory first (`pinned`), since a copy from pageable memory waits for all the GPU work already queued."""
    if pinned and x.device.type == "cpu" and torch.device(device).type == "cuda":
        x = x.pin_memory()
    return x.to(device, non_blocking=True)


def pack_rows(lengths: Sequence[int], order: Sequence[int], seq_length: int, pack: bool) -> list[list[int]]:
    """Group sample indices (taken in `order`) into rows of at most `seq_length` tokens.

    Packing is first-fit in order (greedy: a new row starts when the next sample does not fit), so the row
    sequence is a deterministic function of the order; without packing every sample is its own row.
    """
    rows: list[list[int]] = []
    used = 0
    for i in order:
        n = int(lengths[i])
        if n > seq_length:
            raise ValueError(f"sample {i} has {n} tokens, more than seq_length={seq_length}")
        if pack and rows and used + n <= seq_length:
            rows[-1].append(i)
            used += n
        else:
            rows.append([i])
            used = n
    return rows


def collate(rows: Sequence[Sequence[dict]], ttt_steps: int, pad_to: int | None = None) -> Batch:
    """Build a Batch from rows of samples (dicts with `input_ids`, `loss_mask`, `id`).

    Rows are right-padded to `pad_to` (default: the longest row rounded up to a multiple of 16).
    """
    lengths = [sum(len(s["input_ids"]) for s in row) for row in rows]
    t = pad_to or int(-(-max(lengths) // 16) * 16)
    if max(lengths) > t:
        raise ValueError(f"a row holds {max(lengths)} tokens, more than the padded length {t}")
    b = len(rows)
    ids = np.zeros((b, t), dtype=np.int64)
    pos = np.zeros((b, t), dtype=np.int64)
    doc = np.full((b, t), -1, dtype=np.int64)
    mask = np.zeros((b, t), dtype=bool)
    first = np.zeros((b, t), dtype=bool)
    sample_ids = []
    for r, row in enumerate(rows):
        start = 0
        for d, s in enumerate(row):
            n = len(s["input_ids"])
            ids[r, start:start + n] = s["input_ids"]
            pos[r, start:start + n] = np.arange(n)
            doc[r, start:start + n] = d
            mask[r, start:start + n] = np.asarray(s["loss_mask"], dtype=bool)
            first[r, start:start + n] = first_run(mask[r, start:start + n])
            sample_ids.append(s.get("id"))
            start += n
    first_answer = np.zeros((b, t), dtype=bool)
    first_answer[:, :-1] = first[:, 1:]          # slot p's step-0 label is position p + 1
    flat_mask = mask.reshape(-1)
    label_pos = np.flatnonzero(flat_mask)
    row_of = np.cumsum(flat_mask) - 1           # position -> index into label_pos (valid where mask)
    step_ids = np.zeros((ttt_steps, b, t), dtype=np.int64)
    step_slots, step_rows = [], []
    slots = np.arange(t)
    for k in range(ttt_steps):
        src = slots + 1 + k                      # position whose token enters slot t at step k
        inside = src < t
        src_c = np.minimum(src, t - 1)
        same_doc = inside[None, :] & (doc[:, src_c] == doc) & (doc >= 0)
        step_ids[k] = np.where(same_doc, ids[:, src_c], 0)
        sup = same_doc & mask[:, src_c]
        flat_slots = np.flatnonzero(sup.reshape(-1))
        src_flat = (flat_slots // t) * t + src_c[flat_slots % t]
        step_slots.append(torch.from_numpy(flat_slots))
        step_rows.append(torch.from_numpy(row_of[src_flat]))
    return Batch(input_ids=torch.from_numpy(ids), position_ids=torch.from_numpy(pos), doc_ids=torch.from_numpy(doc),
                 step_ids=torch.from_numpy(step_ids), label_pos=torch.from_numpy(label_pos),
                 step_slots=step_slots, step_rows=step_rows, num_tokens=int(sum(lengths)), sample_ids=sample_ids,
                 first_answer=torch.from_numpy(first_answer.reshape(-1)))


def row_generator(seed: int, sample_ids: Sequence) -> np.random.Generator:
    """The random generator of one row of a training step: from the step's `seed` and the ids of the row's samples,
    not the row's place, so that any split of the step's rows over ranks and micro-batches draws alike."""
    key = hashlib.sha256(f"{seed}:{list(sample_ids)}".encode()).digest()
    return np.random.default_rng(int.from_bytes(key[:8], "little"))


def first_run(mask: np.ndarray) -> np.ndarray:
    """The first maximal run of True in a 1-D bool array (a sample's first answer in its loss mask)."""
    out = np.zeros_like(mask)
    hits = np.flatnonzero(mask)
    if hits.size:
        gaps = np.flatnonzero(~mask[hits[0]:])
        end = hits[0] + (gaps[0] if gaps.size else mask.size - hits[0])
        out[hits[0]:end] = True
    return out
