"""The mask token of block-drafting drafters: a row of the target's own embedding table, never a new one.

The order of preference is SpecForge's (specforge/training/model_utils.py): the configured id, the tokenizer's
mask token, the first embedding row past the tokenizer's vocabulary (an unused row, as z-lab's and SGLang's
`<|MASK|>` lands there), then the tokenizer's pad, eos and unk tokens. A target whose tokenizer fills its whole
embedding table (SmolLM2: 49152 of 49152) gets its pad token.
"""
from __future__ import annotations

from typing import Any, Optional

from ..config import ConfigError


def resolve_mask_token_id(configured: Optional[int], tokenizer: Any, vocab_size: int) -> int:
    """The mask token id for a target with `vocab_size` embedding rows and this tokenizer (`configured`: an
    explicit id, which must be a row of the table)."""
    if configured is not None:
        if not 0 <= configured < vocab_size:
            raise ConfigError(f"train.mask_token_id={configured} is not a row of the target's embedding "
                              f"(0..{vocab_size - 1})")
        return int(configured)
    unused = len(tokenizer) if len(tokenizer) < vocab_size else None
    for candidate in (getattr(tokenizer, "mask_token_id", None), unused, tokenizer.pad_token_id,
                      tokenizer.eos_token_id, tokenizer.unk_token_id):
        if candidate is not None and 0 <= int(candidate) < vocab_size:
            return int(candidate)
    raise ConfigError(f"no mask token: the tokenizer names none of mask/pad/eos/unk within the target's "
                      f"{vocab_size} embedding rows, and has no unused row; set train.mask_token_id")
