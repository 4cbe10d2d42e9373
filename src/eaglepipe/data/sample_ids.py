"""Ids of the several sampled versions of one conversation.

The regenerate stage can write N sampled versions of each source conversation (`regen.samples_per_prompt`).
Sample 0 keeps the conversation's id and sample k > 0 is `<id>#s<k>`, so one sample has the same id
whatever N is, and `source_id` gives back the conversation all of them came from (tokenize keeps them on
one side of the train/val split).
"""
from __future__ import annotations

import re

_SAMPLE_SUFFIX = re.compile(r"(#s\d+)+$")


def sample_id(conv_id: str, sample: int) -> str:
    """The id of sample `sample` (0-based) of conversation `conv_id`."""
    return conv_id if sample == 0 else f"{conv_id}#s{sample}"


def source_id(row_id: str) -> str:
    """The source conversation of a row: its id without sample suffixes. (Stripping every trailing suffix
    can only put more rows together, never split one source's samples apart.)"""
    return _SAMPLE_SUFFIX.sub("", row_id)
