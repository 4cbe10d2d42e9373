"""Chat-template rendering with an assistant-only loss mask, found from the template itself.

For every assistant turn i the template renders `messages[:i]` with the generation prompt; that text must be a
prefix of the whole conversation's rendering, and the assistant's reply starts right where it ends. The reply
runs to the template's end-of-turn token (found once by rendering a probe conversation), which is supervised
too because the drafter must learn to predict it. A token that straddles a span boundary (a template whose
generation prompt ends in a space that BPE merges into the reply's first word) is supervised and counted.
Role headers, the generation prompt, system and user turns
and whatever the template puts after the end-of-turn token (e.g. ChatML's newline) stay unsupervised. No
per-model patterns: ChatML, Llama-3 and other templates work the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

PROBE_USER = "Probe question?"
PROBE_REPLY = "Probe answer."


class TemplateMismatch(ValueError):
    """The chat template renders a prompt that is not a prefix of the full conversation."""


@dataclass
class MaskedSample:
    """One tokenized conversation: ids, its 0/1 loss mask, and how it was cut."""

    input_ids: np.ndarray
    loss_mask: np.ndarray
    truncated: bool
    # tokens that straddle a supervised-span boundary (0 for well-behaved templates)
    misaligned_tokens: int


def special_token_strings(tokenizer: Any) -> list[str]:
    """Every special token's text (named specials and added tokens flagged special)."""
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(tok, "special", False):
            specials.add(str(tok))
    return sorted(s for s in specials if s)


class ChatMasker:
    """Renders conversations with a tokenizer's chat template and marks the supervised tokens."""

    def __init__(self, tokenizer: Any):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("the tokenizer must be a fast (Rust) tokenizer: offsets are needed for the loss mask")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; add one to tokenizer_config.json or "
                             "chat_template.jinja of the target")
        self.tokenizer = tokenizer
        self.end_of_turn = self._detect_end_of_turn()

    def render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        """The template's text for `messages`."""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _detect_end_of_turn(self) -> Optional[str]:
        """The first special token the template writes after an assistant reply (e.g. <|im_end|>, <|eot_id|>)."""
        probe = [{"role": "user", "content": PROBE_USER}, {"role": "assistant", "content": PROBE_REPLY}]
        prompt, full = self.render(probe[:1], True), self.render(probe, False)
        if not full.startswith(prompt):
            raise TemplateMismatch("the chat template's generation prompt is not a prefix of the rendered "
                                   "conversation, so assistant spans cannot be located")
        tail = full[len(prompt):]
        at = tail.find(PROBE_REPLY)
        after = tail[at + len(PROBE_REPLY):] if at >= 0 else tail
        found = [(after.find(s), -len(s), s) for s in special_token_strings(self.tokenizer) if s in after]
        return min(found)[2] if found else None

    def supervised_spans(self, messages: list[dict[str, str]], text: str, char_limit: int) -> list[tuple[int, int]]:
        """Character spans `[start, end)` of each assistant reply plus its end-of-turn token within `text`."""
        spans = []
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], True)
            if not text.startswith(prompt):
                raise TemplateMismatch(f"the rendered prompt before assistant turn {i} is not a prefix of the "
                                       "rendered conversation")
            start = len(prompt)
            if start >= char_limit:
                break
            turn_text = self.render(messages[:i + 1], False)
            bound = len(turn_text) if text.startswith(turn_text) else len(text)
            content = msg["content"].strip()
            at = text.find(content, start, bound) if content else -1
            content_end = at + len(content) if at >= 0 else start
            end = content_end if at >= 0 else bound
            if self.end_of_turn is not None:
                eot = text.find(self.end_of_turn, content_end, bound)
                if eot >= 0:
                    end = eot + len(self.end_of_turn)
            spans.append((start, end))
        return spans

    def encode(self, messages: list[dict[str, str]], max_length: int) -> MaskedSample:
        """Token ids and loss mask of a conversation, truncated to `max_length` tokens."""
        text = self.render(messages, False)
        return self.masked(messages, text, self.tokenize([text])[0], max_length)

    def tokenize(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each text's token ids [n] and character offsets [n, 2], tokenized as one batch: the Rust tokenizer
        spreads a batch over its threads."""
        if not texts:
            return []
        enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        return [(np.asarray(ids, dtype=np.int32), np.asarray(offsets, dtype=np.int64).reshape(-1, 2))
                for ids, offsets in zip(enc["input_ids"], enc["offset_mapping"])]

    def masked(self, messages: list[dict[str, str]], text: str, tokens: tuple[np.ndarray, np.ndarray],
               max_length: int) -> MaskedSample:
        """The loss mask of a conversation rendered as `text` and tokenized as `tokens` (`tokenize`'s ids and
        offsets), both truncated to `max_length` tokens."""
        ids, offsets = tokens
        truncated = len(ids) > max_length
        ids, offsets = ids[:max_length], offsets[:max_length]
        char_limit = int(offsets[-1, 1]) if len(offsets) else 0
        mask = np.zeros(len(ids), dtype=np.int8)
        misaligned = 0
        starts, ends = offsets[:, 0], offsets[:, 1]
        for a, b in self.supervised_spans(messages, text, char_limit):
            mask[(starts < b) & (ends > a)] = 1
            misaligned += int(((starts < a) & (ends > a)).sum() + ((starts < b) & (ends > b)).sum())
        return MaskedSample(ids, mask, truncated, misaligned)


def mark_supervised(tokenizer: Any, input_ids: np.ndarray, loss_mask: np.ndarray, open_mark: str = "[[",
                    close_mark: str = "]]") -> str:
    """The decoded sample with each run of supervised tokens wrapped in `[[...]]`."""
    out, start = [], 0
    for i in range(1, len(input_ids) + 1):
        if i == len(input_ids) or loss_mask[i] != loss_mask[start]:
            piece = tokenizer.decode(input_ids[start:i].tolist(), skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)
            out.append(f"{open_mark}{piece}{close_mark}" if loss_mask[start] else piece)
            start = i
    return "".join(out)
