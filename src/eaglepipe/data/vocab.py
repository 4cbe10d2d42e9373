"""The draft vocabulary: top supervised target tokens, `d2t`/`t2d` maps, coverage, and their file."""
from __future__ import annotations

from pathlib import Path

import torch

VOCAB_FILE = "vocab.safetensors"


def select_draft_tokens(token_freq: torch.Tensor, draft_vocab_size: int) -> torch.Tensor:
    """Target ids of the draft vocab, sorted ascending.

    The `draft_vocab_size` most frequent tokens (ties broken by lower id); when fewer distinct tokens
    occur, the lowest unused ids fill the rest.
    """
    token_freq = torch.as_tensor(token_freq, dtype=torch.int64).flatten()
    vocab_size = token_freq.numel()
    if not 1 <= draft_vocab_size <= vocab_size:
        raise ValueError(f"draft_vocab_size={draft_vocab_size} must be between 1 and the target vocab size "
                         f"{vocab_size}")
    ids = torch.arange(vocab_size, dtype=torch.int64)
    # stable sort on -freq keeps ascending id order among equal counts: ties go to the lower id
    order = torch.sort(-token_freq, stable=True).indices
    seen = order[token_freq[order] > 0][:draft_vocab_size]
    if seen.numel() < draft_vocab_size:
        used = torch.zeros(vocab_size, dtype=torch.bool)
        used[seen] = True
        pad = ids[~used][: draft_vocab_size - seen.numel()]
        seen = torch.cat([seen, pad])
    return torch.sort(seen).values


def build_vocab_maps(token_freq: torch.Tensor, draft_vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(d2t, t2d)`: d2t int64 [V_draft] with `target_id = i + d2t[i]`, t2d bool [V_target]."""
    token_freq = torch.as_tensor(token_freq, dtype=torch.int64).flatten()
    chosen = select_draft_tokens(token_freq, draft_vocab_size)
    d2t = chosen - torch.arange(draft_vocab_size, dtype=torch.int64)
    t2d = torch.zeros(token_freq.numel(), dtype=torch.bool)
    t2d[chosen] = True
    return d2t, t2d


def coverage(token_freq: torch.Tensor, t2d: torch.Tensor) -> float:
    """Fraction of counted (supervised) tokens whose target id is in the draft vocab."""
    token_freq = torch.as_tensor(token_freq, dtype=torch.int64)
    total = int(token_freq.sum())
    return float(token_freq[t2d].sum()) / total if total else 0.0


def save_vocab(directory: str | Path, d2t: torch.Tensor, t2d: torch.Tensor, token_freq: torch.Tensor) -> Path:
    """Write `vocab.safetensors` with d2t (int64), t2d (bool) and token_freq (int64)."""
    from safetensors.torch import save_file

    path = Path(directory) / VOCAB_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"d2t": d2t.to(torch.int64).contiguous(), "t2d": t2d.to(torch.bool).contiguous(),
               "token_freq": torch.as_tensor(token_freq, dtype=torch.int64).contiguous()}, str(path))
    return path


def load_vocab(directory: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """`(d2t, t2d)` from a vocab stage output dir (or a path to `vocab.safetensors` itself)."""
    from safetensors.torch import load_file

    path = Path(directory)
    if path.is_dir():
        path = path / VOCAB_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is it the output of the vocab stage?")
    tensors = load_file(str(path))
    d2t, t2d = tensors["d2t"].to(torch.int64), tensors["t2d"].to(torch.bool)
    if int(t2d.sum()) != d2t.numel():
        raise ValueError(f"{path}: t2d marks {int(t2d.sum())} tokens but d2t has {d2t.numel()}")
    return d2t, t2d


def count_supervised_tokens(samples: list[dict], vocab_size: int) -> torch.Tensor:
    """int64 [vocab_size] counts of loss-masked token ids over `samples` (from `read_tokens`)."""
    import numpy as np

    counts = np.zeros(vocab_size, dtype=np.int64)
    for s in samples:
        ids = s["input_ids"][s["loss_mask"].astype(bool)]
        if ids.size and (ids.max() >= vocab_size or ids.min() < 0):
            raise ValueError(f"sample {s['id']} holds token id {int(ids.max())} outside the target vocab "
                             f"of {vocab_size}")
        counts += np.bincount(ids, minlength=vocab_size)
    return torch.from_numpy(counts)


def coverage_curve(token_freq: torch.Tensor, sizes: list[int]) -> dict[int, float]:
    """Coverage of supervised tokens reached by the top-k draft vocab, for each k in `sizes`."""
    token_freq = torch.as_tensor(token_freq, dtype=torch.int64)
    total = int(token_freq.sum())
    cum = torch.sort(token_freq, descending=True).values.cumsum(0)
    return {k: (float(cum[min(k, cum.numel()) - 1]) / total if total else 0.0) for k in sizes}
